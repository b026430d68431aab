"""Tests for pipeline.run.summary: after a resume the progress line's rate
counts this process's batches, summary.json and the closing line count the
whole run as the layer table does, and a run that did not finish says how
to go on or that it cannot."""
from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.run.rundir import RunDir
from pipeline.run.summary import (Progress, build_summary, close_run, resume_command,
                                  resume_hint, table)

pytestmark = pytest.mark.timeout(30)

RESUMED = Config(start_epoch=400, epochs=800)  # the addition task: 10 batches an epoch


def _epoch(epoch, elapsed):
    return {"event": "epoch", "epoch": epoch, "loss": 0.03, "accuracy": 1.0,
            "elapsed_s": elapsed}


def test_the_rate_after_a_resume_counts_this_processes_batches():
    out = io.StringIO()
    p = Progress(RESUMED, out)
    assert p.epochs_done == 400  # a run cut short at once has done what its checkpoint did
    p.epoch(_epoch(800, 10.0))
    # 400 epochs of 10 batches in 10 s: 400 batches/s, not the 800 of the whole run
    assert out.getvalue() == ("epoch 800/800  loss   0.0300  exact 100.0 %      400 batches/s"
                              "    10.0 s\n")


def _layer(forward):
    return {"index": 1, "role": "layer1", "forward_batches": forward, "sg_updates": forward,
            "true_gradients": forward, "decode_errors": 0,
            "staleness_steps": {"mean": 0.0, "max": 0, "count": forward}}


@pytest.mark.parametrize("cfg, final, epochs_done, want", [
    (Config(), {"batches": 8000, "train_s": 10.0}, 800, (8000, 8000, 800.0)),
    (RESUMED, {"batches": 4000, "train_s": 5.0}, 800, (8000, 4000, 800.0)),
    (RESUMED, None, 500, (5000, 1000, None)),   # cut short: the finished epochs tell
    (RESUMED, None, 400, (4000, 0, None))])
def test_batches_count_the_whole_run_and_the_rate_this_process(cfg, final, epochs_done, want):
    s = build_summary(cfg, status="completed" if final else "interrupted", run_id="r",
                      wall_s=6.0, final=final, layers=[_layer(want[0])],
                      epochs_done=epochs_done)
    assert (s["batches"], s["process_batches"], s["batches_per_s"]) == want
    assert s["start_epoch"] == cfg.start_epoch


def test_the_closing_line_agrees_with_the_layer_table_after_a_resume():
    s = build_summary(RESUMED, status="completed", run_id="r", wall_s=6.0,
                      final={"batches": 4000, "train_s": 5.0, "final_loss": 0.03,
                             "train_accuracy": 1.0}, layers=[_layer(8000)], epochs_done=800)
    lines = table(s, "RUN").splitlines()
    assert lines[1] == ("  cdni (pipeline), 800/800 epochs, 8000 batches (4000 since the "
                        "resume at epoch 401), 6.0 s wall, 800 batches/s")
    assert lines[-1].split()[2] == "8000"


@pytest.mark.parametrize("status, checkpointed, want", [
    ("completed", True, None), ("completed", False, None),
    ("interrupted", True, "  to go on from its last checkpoint: CMD"),
    ("failed", True, "  to go on from its last checkpoint: CMD"),
    ("interrupted", False, "  it cannot be resumed: it has no checkpoint "
                           "(--checkpoint-every N saves one every N epochs)")])
def test_resume_hint_table(status, checkpointed, want):
    assert resume_hint(status, "CMD", checkpointed) == want


def test_an_in_process_run_is_never_resumable():
    assert resume_hint("interrupted", "CMD", False, in_process=True) == \
        "  it cannot be resumed: the in-process reference keeps no checkpoints"
    assert resume_hint("completed", "CMD", False, in_process=True) is None


@pytest.mark.parametrize("how, want", [
    ("local", "python launch.py --resume 'runs/a b'"),
    ("engine", "python launch.py --resume 'runs/a b' (under the same engine: "
               "mpiexec -n N ..., srun ...)"),
    ("cluster", "python launch.py --cluster c.toml --resume 'runs/a b'")])
def test_resume_command_table(how, want):
    assert resume_command("runs/a b", how, "c.toml") == want


@pytest.mark.parametrize("checkpointed", [True, False])
def test_an_interrupted_run_says_how_to_go_on_after_its_table(tmp_path, checkpointed):
    rd = RunDir(tmp_path / "run")
    if checkpointed:
        rd.write_checkpoint(2, "layer1", {}, {"w": np.ones(1)})
        rd.commit_checkpoint(2)
    out = io.StringIO()
    s = build_summary(Config(), status="interrupted", run_id="r", wall_s=1.0, final=None,
                      layers=[], epochs_done=2)
    assert close_run(rd, s, out) == 130
    last = out.getvalue().splitlines()[-1]
    assert last == resume_hint("interrupted", resume_command(str(rd.path)), checkpointed)


class _Pty(io.StringIO):
    def isatty(self) -> bool:  # what Open MPI gives rank 0 even when its output is a file
        return True


@pytest.mark.parametrize("terminal, want", [
    (None, "\r"),        # a terminal of the user's: the line redraws in place
    (False, "epoch  10/100")])  # the engine's pty: a plain line every tenth of the run
def test_progress_redraws_only_on_the_users_terminal(terminal, want):
    out = _Pty()
    p = Progress(Config(epochs=100), out, terminal)
    for e in range(1, 101):
        p.epoch(_epoch(e, e))
    text = out.getvalue()
    assert want in text
    if terminal is False:
        assert "\r" not in text and len(text.splitlines()) == 10
