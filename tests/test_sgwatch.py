"""Tests for pipeline.coord.sgwatch: the collapse rule and the per-layer tracking on
exact event tables; the warning and the figures reach summary.json, the
progress output and the closing table of a real run."""
from __future__ import annotations

import io
import json

import pytest

from pipeline.coord import sgwatch
from pipeline.config import Config
from pipeline.coord.sgwatch import SGWatch, collapsed
from pipeline.run.summary import Progress, build_summary, table
from tests.conftest import run_launch
from tests.test_classification import blobs

pytestmark = pytest.mark.timeout(60)


def ev(role, epoch, n, cos, rel, stale, norm=None):
    return {"event": "layer", "role": role, "epoch": epoch, "gradients": n, "sg_cosine": cos,
            "sg_rel_err": rel, "staleness_steps_mean": stale, "act_norm": norm}


@pytest.mark.parametrize("cos, rel, stale, want", [
    (0.1, None, 8.0, False), (0.1, 3.0, 8.0, False), (0.1, 3.01, 8.0, True),
    (0.29, 60.0, 0.5, True), (0.3, 60.0, 0.5, False),  # still pointing along: late noise
    (0.06, 2.28, 16.0, False),                           # a deep net's first epoch
    (0.0, 2.0, 1.0, False),                              # DNI's first module, never tracking
    (0.1, 60.0, 0.49, False), (-0.5, 0.9, 16.0, False)])
def test_collapse_rule_table(cos, rel, stale, want):
    assert collapsed(cos, rel, stale) is want


def test_tracking_and_one_warning_per_layer_over_windows():
    w = SGWatch(Config(grad_delay=8, lockstep=True))
    # two epochs of 100 gradients make a window; means weighted by gradients
    assert w.add(ev("layer2", 1, 100, 0.6, 0.8, 8.0, 3.0)) is None
    assert w.add(ev("layer2", 2, 100, 0.4, 1.0, 8.0, 5.0)) is None  # window: cos 0.5, rel 0.9
    assert w.add(ev("layer2", 3, 150, 0.1, 4.0, 8.0, 9.0)) is None  # half a window so far
    warning = w.add(ev("layer2", 4, 50, 0.5, 1.0, 8.0, 60.0))       # cos 0.2, rel 3.25
    assert warning is not None and warning.startswith("warning: layer2's synthetic gradients")
    assert "by epoch 4 (relative error 3.25, cosine 0.20 against 0.50 at best" in warning
    assert "8.0 steps stale itself" in warning
    assert "its activations grew 20-fold since the first epoch)" in warning
    assert warning.endswith("try --batchnorm, --sg-lookahead 1 or a smaller --grad-delay "
                            "(now 8) (docs/staleness.md)")
    # later collapses of the same layer say nothing more
    assert w.add(ev("layer2", 5, 200, 0.0, 9.0, 8.0, 90.0)) is None
    assert w.warnings == [warning]
    t = w.tracking()["layer2"]
    assert t == {"first_cosine": 0.6, "last_cosine": 0.0, "last_rel_err": 9.0,
                 "first_act_norm": 3.0, "last_act_norm": 90.0,
                 "best_cosine": pytest.approx(0.5), "best_epoch": 2,
                 "staleness_mean": 8.0, "collapsed_epoch": 4, "gradients": 600}


def test_no_warning_without_staleness_anywhere_and_none_for_layers_without_sg():
    w = SGWatch(Config())
    for epoch in range(1, 5):
        assert w.add(ev("layer1", epoch, 200, 0.0, 50.0, 0.0)) is None
    assert w.add({"event": "layer", "role": "layer1", "epoch": 6, "gradients": 200,
                  "sg_cosine": None, "sg_rel_err": None, "staleness_steps_mean": 3}) is None
    assert w.add({"event": "epoch", "role": "output", "epoch": 1}) is None
    assert w.warnings == [] and w.tracking()["layer1"]["collapsed_epoch"] is None


def test_staleness_of_another_layer_is_enough():
    """A module may collapse with little staleness of its own when the layer
    below runs ahead (seen free-running on MNIST)."""
    w = SGWatch(Config())
    w.add(ev("layer1", 1, 200, 0.5, 0.9, 2.0))
    warning = w.add(ev("layer2", 1, 200, 0.2, 3.2, 0.1))
    assert warning is not None and "0.1 steps stale itself, the stalest layer 2.0)" in warning
    assert "a smaller --max-inflight (now 8)" in warning


