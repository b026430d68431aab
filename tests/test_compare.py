"""Several runs compared (``launch.py report RUN_DIR RUN_DIR ...``): the
labels on an exact table, the curves and the side-by-side table of run
directories written by hand, the command with and without matplotlib, and
runs trained in-process."""
from __future__ import annotations

import io
import json
import stat
import sys
from pathlib import Path

import pytest

from commands import report as report_command
from pipeline.run import compare, plots
from pipeline.run.finished import load_run
from pipeline.run.subcommands import ReportArgs, parse_report
from tests.test_report import SUMMARY, _events, assert_png, make_run

pytestmark = pytest.mark.timeout(60)
needs_matplotlib = pytest.mark.skipif(not plots.available(), reason=plots.HINT)


# --- labels ----------------------------------------------------------------------------------

@pytest.mark.parametrize("configs, want", [
    # what differs, in the Config's order, named as the option is
    ([{"mode": "cdni", "seed": 1, "lr": 0.5}, {"mode": "dni", "seed": 2, "lr": 0.5}],
     ["mode=cdni seed=1", "mode=dni seed=2"]),
    ([{"seed": 3, "grad_delay": 4, "mode": "cdni"}, {"seed": 3, "grad_delay": 0, "mode": "cdni"}],
     ["grad-delay=4", "grad-delay=0"]),
    # nothing differs: the directories' names
    ([{"mode": "cdni"}, {"mode": "cdni"}], ["a", "b"]),
    # where a run went and how it reported are no difference
    ([{"run_dir": "runs/x", "quiet": True, "overwrite": True, "tensorboard": True,
       "start_epoch": 400, "features": 784},
      {"run_dir": "runs/y", "quiet": False, "overwrite": False, "tensorboard": False,
       "start_epoch": 0, "features": 0}], ["a", "b"]),
    # two the same among others: their names after the label
    ([{"seed": 1}, {"seed": 1}, {"seed": 2}], ["seed=1 (a)", "seed=1 (b)", "seed=2"]),
    # lists, flags and floats as the options are typed
    ([{"hidden": [128, 64], "batchnorm": False, "lr": 0.5},
      {"hidden": [256], "batchnorm": True, "lr": 0.001},
      {"hidden": [256], "batchnorm": True, "lr": 1e-05}],
     ["hidden=128,64 batchnorm=off lr=0.5", "hidden=256 batchnorm=on lr=0.001",
      "hidden=256 batchnorm=on lr=1e-05"]),
    # an older run's config.json without a field ran at its default
    ([{"grad_delay": 0}, {}], ["a", "b"]),
    ([{"grad_delay": 4}, {}], ["grad-delay=4", "grad-delay=0"]),
    # a field this version does not know comes last, null as n/a
    ([{"zeta": 1, "seed": 1}, {"zeta": None, "seed": 2}], ["seed=1 zeta=1", "seed=2 zeta=n/a"]),
])
def test_labels(configs, want):
    assert compare.labels(configs, ["a", "b", "c"][:len(configs)]) == want


def test_names_are_the_directories_or_the_paths_where_two_share_one():
    assert compare.names_of(["runs/a", "old/a", "runs/b/"]) == ["runs/a", "old/a", "b"]


# --- curves and the table --------------------------------------------------------------------

def test_curves_of_a_run_count_a_repeated_epoch_as_last_logged():
    events = [{"event": "epoch", "epoch": 1, "loss": 4.0, "accuracy": 0.0},
              {"event": "layer", "role": "layer1", "epoch": 1, "sg_cosine": 0.2},
              {"event": "layer", "role": "layer2", "epoch": 1, "sg_cosine": 0.6},
              {"event": "epoch", "epoch": 2, "loss": 3.0, "accuracy": 0.25,
               "test_loss": 3.5, "test_accuracy": 0.2},
              {"event": "layer", "role": "layer1", "epoch": 2, "sg_cosine": None},
              {"event": "layer", "role": "layer2", "epoch": 2, "sg_cosine": 0.8},
              # killed after epoch 3, resumed from the checkpoint of epoch 2
              {"event": "epoch", "epoch": 3, "loss": 9.0, "accuracy": 0.0},
              {"event": "epoch", "epoch": 3, "loss": 2.0, "accuracy": 0.5},
              {"event": "epoch", "epoch": True, "loss": 1.0},
              {"event": "final", "final_loss": 2.0}]
    assert compare.curves(events) == {
        "loss": ([1, 2, 3], [4.0, 3.0, 2.0]), "accuracy": ([1, 2, 3], [0.0, 0.25, 0.5]),
        "test_loss": ([2], [3.5]), "test_accuracy": ([2], [0.2]),
        "sg_cosine": ([1, 2], [pytest.approx(0.4), 0.8])}


