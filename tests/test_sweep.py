"""The staleness sweep: its grid and tables on exact inputs, and whole sweeps
through the command line (written, resumed, and equal across back ends)."""
from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.run.sweep import (Point, aggregate, expand_axes, grid, markdown,
                                 markdown_by_variant, parse_axis)

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def test_grid_runs_backprop_at_delay_zero_only():
    assert grid(["cdni", "backprop"], [0, 2], [1, 2]) == [
        Point("cdni", 0, 1), Point("cdni", 0, 2), Point("cdni", 2, 1), Point("cdni", 2, 2),
        Point("backprop", 0, 1), Point("backprop", 0, 2)]
    assert Point("async-backprop", 4, 3).name == "async-backprop-delay4-seed3"


def test_grid_runs_every_variant_over_the_whole_grid():
    assert grid(["cdni", "backprop"], [0, 4], [1], ["a", "b"]) == [
        Point("cdni", 0, 1, "a"), Point("cdni", 4, 1, "a"), Point("backprop", 0, 1, "a"),
        Point("cdni", 0, 1, "b"), Point("cdni", 4, 1, "b"), Point("backprop", 0, 1, "b")]
    assert Point("cdni", 8, 2, "bn").name == "bn-cdni-delay8-seed2"


def test_parse_sweep_variants_carry_their_run_options():
    from pipeline.run.cli import parse_sweep
    args = parse_sweep(["--modes", "cdni", "--grad-delay", "0,8", "--epochs", "3",
                        "--variant", "plain:", "--variant", "bn: --batchnorm --sg-boost 0.5",
                        "--variant", "sgd: --optimizer sgd --momentum 0.9 --lr 0.1"])
    assert args.variants == ["plain", "bn", "sgd"]
    plain, bn, sgd = (args.bases[v] for v in args.variants)
    assert (plain.batchnorm, plain.sg_boost, plain.epochs) == (False, 0.0, 3)
    assert (bn.batchnorm, bn.sg_boost, bn.epochs) == (True, 0.5, 3)
    assert (sgd.optimizer, sgd.momentum, sgd.lr, sgd.batchnorm) == ("sgd", 0.9, 0.1, False)
    assert parse_sweep(["--modes", "cdni"]).variants == [""]


@pytest.mark.slow
@pytest.mark.parametrize("variant, says", [
    ("k: --grad-delay 3", "--grad-delay"),
    ("s: --seed 4", "--seed"),
    ("no colon", "NAME: OPTIONS"),
    ("bad/name: --batchnorm", "NAME: OPTIONS"),
    ("x: --sg-boost 1 --mode backprop", "--modes"),
    ("y: --no-such-option", "unrecognized"),
])
def test_sweep_refuses_a_bad_variant_in_one_line(tmp_path, variant, says):
    done = sweep(tmp_path / "s", "--modes", "cdni", "--variant", variant)
    assert done.returncode == 2 and says in done.stderr, done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_sweep_refuses_a_variant_that_does_not_fit_a_mode(tmp_path):
    done = sweep(tmp_path / "s", "--modes", "cdni,backprop", "--variant", "b: --sg-boost 1")
    assert done.returncode == 2 and "--sg-boost" in done.stderr
    twice = sweep(tmp_path / "s", "--variant", "a:", "--variant", "a: --batchnorm")
    assert twice.returncode == 2 and "named twice" in twice.stderr


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
    assert (b["n"], b["runs"], b["loss_mean"], b["loss_std"]) == (1, 2, 2.0, None)
    table = markdown([a, b])
    assert "| cdni | 0 | 2 | 2.0000 ± 1.4142 | 75.0 ± 35.4 | 0.00 |" in table
    # one seed: no spread to show, not a spread of 0
    assert "| cdni | 2 | 1 of 2 | 2.0000 | 25.0 | 2.00 |" in table


