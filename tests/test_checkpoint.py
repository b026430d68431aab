"""Checkpoints and --resume: a run interrupted (or killed) after a checkpoint
goes on from it, to the same weights, bit for bit, as a run never stopped."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from pipeline.config import Config
from tests.conftest import Launch, assert_no_orphans, run_launch
from tests.test_pipeline import assert_bit_identical, reference_weights

pytestmark = pytest.mark.timeout(120)


def latest(run) -> int | None:
    path = run.run_dir / "checkpoints" / "latest.json"
    return json.loads(path.read_text())["epoch"] if path.exists() else None


ARGS = ["--lockstep", "--epochs", "60", "--checkpoint-every", "10", "--seed", "6",
        "--update-prob", "0.8", "--drop-prob", "0.1", "--quiet"]


@pytest.mark.parametrize("mode,how", [
    ("cdni", signal.SIGINT), ("cdni", signal.SIGKILL), ("dni", signal.SIGKILL),
    ("backprop", signal.SIGKILL), ("async-backprop", signal.SIGINT)])
def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(launch, mode, how):
    """Every mode: what a checkpoint holds differs (SG modules and their
    versions, or none), and each must come back whole."""
    run = launch(*ARGS, "--mode", mode)
    run.wait_started()
    run.wait_for(lambda: (latest(run) or 0) >= 19, "a checkpoint after epoch 20")
    if how == signal.SIGKILL:   # a crash: no summary, no clean-up
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
    else:
        run.proc.send_signal(how)
        assert run.finish(timeout=10) == 130
    assert_no_orphans(run)
    ck = latest(run)
    assert ck is not None and ck < 59
    # Whatever was cut short, the checkpoint in force is whole.
    d = run.run_dir / "checkpoints" / f"epoch-{ck:06d}"
    for role in ("layer1", "layer2", "output"):
        with np.load(d / f"{role}.npz") as z:
            assert "w" in z.files
        assert json.loads((d / f"{role}.json").read_text())["clock"] == (ck + 1) * 10

    resumed = Launch(run.run_dir, ["--resume", str(run.run_dir), "--quiet"])
    try:
        assert resumed.finish(timeout=60) == 0, resumed.err
    finally:
        resumed.kill()
    summary = resumed.summary()
    assert summary["status"] == "completed" and summary["epochs_done"] == 60
    cfg = Config(lockstep=True, epochs=60, seed=6, update_prob=0.8, drop_prob=0.1, mode=mode)
    assert_bit_identical(resumed, reference_weights(cfg))
    # The counters run on across the resume: every batch is there once.
    for layer in summary["layers"]:
        assert layer["forward_batches"] == cfg.total_batches
    assert_no_orphans(resumed)


def test_resume_refuses_what_cannot_be_resumed(launch, tmp_path):
    done = launch("--in-process", "--epochs", "2", "--quiet", name="done")
    assert done.finish() == 0
    again = Launch(tmp_path / "x", ["--resume", str(done.run_dir)])
    assert again.finish() == 2 and "completed" in again.err
    nockpt = launch("--epochs", "2", "--quiet", name="nockpt")
    assert nockpt.finish() == 0
    (nockpt.run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    again = Launch(tmp_path / "y", ["--resume", str(nockpt.run_dir)])
    assert again.finish() == 2 and "latest.json" in again.err
    missing = Launch(tmp_path / "z", ["--resume", str(tmp_path / "nothing")])
    assert missing.finish() == 2 and "not a run directory" in missing.err


def test_a_run_directory_named_like_the_flag_is_not_a_resume(tmp_path):
    """Only the --resume option resumes; a path that merely contains the word
    once made launch.py crash looking for a checkpoint."""
    run_dir = tmp_path / "sweep--resume-1"
    done = run_launch("--in-process", "--epochs", "2", "--quiet", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