def runs_by_hand(tmp_path: Path) -> list[Path]:
    """Three run directories: cdni seed 1, cdni seed 2 with a delay, and
    async-backprop (no SG) that failed."""
    out = []
    for name, config, summary in [
            ("cdni-1", {"mode": "cdni", "seed": 1, "grad_delay": 0}, SUMMARY),
            ("cdni-2", {"mode": "cdni", "seed": 2, "grad_delay": 4},
             {**SUMMARY, "final_loss": 0.25, "train_accuracy": 0.875, "batches_per_s": 512.0}),
            ("async", {"mode": "async-backprop", "seed": 1, "grad_delay": 0},
             {**SUMMARY, "mode": "async-backprop", "status": "failed", "final_loss": None,
              "train_accuracy": None, "epochs_done": 2,
              "layers": [{**L, "sg_quality": None} for L in SUMMARY["layers"]]})]:
        path = make_run(tmp_path / name, summary,
                        _events(sg=name != "async", epochs=2 if name == "async" else 4))
        (path / "config.json").write_text(json.dumps({"run_id": "x", "config": config}))
        out.append(path)
    return out


def test_the_table_puts_the_runs_side_by_side(tmp_path):
    paths = runs_by_hand(tmp_path)
    text = compare.text_table([load_run(p) for p in paths], compare.names_of(paths))
    lines = text.splitlines()
    assert lines[:4] == [
        "3 runs, labelled by what differs in their configurations:",
        f"  [1] mode=cdni seed=1 grad-delay=0            {paths[0]}",
        f"  [2] mode=cdni seed=2 grad-delay=4            {paths[1]}",
        f"  [3] mode=async-backprop seed=1 grad-delay=0  {paths[2]}"]
    rows = {ln[:20].strip(): ln[20:].split() for ln in lines[5:]}
    assert lines[4].split() == ["[1]", "[2]", "[3]"]
    assert rows["status"] == ["completed", "completed", "failed"]
    assert rows["epochs"] == ["4/4", "4/4", "2/4"]
    assert rows["final loss"] == ["4.4817", "0.2500", "n/a"]
    assert rows["exact sums"] == ["5.0", "%", "87.5", "%", "n/a"]
    assert rows["batches/s"] == ["900", "512", "900"]
    assert rows["layer1 stale mean"] == ["3.38", "3.38", "3.38"]
    assert rows["layer2 sg cos mean"] == ["0.914", "0.914", "n/a"]
    assert "test accuracy" not in rows and "output stale mean" not in rows


# --- the command -----------------------------------------------------------------------------

def test_parse_report_takes_several_run_directories(tmp_path, capsys):
    assert parse_report(["a"]) == ReportArgs(["a"], "compare.png")
    assert parse_report(["a", "b", "--out", "x/y.png"]) == ReportArgs(["a", "b"], "x/y.png")
    with pytest.raises(SystemExit) as exc:
        parse_report(["a", "--out", "y.png"])
    assert exc.value.code == 2
    assert capsys.readouterr().err == ("launch.py report: error: argument --out: only with "
                                       "several RUN_DIRs (one run's figure is "
                                       "RUN_DIR/report.png)\n")


@needs_matplotlib
def test_report_of_several_runs_prints_them_and_draws_one_figure(tmp_path):
    paths = runs_by_hand(tmp_path)
    out, png = io.StringIO(), tmp_path / "figures" / "three.png"
    assert report_command.run(ReportArgs([str(p) for p in paths], str(png)), out) == 0
    assert "[3] mode=async-backprop seed=1 grad-delay=0" in out.getvalue()
    assert out.getvalue().rstrip().endswith(f"plot: {png}")
    assert_png(png)
    assert stat.S_IMODE(png.stat().st_mode) == 0o600
    assert not any((p / "report.png").exists() for p in paths)  # the runs are left as they were


def test_without_matplotlib_the_table_is_printed_and_no_figure(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    paths = runs_by_hand(tmp_path)
    out = io.StringIO()
    assert report_command.compare(paths, tmp_path / "c.png", out) == 0
    assert "mode=cdni seed=2 grad-delay=4" in out.getvalue()
    assert out.getvalue().rstrip().endswith(plots.HINT)
    assert not (tmp_path / "c.png").exists()


def test_a_directory_that_is_no_finished_run_is_named(tmp_path, capsys):
    paths = runs_by_hand(tmp_path)
    (paths[1] / "summary.json").unlink()
    out = io.StringIO()
    assert report_command.compare(paths, tmp_path / "c.png", out) == 2
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and str(paths[1] / "summary.json") in err


@needs_matplotlib
def test_runs_trained_in_process_compared(tmp_path):
    from commands import supervisor
    from pipeline.run.cli import parse_run
    paths = []
    for mode in ("cdni", "async-backprop"):
        cfg, _ = parse_run(["--in-process", "--quiet", "--epochs", "6", "--mode", mode,
                            "--run-dir", str(tmp_path / mode)])
        assert supervisor.run(cfg, io.StringIO()) == 0
        paths.append(tmp_path / mode)
    out = io.StringIO()
    assert report_command.compare(paths, tmp_path / "c.png", out) == 0
    text = out.getvalue()
    assert "[1] mode=cdni " in text and "[2] mode=async-backprop " in text
    runs = [load_run(p) for p in paths]
    assert [len(compare.curves(r["events"])["loss"][0]) for r in runs] == [6, 6]
    assert "sg_cosine" not in compare.curves(runs[1]["events"])
    assert_png(tmp_path / "c.png")