def test_variants_side_by_side_in_one_table():
    agg = [{"variant": v, "mode": m, "grad_delay": k, "test_mean": t, "test_std": 0.01}
           for v, m, k, t in [("a", "cdni", 0, 0.98), ("a", "cdni", 8, 0.5), ("b", "cdni", 0, 0.97),
                              ("b", "cdni", 8, 0.96), ("b", "backprop", 0, 0.99)]]
    assert markdown_by_variant(agg).splitlines() == [
        "test accuracy %, mean ± sd over the seeds, by variant:", "",
        "| mode | grad delay K | a | b |", "|---|---|---|---|",
        "| cdni | 0 | 98.00 ± 1.00 | 97.00 ± 1.00 |",
        "| cdni | 8 | 50.00 ± 1.00 | 96.00 ± 1.00 |",
        "| backprop | 0 |  | 99.00 ± 1.00 |"]
    assert markdown_by_variant([{**a, "variant": ""} for a in agg[:1]]) == ""
    one = [{**a, "test_std": None} for a in agg]
    assert markdown_by_variant(one).splitlines()[:1] + markdown_by_variant(one).splitlines()[4:5] \
        == ["test accuracy %, one seed each, by variant:", "| cdni | 0 | 98.00 | 97.00 |"]


@pytest.mark.parametrize("ns, said", [([1], "one seed"), ([0], "no run completed"),
                                      ([3], "mean ± std over 3 seeds"),
                                      ([1, 3], "mean ± std over 1–3 seeds")])
def test_the_sweep_plot_says_what_its_points_are_over(ns, said):
    from pipeline.run.plots import seeds_said
    assert seeds_said(ns) == said


def sweep(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "launch.py", "sweep", "--out", str(out), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=100)


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return list(csv.DictReader(f))


