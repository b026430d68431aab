"""The report command and the plots: a hand-written run directory in the
formats launch.py writes, one real run, and a hand-made sweep."""
from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from commands import report as report_command
from pipeline.run import plots, report
from pipeline.run.finished import load_run

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

needs_matplotlib = pytest.mark.skipif(not plots.available(), reason=plots.HINT)


def _hidden(index: int, hist: dict[str, int], cosine: float, rel_err: float) -> dict:
    count = sum(hist.values())
    mean = sum(int(k) * v for k, v in hist.items()) / count
    return {"index": index, "role": f"layer{index}", "forward_batches": 40,
            "weight_updates": 40, "skipped_updates": 0, "sg_updates": count,
            "true_gradients": count, "dropped_gradients": 3, "lost_gradients": 1,
            "expired_gradients": 2,
            "staleness_steps": {"mean": mean, "max": max(int(k) for k in hist), "count": count},
            "staleness_hist": hist, "staleness_s": {"mean": 0.0086, "max": 0.0153},
            "sg_quality": {
                "sg_loss": {"mean": 0.166, "p10": 0.0008, "p50": 0.114, "p90": 0.421,
                            "count": count},
                "cosine": {"mean": cosine, "p10": 0.751, "p50": 0.877, "p90": 0.937,
                           "count": count},
                "rel_err": {"mean": rel_err, "p10": 0.445, "p50": 0.563, "p90": 0.741,
                            "count": count}},
            "decode_errors": 0}


SUMMARY = {
    "status": "completed", "mode": "cdni", "in_process": False, "lockstep": False,
    "epochs": 4, "epochs_done": 4, "batches": 40, "final_loss": 4.4817,
    "train_accuracy": 0.05, "batches_per_s": 900.0, "wall_s": 2.1, "run_id": "abc123",
    "layers": [
        _hidden(1, {"0": 1, "1": 2, "2": 7, "3": 9, "4": 12, "5": 3, "6": 2, "7": 1},
                0.854, 0.6021),
        _hidden(2, {"0": 20, "1": 11, "2": 3}, 0.9136, 0.4402),
        {"index": 3, "role": "output", "forward_batches": 40, "weight_updates": 40,
         "skipped_updates": 0, "sg_updates": 0, "true_gradients": 40, "dropped_gradients": 0,
         "lost_gradients": 0, "expired_gradients": 0,
         "staleness_steps": {"mean": 0.0, "max": 0, "count": 40}, "staleness_hist": {"0": 40},
         "staleness_s": {"mean": 0.0, "max": 0.0}, "sg_quality": None, "decode_errors": 0},
    ],
}


def _events(epochs: int = 4, sg: bool = True, base: int = 1) -> list[dict]:
    """A run's events; ``base`` 0: as runs wrote them before they counted
    epochs from 1 (no numbering line, the N-th epoch ``"epoch": N - 1``)."""
    out = [{"event": "numbering", "epoch_base": 1}] if base == 1 else []
    for ep in range(epochs):
        out.append({"event": "epoch", "role": "output", "epoch": ep + base,
                    "loss": 6.47 / (ep + 1),
                    "accuracy": 0.01 * ep, "batches": 10, "elapsed_s": 0.01 * (ep + 1),
                    "batches_per_s": 4202.1})
        for i, role in ((2, "layer2"), (1, "layer1")):
            out.append({"event": "layer", "role": role, "epoch": ep + base, "gradients": 10,
                        "staleness_steps_mean": 5.5 / i, "staleness_steps_max": 7,
                        "staleness_s_mean": 0.0131 / i + 0.001 * ep, "staleness_s_max": 0.0154,
                        "sg_loss": 0.0035 if sg else None,
                        # the first epoch's cosine can be null (no gradient norm yet)
                        "sg_cosine": (None if ep == 0 else 0.3 * i + 0.1 * ep) if sg else None,
                        "sg_rel_err": (1.0 - 0.1 * ep * i) if sg else None,
                        "elapsed_s": 0.01 * (ep + 1)})
    out.append({"event": "decode_error", "role": "layer1", "reason": "bad magic"})
    out.append({"event": "final", "role": "output", "final_loss": 4.4817,
                "train_accuracy": 0.05, "batches": 40, "train_s": 0.04})
    return out


