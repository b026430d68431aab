"""The supervisor's handling of failures: a worker that raises, a supervisor
that is killed outright."""
from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.config import Config
from pipeline.run.rundir import RunDir
from tests.conftest import _alive, assert_no_orphans
from commands import supervisor

pytestmark = pytest.mark.timeout(60)
ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_worker_exception_fails_the_run_naming_role_and_error(tmp_path, monkeypatch):
    real = supervisor.module_of
    monkeypatch.setattr(supervisor, "module_of",
                        lambda role: "tests.faulty_worker" if role == "layer2" else real(role))
    cfg = Config(epochs=100000, quiet=True, run_dir=str(tmp_path / "run"))
    out = io.StringIO()
    code = supervisor.Supervisor(cfg, RunDir(cfg.run_dir), "feedc0ffee00", out).run()
    assert code == 1
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"]["role"] == "layer2"
    assert "RuntimeError: injected failure in the layer math" in summary["error"]["message"]
    assert "failed role layer2" in out.getvalue()
    pids = json.loads((tmp_path / "run" / "config.json").read_text())["processes"]
    assert not [r for r, p in pids.items() if _alive(p["pid"])]


@pytest.mark.slow
def test_killing_the_supervisor_leaves_no_orphans(launch):
    run = launch("--epochs", "100000", "--quiet")
    run.wait_started()
    run.wait_training()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(5)
    # The workers notice their parent is gone (kernel signal or parent check).
    assert_no_orphans(run)


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_run_that_stops_moving_is_failed_naming_the_role(tmp_path, monkeypatch):
    """layer2 answers every heartbeat but handles nothing: the others fill
    their queues and wait on it. The watchdog ends the run within its limit."""
    real = supervisor.module_of
    monkeypatch.setattr(supervisor, "module_of",
                        lambda role: "tests.stalled_worker" if role == "layer2" else real(role))
    cfg = Config(epochs=100000, quiet=True, watchdog=3.0, run_dir=str(tmp_path / "run"))
    started = time.monotonic()
    code = supervisor.Supervisor(cfg, RunDir(cfg.run_dir), "feedc0ffee01", io.StringIO()).run()
    assert code == 1 and time.monotonic() - started < 30
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["error"]["role"] == "layer2"
    assert "stopped making progress" in summary["error"]["message"]
    assert "layer2 on localhost stopped first, after 0 messages" in summary["error"]["message"]
    pids = json.loads((tmp_path / "run" / "config.json").read_text())["processes"]
    assert not [r for r, p in pids.items() if _alive(p["pid"])]


@pytest.fixture
def sup(tmp_path):
    """A supervisor that is not running: its message handling, driven directly."""
    from pipeline.net.transport import remove_private_dir
    cfg = Config(epochs=6, checkpoint_every=2, quiet=True, run_dir=str(tmp_path / "run"))
    s = supervisor.Supervisor(cfg, RunDir(cfg.run_dir), "feedc0ffee02", io.StringIO())
    yield s
    s.router.close()
    s.ctx.term()
    remove_private_dir(s.ipc_dir)
    s.rd.close()


def _state(cfg, role):
    from pipeline.layers.state import layer_state
    from pipeline.layers.build import make_hidden, make_output
    layer = make_output(cfg) if role == "output" else make_hidden(cfg, int(role[-1]))
    return layer_state(layer)


def take(sup, msg) -> None:
    """Hand the supervisor's coordinator ``msg`` from a proven role, as its
    receive loop does (with its size on the wire), and carry out what it says."""
    from pipeline.wire import codec as wire
    sup._do(sup.coord.take(msg, sum(memoryview(f).nbytes for f in wire.encode(msg))))