ARGS = ["--modes", "cdni,async-backprop", "--grad-delay", "0,2", "--seeds", "1",
        "--epochs", "8", "--examples", "30"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_sweep_with_variants_writes_a_row_and_a_line_per_variant(tmp_path):
    out = tmp_path / "sweep"
    done = sweep(out, "--modes", "cdni", "--grad-delay", "0,2", "--seeds", "1", "--epochs", "4",
                 "--examples", "30", "--in-process", "--variant", "plain:",
                 "--variant", "la: --sg-lookahead 1")
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "results.csv")
    assert [(r["variant"], r["grad_delay"]) for r in rows] == [
        ("plain", "0"), ("plain", "2"), ("la", "0"), ("la", "2")]
    # at K = 0 the lookahead has nothing to look ahead over: the same run
    assert rows[0]["final_loss"] == rows[2]["final_loss"]
    assert rows[1]["final_loss"] != rows[3]["final_loss"]
    cfg = json.loads((Path(rows[3]["run_dir"]) / "config.json").read_text())["config"]
    assert cfg["sg_lookahead"] == 1.0 and cfg["grad_delay"] == 2
    table = (out / "results.md").read_text()
    assert table.startswith("| variant | mode |") and "| la | cdni | 2 | 1 |" in table
    assert "| mode | grad delay K | plain | la |" in table
    assert (out / "accuracy_vs_staleness.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
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


@pytest.mark.slow
def test_process_sweep_under_lockstep_equals_in_process_sweep(tmp_path):
    args = ["--modes", "cdni", "--grad-delay", "0,1", "--seeds", "1", "--epochs", "6",
            "--examples", "30"]
    a = sweep(tmp_path / "a", *args, "--in-process")
    b = sweep(tmp_path / "b", *args, "--lockstep")
    assert a.returncode == 0 and b.returncode == 0, a.stderr + b.stderr
    keys = ["mode", "grad_delay", "final_loss", "train_accuracy", "staleness_mean"]
    ra, rb = read_csv(tmp_path / "a" / "results.csv"), read_csv(tmp_path / "b" / "results.csv")
    assert [{k: r[k] for k in keys} for r in ra] == [{k: r[k] for k in keys} for r in rb]


@pytest.mark.slow
def test_sweep_rejects_bad_grid_before_running(tmp_path):
    done = sweep(tmp_path / "s", "--modes", "cdni,nope")
    assert done.returncode == 2 and "--modes" in done.stderr
    done = sweep(tmp_path / "s", "--grad-delay", "0,-1")
    assert done.returncode == 2 and "--grad-delay" in done.stderr
    assert not (tmp_path / "s").exists()


# --- --unlock forward as axes ---------------------------------------------------------

def test_grid_unlocks_the_sg_modes_with_input_delays_up_to_the_gradient_delay():
    got = grid(["cdni", "backprop"], [0, 2], [1], unlocks=["none", "forward"],
               input_delays=[0, 1, 3])
    assert got == [
        Point("cdni", 0, 1), Point("cdni", 2, 1),
        Point("cdni", 0, 1, unlock="forward", input_delay=0),
        Point("cdni", 2, 1, unlock="forward", input_delay=0),
        Point("cdni", 2, 1, unlock="forward", input_delay=1),   # 3 > 2: left out
        Point("backprop", 0, 1)]                                  # backprop stays locked
    p = Point("dni", 4, 2, "v", "forward", 1)
    assert p.name == "v-dni-unlocked-in1-delay4-seed2"
    assert Point("dni", 4, 2, "", "hidden", 0).name == "dni-hidden-unlocked-in0-delay4-seed2"
    assert Point("dni", 4, 2, "", "hidden", 0).line == "dni hidden unlocked, input delay 0"
    assert p.line == "dni unlocked, input delay 1" and Point("dni", 4, 2).line == "dni"
    assert Point("cdni", 2, 1).fields() == dict(mode="cdni", grad_delay=2, unlock="none",
                                                input_delay=0, si_lr=0.0, si_second_step=False,
                                                si_output_scale=1.0)


def test_parse_sweep_keeps_the_synthetic_input_options_for_the_unlocked_points(tmp_path):
    from pipeline.run.cli import parse_sweep
    from pipeline.run.sweep import point_config
    args = parse_sweep(["--modes", "cdni", "--grad-delay", "1", "--unlock", "none,forward",
                        "--input-delay", "0,1", "--si-second-step", "--si-lr", "0.1"])
    assert (args.unlocks, args.input_delays) == (["none", "forward"], [0, 1])
    base = args.bases[""]
    locked, k0, k1 = (point_config(base, p, tmp_path)
                      for p in grid(args.modes, args.delays, [1], [""], args.unlocks,
                                    args.input_delays))
    assert (locked.unlock, locked.si_second_step, locked.si_lr) == ("none", False, 0.0)
    assert (k1.unlock, k1.input_delay, k1.si_second_step, k1.si_lr) == ("forward", 1, True, 0.1)
    assert k0.input_delay == 0
    # the unlocked points take --unlock's defaults (UNLOCK_DEFAULTS), the locked ones not
    assert (locked.si_output_scale, k0.si_output_scale, k1.si_output_scale) == (1.0, 0.3, 0.3)
    args = parse_sweep(["--modes", "cdni", "--grad-delay", "0", "--unlock", "none,forward"])
    locked, unlocked = (point_config(args.bases[""], p, tmp_path)
                        for p in grid(args.modes, args.delays, [1], [""], args.unlocks))
    assert (locked.si_second_step, locked.si_output_scale) == (False, 1.0)
    assert (unlocked.si_second_step, unlocked.si_output_scale) == (True, 0.3)


def test_aggregate_keeps_unlocked_runs_apart():
    rows = [{"variant": "", "mode": "cdni", "unlock": u, "grad_delay": 1, "input_delay": k,
             "seed": 1, "status": "completed", "final_loss": loss, "train_accuracy": 0.5,
             "staleness_mean": 1.0}
            for u, k, loss in (("none", 0, 1.0), ("forward", 0, 2.0), ("forward", 1, 3.0))]
    agg = aggregate(rows)
    assert [(a["mode"], a["loss_mean"]) for a in agg] == [
        ("cdni", 1.0), ("cdni unlocked, input delay 0", 2.0),
        ("cdni unlocked, input delay 1", 3.0)]


@pytest.mark.slow
def test_sweep_over_unlock_and_input_delay_runs_and_measures_it(tmp_path):
    out = tmp_path / "sweep"
    done = sweep(out, "--modes", "cdni", "--grad-delay", "2", "--unlock", "none,forward",
                 "--input-delay", "0,2", "--seeds", "1", "--epochs", "4", "--examples", "30",
                 "--in-process")
    assert done.returncode == 0, done.stderr
    rows = read_csv(out / "results.csv")
    assert [(r["unlock"], r["input_delay"]) for r in rows] == [
        ("none", "0"), ("forward", "0"), ("forward", "2")]
    assert all(r["status"] == "completed" for r in rows)
    assert rows[0]["si_cosine_mean"] == "" and float(rows[1]["si_cosine_mean"]) > 0
    # 12 batches: the forward staleness is the delay but for the last 2 batches (1, then 0)
    assert float(rows[2]["input_staleness_mean"]) == pytest.approx((10 * 2 + 1) / 12)
    assert float(rows[1]["input_staleness_mean"]) == 0.0
    assert "| cdni unlocked, input delay 2 | 2 | 1 |" in (out / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("argv, flag", [
    (["--unlock", "forward", "--modes", "backprop"], "--input-delay"),   # nothing can run
    (["--unlock", "forward", "--grad-delay", "0", "--input-delay", "1"], "--input-delay"),
    (["--unlock", "sideways"], "--unlock"),
    (["--unlock", "forward", "--input-delay", "-1"], "--input-delay"),
])
def test_sweep_rejects_a_grid_that_cannot_unlock_in_one_line(tmp_path, argv, flag):
    done = sweep(tmp_path / "s", *argv)
    assert done.returncode == 2 and f"argument {flag}: " in done.stderr
    assert done.stderr.count("\n") == 1 and not (tmp_path / "s").exists()


def test_axes_expand_into_a_variant_per_combination():
    assert parse_axis("link-delay=0 5 20") == ("link-delay", ["0", "5", "20"])
    assert parse_axis("--slow=2:3") == ("slow", ["2:3"])
    for bad in ("layers", "layers=", "=3 6", "Layers=3", "link delay=1"):
        with pytest.raises(ValueError, match="expected OPTION=V1 V2"):
            parse_axis(bad)
    axes = [("link-delay", ["0", "5"]), ("slow", ["2:3"])]
    assert expand_axes([], axes) == [
        ("link-delay0-slow2_3", ["--link-delay", "0", "--slow", "2:3"]),
        ("link-delay5-slow2_3", ["--link-delay", "5", "--slow", "2:3"])]
    assert expand_axes([("fast", ["--step-ms", "0.5"]), ("slow", [])], axes[:1]) == [
        ("fast-link-delay0", ["--step-ms", "0.5", "--link-delay", "0"]),
        ("fast-link-delay5", ["--step-ms", "0.5", "--link-delay", "5"]),
        ("slow-link-delay0", ["--link-delay", "0"]),
        ("slow-link-delay5", ["--link-delay", "5"])]


def test_a_sweep_over_virtual_time_axes_sets_each_points_options():
    from pipeline.run.cli import parse_sweep
    a = parse_sweep(["--simulate", "--axis", "link-delay=0 5", "--axis", "layers=3 6",
                     "--modes", "cdni", "--grad-delay", "0", "--seeds", "1"])
    got = {name: (c.simulate, c.link_delay_ms, c.layers) for name, c in a.bases.items()}
    assert got == {"link-delay0-layers3": (True, 0.0, 3), "link-delay0-layers6": (True, 0.0, 6),
                   "link-delay5-layers3": (True, 5.0, 3), "link-delay5-layers6": (True, 5.0, 6)}
    with pytest.raises(SystemExit):
        parse_sweep(["--axis", "grad-delay=1 2"])  # an axis of the grid's own
