"""Shared fixtures: run launch.py as a real process, wait on its files, and make
sure every process it started is gone afterwards; and the guard of the quick
tier: a test not marked ``slow`` may start no process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _quick_tests_start_no_process(request, monkeypatch):
    """The quick tier (``-m "not slow"``) starts no process: a test that
    does must be marked ``slow``, or it fails here saying so."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args, **kwargs):
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it "
                             "@pytest.mark.slow (the quick tier starts none)")
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    monkeypatch.setattr(os, "fork", refuse)


def _alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped, counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def run_launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """``python launch.py ARGS`` run to its end, its output captured."""
    return subprocess.run([sys.executable, str(ROOT / "launch.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a refused command prints: exit status 2, one line on stderr."""
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


class Launch:
    """One ``python launch.py ...`` run in its own process group."""

    def __init__(self, run_dir: Path, args: list[str]):
        self.run_dir = run_dir
        self.proc = subprocess.Popen(
            [sys.executable, str(ROOT / "launch.py"), "--run-dir", str(run_dir), *args],
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True)  # our signals go to launch.py alone
        self.out = self.err = ""

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> None:
        """Poll a condition on the run's files (a handshake on what the run
        has written), failing if the run ends or time runs out first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.proc.poll() is not None:
                self.finish()
                raise AssertionError(f"launch.py exited ({self.proc.returncode}) before {what}:"
                                     f"\n{self.out}\n{self.err}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            time.sleep(0.02)  # polling interval of the condition, not a synchronisation

    def wait_started(self) -> dict:
        """Until every worker is up and connected (config.json is written then)."""
        self.wait_for(lambda: (self.run_dir / "config.json").exists(), "config.json")
        return self.config()

    def wait_training(self) -> None:
        """Until the first epoch has reached the output layer."""
        def epoch_logged() -> bool:
            path = self.run_dir / "metrics.jsonl"
            return path.exists() and '"event": "epoch"' in path.read_text()
        self.wait_for(epoch_logged, "the first epoch")

    def config(self) -> dict:
        return json.loads((self.run_dir / "config.json").read_text())

    def worker_pids(self) -> dict[str, int]:
        return {role: p["pid"] for role, p in self.config()["processes"].items()}

    def finish(self, timeout: float = 90.0) -> int:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise
        self.out += out
        self.err += err
        return self.proc.returncode

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def weights(self, role: str) -> dict[str, np.ndarray]:
        with np.load(self.run_dir / "weights" / f"{role}.npz") as z:
            return {k: z[k] for k in z.files}

    def kill(self) -> None:
        """Last resort for a failing test: end the run's process group (ours)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def kill_and_resume(run: Launch, after_epoch: int, timeout: float = 90) -> Launch:
    """SIGKILL the supervisor of ``run`` once a checkpoint after epoch
    ``after_epoch`` (1-based) is written; check nothing of it survives;
    resume it with ``--resume`` to its end. Returns the finished resumed run."""
    run.wait_started()
    path = run.run_dir / "checkpoints" / "latest.json"
    run.wait_for(lambda: path.exists() and json.loads(path.read_text())["epochs_done"] >= after_epoch,
                 f"a checkpoint after epoch {after_epoch}")
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    assert_no_orphans(run)
    resumed = Launch(run.run_dir, ["--resume", str(run.run_dir), "--quiet"])
    try:
        assert resumed.finish(timeout=timeout) == 0, resumed.err
    finally:
        resumed.kill()
    assert_no_orphans(resumed)
    return resumed


def assert_no_orphans(run: Launch) -> None:
    if not (run.run_dir / "config.json").exists():
        return
    pids = run.worker_pids()
    # Workers whose supervisor died get SIGTERM from the kernel and exit
    # within 3 s at most (then SIGALRM ends them); allow for a slow machine.
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = {r: p for r, p in pids.items() if _alive(p)}
    assert not alive, f"processes left running: {alive}"


@pytest.fixture
def launch(tmp_path):
    """``launch(*args, name=...)`` starts a run; every run is checked for
    orphans and cleaned up when the test ends, pass or fail."""
    runs: list[Launch] = []

    def start(*args: str, name: str = "run") -> Launch:
        run = Launch(tmp_path / name, list(args))
        runs.append(run)
        return run

    yield start
    for run in runs:
        if run.proc.poll() is None:
            run.proc.send_signal(signal.SIGINT)
            try:
                run.proc.wait(10)
            except subprocess.TimeoutExpired:
                run.kill()
        for stream in (run.proc.stdout, run.proc.stderr):
            if stream is not None:
                stream.close()
    for run in runs:
        assert_no_orphans(run)


# The network-namespace hosts fixture, for every test that needs hosts (imported last:
# tests/netns.py takes _alive from here).
from tests.netns import hosts  # noqa: E402,F401