def test_checkpoints_out_of_turn_or_unfit_are_dropped_and_counted(sup, tmp_path):
    from pipeline.wire.protocol import Message, Speaker
    say = Speaker("feedc0ffee02", "layer1")
    state, arrays = _state(sup.cfg, "layer1")
    bad_shape = dict(arrays, w=np.zeros((1, 128), arrays["w"].dtype))
    forged = [
        Message("checkpoint", "feedc0ffee02", -1, "layer1", 0, (), {}),   # no epoch
        say.state(999999, state, arrays),       # no such epoch in this run
        say.state(0, state, arrays),            # epoch 0 is not a checkpoint epoch
        say.state(5, state, arrays),            # the last epoch has none
        say.state(1, state, bad_shape),         # due, but not this layer's shape
        Speaker("feedc0ffee02", "source").state(1, state, arrays),  # the source has none
    ]
    forged[0] = Message(forged[1].kind, forged[1].run_id, -1, "layer1", 0, forged[1].arrays,
                        {k: v for k, v in forged[1].meta.items() if k != "epoch"})
    for msg in forged:
        take(sup, msg)
    assert sup.coord.refused == {"layer1": 5, "source": 1}
    assert not (tmp_path / "run" / "checkpoints").exists()
    take(sup, say.state(1, state, arrays))     # the real one
    assert (tmp_path / "run" / "checkpoints").is_dir() and sup.coord.checkpoints == {1: {"layer1"}}
    take(sup, say.state(1, state, arrays))     # the same again
    assert sup.coord.refused["layer1"] == 6


def test_done_with_weights_unfit_for_the_layer_is_dropped(sup):
    from pipeline.wire.protocol import Speaker
    say = Speaker("feedc0ffee02", "layer2")
    _, arrays = _state(sup.cfg, "layer2")
    weights = {k: v for k, v in arrays.items() if k in _fresh_weights(sup.cfg, "layer2")}
    take(sup, say.done({}, 0, 1.0, 1.0, {"w": np.zeros((3, 3))}))
    assert "layer2" not in sup.coord.done and sup.coord.refused == {"layer2": 1}
    take(sup, say.done({}, 0, 1.0, 1.0, weights))
    assert "layer2" in sup.coord.done
    take(sup, say.done({}, 0, 1.0, 1.0, weights))   # a second done
    assert sup.coord.refused == {"layer2": 2}


def _fresh_weights(cfg, role):
    from pipeline.layers.build import make_hidden
    return make_hidden(cfg, int(role[-1])).weights()


def test_metric_floods_and_giants_are_dropped_not_written(sup, tmp_path):
    from pipeline.coord.coordinator import METRIC_BURST, METRIC_PER_EPOCH
    from pipeline.wire.protocol import Message, Speaker
    say = Speaker("feedc0ffee02", "layer1")
    # too large: 70 KB on the wire (a header alone cannot be: wire.decode
    # refuses headers over 64 KiB; the bytes come as an array)
    take(sup, Message("metric", "feedc0ffee02", -1, "layer1", 0, (np.zeros(8750),),
                      {"event": "log"}))
    assert sup.coord.refused == {"layer1": 1}
    allowed = METRIC_BURST + METRIC_PER_EPOCH   # no epoch done yet
    for i in range(allowed + 500):
        take(sup, say.metric({"event": "log", "text": f"line {i}"}))
    assert sup.coord.refused == {"layer1": 1 + 500}
    sup.rd.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == allowed and lines[-1].endswith(f'"line {allowed - 1}"}}')


@pytest.mark.slow
@pytest.mark.timeout(60)
def test_a_worker_whose_supervisor_died_before_it_started_leaves_at_once(tmp_path):
    """The kernel's parent-death signal is set only once a worker's imports
    are done (about a second): a supervisor gone before that is never
    signalled, and the worker used to wait 600 s for a config."""
    middle = subprocess.run(
        [sys.executable, "-c",
         "from commands.spawn import spawn, worker_env\n"
         "p = spawn('workers.layer', 'layer1', ['--control', 'ipc:///nonexistent/control'],"
         " worker_env(1))\n"
         "print(p.pid)\n"],  # and exit at once, leaving the worker behind
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    worker = int(middle.stdout.split()[-1])
    deadline = time.monotonic() + 20
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling interval of a condition, not a synchronisation
    alive = _alive(worker)
    if alive:
        os.kill(worker, signal.SIGKILL)
    assert not alive, "the orphaned worker is still waiting"