def make_run(path: Path, summary: dict = SUMMARY, events: list[dict] | None = None) -> Path:
    """A run directory as launch.py leaves it, plus one half-written line."""
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(summary, indent=2))
    (path / "config.json").write_text(json.dumps({"run_id": summary["run_id"],
                                                  "config": {"layers": 3, "mode": "cdni"},
                                                  "processes": {}}))
    lines = [json.dumps(e) for e in (_events() if events is None else events)]
    lines.insert(3, '{"event": "layer", "role": "lay')  # a run killed mid-write
    (path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return path


def assert_png(path: Path) -> None:
    import matplotlib.image
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE) and len(data) > 10_000
    h, w, channels = matplotlib.image.imread(path).shape
    assert 400 <= h <= 2000 and 800 <= w <= 2000 and channels in (3, 4), (h, w, channels)


# --- text_report -----------------------------------------------------------------------------

@pytest.mark.slow
def test_text_report_shows_the_numbers_of_the_run(tmp_path):
    text = report.text_report(load_run(make_run(tmp_path / "run")))
    for expected in ["run completed", "cdni (pipeline)", "4/4 epochs", "final loss 4.4817",
                     "exact sums 5.0 %", "1 line(s) not valid JSON",
                     "layer 1 layer1", "layer 2 layer2", "layer 3 output",
                     "gradients applied 37", "dropped 3", "lost 1", "expired 2",
                     "staleness 3.38 mean, 7 max", "8.60 ms mean",
                     "cosine mean 0.854 p50 0.877", "rel_err mean 0.602 p50 0.563",
                     "cosine mean 0.914", "rel_err mean 0.440"]:
        assert expected in text, f"{expected!r} not in:\n{text}"
    # layer 2's text histogram: a line per staleness, the count at the end,
    # the longest bar for the largest count
    layer2 = text.split("layer 2 layer2")[1].split("layer 3 output")[0]
    hist = [ln.strip() for ln in layer2.splitlines() if " | " in ln]
    assert [h.split(" | ")[0] for h in hist] == ["0", "1", "2"]
    assert [h.split()[-1] for h in hist] == ["20", "11", "3"]
    assert hist[0].count("#") == report.HIST_WIDTH > hist[1].count("#") > hist[2].count("#") > 0
    # the output layer has no SG, so exactly two SG lines
    assert text.count("    SG ") == 2


@pytest.mark.slow
def test_text_report_of_a_failed_run_without_results(tmp_path):
    summary = {**SUMMARY, "status": "failed", "final_loss": None, "train_accuracy": None,
               "batches_per_s": None, "error": {"role": "layer2", "message": "boom"}}
    text = report.text_report(load_run(make_run(tmp_path / "run", summary)))
    assert "run failed" in text and "failed role layer2: boom" in text
    assert "final loss n/a" in text and "exact sums n/a" in text


# --- main ------------------------------------------------------------------------------------

@needs_matplotlib
def test_main_prints_the_report_and_writes_a_png(tmp_path):
    path = make_run(tmp_path / "run")
    out = io.StringIO()
    assert report_command.main(str(path), out) == 0
    assert "final loss 4.4817" in out.getvalue()
    assert str(path / "report.png") in out.getvalue()
    assert_png(path / "report.png")


@needs_matplotlib
def test_report_png_of_a_backprop_run_without_sg_or_histograms(tmp_path):
    layers = [{k: v for k, v in L.items() if k != "staleness_hist"} | {"sg_quality": None}
              for L in SUMMARY["layers"]]
    summary = {**SUMMARY, "mode": "backprop", "status": "interrupted", "final_loss": None,
               "train_accuracy": None, "layers": layers}
    path = make_run(tmp_path / "run", summary, _events(sg=False))
    assert report_command.main(path, io.StringIO()) == 0
    assert_png(path / "report.png")


def test_main_without_matplotlib_prints_the_hint_and_draws_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(plots, "available", lambda: False)
    path = make_run(tmp_path / "run")
    out = io.StringIO()
    assert report_command.main(path, out) == 0
    assert "final loss 4.4817" in out.getvalue()
    assert out.getvalue().rstrip().endswith(plots.HINT)
    assert not (path / "report.png").exists()


def test_main_on_a_bad_directory_says_why_and_returns_2(tmp_path, capsys):
    out = io.StringIO()
    assert report_command.main(tmp_path / "missing", out) == 2
    assert out.getvalue() == ""
    err = capsys.readouterr().err
    assert err.startswith("report: error: ") and "missing" in err


def test_plots_raise_the_hint_when_matplotlib_cannot_be_imported(tmp_path, monkeypatch):
    # None in sys.modules makes ``import matplotlib`` fail, imported before or not.
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert plots.available() is False
    with pytest.raises(RuntimeError, match="pip install"):
        plots.run_report(make_run(tmp_path / "run"))
    with pytest.raises(RuntimeError, match="pip install"):
        plots.sweep_plot(sweep_rows(), tmp_path / "sweep.png")


