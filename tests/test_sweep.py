"""The staleness sweep: its grid and tables on exact inputs, and whole sweeps
through the command line (written, resumed, and equal across back ends)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.sweep import Point, aggregate, grid, markdown

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def test_grid_runs_backprop_at_delay_zero_only():
    assert grid(["cdni", "backprop"], [0, 2], [1, 2]) == [
        Point("cdni", 0, 1), Point("cdni", 0, 2), Point("cdni", 2, 1), Point("cdni", 2, 2),
        Point("backprop", 0, 1), Point("backprop", 0, 2)]
    assert Point("async-backprop", 4, 3).name == "async-backprop-delay4-seed3"


def _row(mode, delay, seed, loss, acc, status="completed"):
    return {"mode": mode, "grad_delay": delay, "seed": seed, "status": status,
            "final_loss": loss, "train_accuracy": acc, "staleness_mean": float(delay)}


def test_aggregate_mean_and_sample_sd_over_completed_seeds():
    rows = [_row("cdni", 0, 1, 1.0, 0.5), _row("cdni", 0, 2, 3.0, 1.0),
            _row("cdni", 2, 1, 2.0, 0.25), _row("cdni", 2, 2, None, None, "failed")]
    a, b = aggregate(rows)
    assert (a["mode"], a["grad_delay"], a["n"], a["runs"]) == ("cdni", 0, 2, 2)
    assert a["loss_mean"] == 2.0 and a["loss_std"] == pytest.approx(2 ** 0.5)
    assert a["accuracy_mean"] == 0.75 and a["accuracy_std"] == pytest.approx(0.125 ** 0.5)
    assert (b["n"], b["runs"], b["loss_mean"], b["loss_std"]) == (1, 2, 2.0, 0.0)
    table = markdown([a, b])
    assert "| cdni | 0 | 2 | 2.0000 ± 1.4142 | 75.0 ± 35.4 | 0.00 |" in table
    assert "| cdni | 2 | 1 of 2 | 2.0000 ± 0.0000 | 25.0 ± 0.0 | 2.00 |" in table


def sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", "sweep", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=100)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


ARGS = ["--modes", "cdni,async-backprop", "--grad-delay", "0,2", "--seeds", "1",
        "--epochs", "8", "--examples", "30"]


def test_sweep_writes_csv_table_and_plot_and_resumes(tmp_path):
    out = tmp_path / "sweep"
    done = sweep(out, *ARGS, "--in-process")
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "results.csv")
    assert [(r["mode"], r["grad_delay"]) for r in rows] == [
        ("cdni", "0"), ("cdni", "2"), ("async-backprop", "0"), ("async-backprop", "2")]
    assert all(r["status"] == "completed" for r in rows)
    # The measured staleness is the injected delay (lockstep semantics in-process).
    assert [float(r["staleness_mean"]) for r in rows] == [0.0, 2.0, 0.0, 2.0]
    table = (out / "results.md").read_text()
    assert table.count("\n") == 2 + 4 and "| async-backprop | 2 | 1 |" in table
    png = out / "accuracy_vs_staleness.png"
    assert png.read_bytes()[:4] == b"\x89PNG"
    for r in rows:
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert float(r["final_loss"]) == summary["final_loss"]

    again = sweep(out, *ARGS, "--in-process")
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("done before, skipped") == 4
    assert read_csv(out / "results.csv") == rows


def test_sweep_reruns_a_point_that_did_not_complete(tmp_path):
    out = tmp_path / "sweep"
    point = out / "runs" / "cdni-delay0-seed1"
    point.mkdir(parents=True)
    (point / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    done = sweep(out, "--modes", "cdni", "--grad-delay", "0", "--seeds", "1", "--epochs", "3",
                 "--in-process")
    assert done.returncode == 0, done.stderr
    assert read_csv(out / "results.csv")[0]["status"] == "completed"
    kept = out / "runs" / "cdni-delay0-seed1.attempt1" / "summary.json"
    assert json.loads(kept.read_text()) == {"status": "interrupted"}


def test_process_sweep_under_lockstep_equals_in_process_sweep(tmp_path):
    args = ["--modes", "cdni", "--grad-delay", "0,1", "--seeds", "1", "--epochs", "6",
            "--examples", "30"]
    a = sweep(tmp_path / "a", *args, "--in-process")
    b = sweep(tmp_path / "b", *args, "--lockstep")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    keys = ["mode", "grad_delay", "final_loss", "train_accuracy", "staleness_mean"]
    ra, rb = read_csv(tmp_path / "a" / "results.csv"), read_csv(tmp_path / "b" / "results.csv")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]


def test_sweep_rejects_bad_grid_before_running(tmp_path):
    done = sweep(tmp_path / "s", "--modes", "cdni,nope")
    assert done.returncode == 2 and "--modes" in done.stderr
    done = sweep(tmp_path / "s", "--grad-delay", "0,-1")
    assert done.returncode == 2 and "--grad-delay" in done.stderr
    assert not (tmp_path / "s").exists()
