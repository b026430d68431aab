"""The private socket directory's leftovers (pipeline/net/sockdir.py): a
directory of ours whose owner is gone is removed, on an exact table of
owners, users, modes and names; and the directory a supervisor killed with
SIGKILL left behind goes with the next run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from pipeline.net import sockdir
from tests.conftest import _alive

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [
    pytest.mark.timeout(120),
    pytest.mark.skipif(not os.path.isdir("/proc/self/ns") or os.name != "posix",
                       reason="owners are judged by /proc's start times (Linux)"),
]


def start_of(pid: int | str) -> int:
    """Field 22 of /proc/PID/stat, read here independently of the module."""
    text = Path(f"/proc/{pid}/stat").read_text()
    return int(text[text.rindex(")") + 2:].split()[19])


NS = os.stat("/proc/self/ns/pid").st_ino


def name(pid: int, start: int, ns: int = NS, tail: str = "0123abcd") -> str:
    return f"dni-{ns}-{pid}-{start}-{tail}"


@pytest.fixture(scope="module")
def dead() -> tuple[int, int]:
    """(pid, start time) of a process that has run and is gone."""
    child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    start = start_of(child.pid)
    child.communicate(b"")
    assert not _alive(child.pid)
    return child.pid, start


@pytest.mark.slow
def test_a_leftover_goes_only_when_it_is_ours_and_its_owner_is_gone(tmp_path, dead):
    me, my_start = os.getpid(), start_of("self")
    pid, start = dead
    cases = {  # name -> removed?
        name(me, my_start): False,                # the owner runs (this process)
        name(pid, start): True,                   # the owner is gone
        name(me, my_start + 1): True,             # the pid runs, but another process has it
        name(pid, start, ns=NS + 1): False,       # another pid namespace: cannot be judged
        name(pid, start, tail="0123abcg"): False,  # not a name we make
        name(pid, start) + "x": False,
        "x" + name(pid, start): False,
        f"dni-{pid}-{start}": False,
        "dni-k3j4h5g6": False,                    # an older version's name: no owner in it
    }
    for entry in cases:
        (tmp_path / entry).mkdir(mode=0o700)
        (tmp_path / entry / "0123456789abcdef").write_text("")  # stands in for a socket
    # a directory of a gone owner, but not 0700; a link and a file with our names
    loose = name(pid, start, tail="1111aaaa")
    (tmp_path / loose).mkdir()
    os.chmod(tmp_path / loose, 0o755)
    (tmp_path / name(pid, start, tail="2222bbbb")).symlink_to(tmp_path / name(pid, start))
    (tmp_path / name(pid, start, tail="3333cccc")).write_text("")
    kept = {n for n, removed in cases.items() if not removed} | {
        loose, name(pid, start, tail="2222bbbb"), name(pid, start, tail="3333cccc")}
    if os.geteuid() == 0:  # another user's directory (only root can make one for them)
        foreign = name(pid, start, tail="4444dddd")
        (tmp_path / foreign).mkdir(mode=0o700)
        os.chown(tmp_path / foreign, 65534, 65534)
        kept.add(foreign)

    removed = sockdir.remove_leftovers(str(tmp_path))

    assert sorted(removed) == sorted(str(tmp_path / n) for n, r in cases.items() if r)
    assert {p.name for p in tmp_path.iterdir()} == kept
    assert (tmp_path / name(pid, start, tail="2222bbbb")).is_symlink()


def test_the_directory_is_named_after_its_owner_and_private(monkeypatch):
    temp = tempfile.mkdtemp()  # short: socket paths are short
    monkeypatch.setattr(tempfile, "tempdir", temp)
    try:
        path = Path(sockdir.make())
        assert path.parent == Path(temp)
        assert path.name.startswith(f"dni-{NS}-{os.getpid()}-{start_of('self')}-")
        assert path.stat().st_mode & 0o777 == 0o700
        assert sockdir.remove_leftovers(temp) == [] and path.is_dir()  # its owner runs
    finally:
        shutil.rmtree(temp)


@pytest.mark.slow
def test_the_next_run_removes_what_a_supervisor_killed_outright_left(tmp_path):
    temp = Path(tempfile.mkdtemp())  # short: socket paths are short
    env = dict(os.environ, TMPDIR=str(temp))
    first = subprocess.Popen([sys.executable, "launch.py", "--run-dir", str(tmp_path / "first"),
                              "--epochs", "100000", "--quiet"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             start_new_session=True)
    pids: list[int] = []
    try:
        config = tmp_path / "first" / "config.json"
        until(config.exists, 60, "the first run never started",
              lambda: first.poll() is None or first.communicate()[1].decode())
        c = json.loads(config.read_text())
        pids = [p["pid"] for p in c["processes"].values()]
        left = Path(c["supervisor"]["control"][len("ipc://"):]).parent
        assert left.is_dir()
        os.kill(first.pid, signal.SIGKILL)
        first.wait(10)
        # the workers follow their supervisor
        until(lambda: not any(_alive(p) for p in pids), 20, "workers outlived their supervisor")
        assert left.is_dir()  # nothing could remove it

        second = subprocess.run([sys.executable, "launch.py", "--run-dir",
                                 str(tmp_path / "second"), "--epochs", "1", "--quiet"],
                                cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
        assert second.returncode == 0, second.stderr
        assert not left.exists()
        assert [p.name for p in left.parent.iterdir() if p.name.startswith("dni-")] == []
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
        for p in pids:
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def until(condition, timeout_s: float, what: str, going=lambda: True) -> None:
    """Poll ``condition`` (a handshake on files or processes) for up to
    ``timeout_s``; ``going()`` must stay true meanwhile (else it says why)."""
    end = time.monotonic() + timeout_s
    while not condition():
        alive = going()
        assert alive is True, alive
        assert time.monotonic() < end, what
        time.sleep(0.05)  # polling interval of the condition, not a synchronisation