# --- sweep_plot ------------------------------------------------------------------------------

def sweep_rows() -> list[dict]:
    rows = []
    for k in (0, 1, 2, 4, 8, 16):
        rows.append({"mode": "cdni", "grad_delay": k, "accuracy_mean": max(0.0, 1 - 0.06 * k),
                     "accuracy_std": 0.02, "loss_mean": 0.03 * (1 + k), "loss_std": 0.01 * k,
                     "n": 3})
        rows.append({"mode": "async-backprop", "grad_delay": k,
                     "accuracy_mean": max(0.0, 1 - 0.2 * k), "accuracy_std": 0.05,
                     "loss_mean": 0.05 * 2 ** k, "loss_std": 0.04 * 2 ** k, "n": 3})
    rows.append({"mode": "backprop", "grad_delay": 0, "accuracy_mean": 0.99,
                 "accuracy_std": 0.01, "loss_mean": 0.04, "loss_std": 0.01, "n": 3})
    # a point whose every seed failed: no mean, nothing drawn, nothing raised
    rows.append({"mode": "dni", "grad_delay": 4, "accuracy_mean": None, "accuracy_std": None,
                 "loss_mean": None, "loss_std": None, "n": 0})
    return rows


@needs_matplotlib
def test_sweep_plot_writes_a_png(tmp_path):
    path = plots.sweep_plot(sweep_rows(), tmp_path / "out" / "sweep.png")
    assert path == tmp_path / "out" / "sweep.png"
    assert_png(path)


@needs_matplotlib
def test_sweep_plot_draws_a_panel_per_variant(tmp_path):
    rows = [{**r, "variant": v, "test_mean": r["accuracy_mean"], "test_std": r["accuracy_std"]}
            for v in ("L3-adam", "L3-sgd", "L6-adam", "L6-sgd", "extra") for r in sweep_rows()]
    path = plots.sweep_plot(rows, tmp_path / "variants.png")
    assert_png(path)
    from PIL import Image  # matplotlib's own dependency
    with Image.open(path) as one_row, Image.open(plots.sweep_plot(sweep_rows(),
                                                                  tmp_path / "one.png")) as plain:
        # five panels wrap onto a second row: a taller figure than the plain two panels
        assert one_row.size[1] > plain.size[1]


def test_sweep_plot_refuses_no_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        plots.sweep_plot([], tmp_path / "sweep.png")


# --- end to end ------------------------------------------------------------------------------

@pytest.mark.slow
@needs_matplotlib
def test_report_of_a_real_run(tmp_path):
    run_dir = tmp_path / "run"
    done = subprocess.run([sys.executable, "launch.py", "--in-process", "--quiet",
                           "--epochs", "30", "--grad-delay", "2", "--run-dir", str(run_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    out = io.StringIO()
    assert report_command.main(run_dir, out) == 0
    text = out.getvalue()
    assert "run completed" in text and "staleness 2.00 mean, 2 max" in text
    assert "not valid JSON" not in text
    assert_png(run_dir / "report.png")


@pytest.mark.slow
def test_text_report_shows_an_unlocked_layers_true_inputs(tmp_path):
    q = {"mean": 0.25, "p10": 0.1, "p50": 0.2, "p90": 0.4, "count": 3}
    layers = [dict(L) for L in SUMMARY["layers"]]
    layers[1].update(true_inputs=40, expired_inputs=1,
                     input_staleness_steps={"mean": 1.75, "max": 2, "count": 40},
                     input_staleness_hist={"2": 30, "1": 10},
                     si_quality={"cosine": {**q, "mean": 0.9876, "p50": 0.99},
                                 "rel_err": q, "si_loss": q})
    text = report.text_report(load_run(make_run(tmp_path / "run",
                                                       {**SUMMARY, "layers": layers})))
    layer2 = text.split("layer 2 layer2")[1].split("layer 3 output")[0]
    assert "true inputs 40   expired 1   forward staleness 1.75 mean, 2 max" in layer2
    assert ("synthetic input cosine mean 0.988 p50 0.990   rel_err mean 0.250 p50 0.200   "
            "si_loss mean 0.250 p50 0.200") in layer2
    hist = [ln.strip() for ln in layer2.split("forward staleness")[1].splitlines() if " | " in ln]
    assert [(h.split(" | ")[0], h.split()[-1]) for h in hist] == [("1", "10"), ("2", "30")]
    assert "true inputs" not in text.split("layer 2 layer2")[0]   # layer 1 is not unlocked