@pytest.mark.parametrize("kw, want", [
    (dict(), "try --batchnorm, --sg-lookahead 1 or a smaller --max-inflight (now 8)"),
    (dict(batchnorm=True, sg_lookahead=1.0, max_inflight=2),
     "try a smaller --max-inflight (now 2)"),
    (dict(batchnorm=True, sg_lookahead=1.0, lockstep=True, grad_delay=4),
     "try a smaller --grad-delay (now 4)"),
    (dict(batchnorm=True, sg_lookahead=1.0, lockstep=True), "see docs/staleness.md"),
    (dict(unlock="forward", layernorm=True),
     "try --batchnorm in place of --layernorm, --sg-lookahead 1 or a smaller --max-inflight "
     "(now 8)"),
])
def test_advice_names_only_what_the_run_does_not_use(kw, want):
    assert sgwatch.advice(Config(**kw)).startswith(want)


def test_summary_and_table_carry_tracking_and_warnings():
    cfg = Config(grad_delay=2, lockstep=True)
    w = SGWatch(cfg)
    w.add(ev("layer1", 1, 250, 0.7, 0.5, 2.0))
    w.add(ev("layer1", 2, 250, 0.1, 4.0, 2.0))
    counters = {"forward_batches": 500, "weight_updates": 500, "skipped_updates": 0,
                "sg_updates": 498, "true_gradients": 498, "dropped_gradients": 0,
                "lost_gradients": 0, "expired_gradients": 2,
                "staleness_steps": {"mean": 2.0, "max": 2, "count": 498},
                "staleness_hist": {"2": 498}, "staleness_s": {"mean": 0.0, "max": 0.0},
                "sg_quality": None}
    layers = [{"index": 1, "role": "layer1", **counters, "decode_errors": 0},
              {"index": 2, "role": "output", **counters, "decode_errors": 0}]
    s = build_summary(cfg, status="completed", run_id="x", wall_s=1.0, final=None,
                      layers=layers, watch=w)
    assert s["layers"][0]["sg_tracking"]["first_cosine"] == 0.7
    assert s["layers"][0]["sg_tracking"]["collapsed_epoch"] == 2
    assert s["layers"][1]["sg_tracking"] is None
    assert s["warnings"] == w.warnings and len(w.warnings) == 1
    text = table(s, "RUN")
    assert "sg cos 1st" in text and "sg cos last" in text
    row = [line for line in text.splitlines() if "layer1" in line and "  1 " in line][0]
    assert row.split()[-3:] == ["0.70", "0.10", "0"]
    assert text.splitlines()[-1] == "  " + w.warnings[0]


def test_progress_prints_a_warning_unless_quiet():
    out = io.StringIO()
    Progress(Config(), out).warn("warning: x")
    assert out.getvalue() == "warning: x\n"
    quiet = io.StringIO()
    Progress(Config(quiet=True), quiet).warn("warning: x")
    assert quiet.getvalue() == ""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["--in-process", "--lockstep"])
def test_a_run_that_staleness_breaks_says_so(tmp_path, where):
    """Adam at ten times the default step with 16 steps of delay and no batch
    norm: the top SG module's predictions run away on this problem."""
    data = blobs(tmp_path / "blobs.npz", seed=2, train=2000)
    run_dir = tmp_path / "run"
    done = run_launch("--dataset", data, "--hidden", "32", "--epochs", "4", "--batch-size", "20",
                      "--lr", "0.01", "--grad-delay", "16", "--no-batchnorm", where,
                      "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    s = json.loads((run_dir / "summary.json").read_text())
    assert len(s["warnings"]) >= 1 and "layer2's synthetic gradients" in s["warnings"][0]
    assert "try --batchnorm, --sg-lookahead 1" in s["warnings"][0]
    tracked = {L["role"]: L["sg_tracking"] for L in s["layers"]}
    assert tracked["layer2"]["collapsed_epoch"] is not None
    assert tracked["layer2"]["staleness_mean"] == 16.0
    assert tracked["output"] is None
    # said while it ran (the progress output) and again in the closing table
    assert done.stdout.count(s["warnings"][0]) == 2
    # the same run with no delay: no warning
    calm = tmp_path / "calm"
    done = run_launch("--dataset", data, "--hidden", "32", "--epochs", "4", "--batch-size", "20",
                      "--lr", "0.01", "--no-batchnorm", where, "--run-dir", str(calm))
    assert done.returncode == 0, done.stderr
    assert json.loads((calm / "summary.json").read_text())["warnings"] == []
    assert "warning" not in done.stdout

