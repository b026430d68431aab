"""The supervisor's handling of failures: a worker that raises, a supervisor
that is killed outright."""
from __future__ import annotations

import io
import json
import os
import signal
import time

import pytest

from pipeline.config import Config
from pipeline.rundir import RunDir
from tests.conftest import _alive, assert_no_orphans
from commands import supervisor

pytestmark = pytest.mark.timeout(60)


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


def test_killing_the_supervisor_leaves_no_orphans(launch):
    run = launch("--epochs", "100000", "--quiet")
    run.wait_started()
    run.wait_training()
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(5)
    # The workers notice their parent is gone (kernel signal or parent check).
    assert_no_orphans(run)


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
