"""Where a run's CPU goes, by process and thread: ``python bench/threads.py
[launch.py arguments]`` runs ``launch.py`` and samples every worker's threads
in /proc (Linux) every 50 ms, then prints each role's CPU per batch split into
its Python thread (our code, numpy, pyzmq's calls) and ZeroMQ's I/O thread
(``ZMQbg/IO/0``: the socket reads and writes of every message), which a
Python profiler does not see. The last 50 ms of a thread may go unsampled.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _children() -> dict[int, int]:
    """pid -> parent pid of every process we can see."""
    out = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            out[int(d.name)] = int(stat[stat.rindex(")") + 2:].split()[1])
    return out


def _descendants(root: int) -> list[int]:
    parents = _children()
    found, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parents.items() if pp == p]
        found += kids
        todo += kids
    return found


def _role(pid: int) -> str | None:
    try:
        cmd = (Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
    except OSError:
        return None
    m = re.search(r"--role (\S+)", cmd)
    return m.group(1) if m else None


def _threads(pid: int) -> dict[int, tuple[str, float]]:
    """tid -> (thread name, CPU seconds so far)."""
    out = {}
    for t in Path(f"/proc/{pid}/task").glob("*"):
        try:
            stat = (t / "stat").read_text()
        except OSError:
            continue
        name = stat[stat.index("(") + 1:stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2:].split()
        out[int(t.name)] = (name, (int(fields[11]) + int(fields[12])) / TICK)
    return out


def main(args: list[str]) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        run = subprocess.Popen([sys.executable, str(ROOT / "launch.py"), *args, "--quiet",
                                "--run-dir", f"{tmp}/run"], cwd=ROOT)
        seen: dict[tuple[int, int], tuple[str, str, float]] = {}
        roles: dict[int, str] = {}
        scanned = 0.0
        while run.poll() is None:
            if time.monotonic() - scanned > 1.0:  # the process tree: once a second
                scanned = time.monotonic()
                for pid in _descendants(run.pid):
                    role = roles.get(pid) or _role(pid)
                    if role is not None:
                        roles[pid] = role
            for pid, role in roles.items():
                for tid, (name, cpu) in _threads(pid).items():
                    seen[(pid, tid)] = (role, name, cpu)
            time.sleep(0.05)
        summary = json.loads(Path(f"{tmp}/run/summary.json").read_text())
    batches = summary["batches"] or 1
    by: dict[str, dict[str, float]] = {}
    for role, name, cpu in seen.values():
        kind = "zmq I/O" if name.startswith("ZMQbg/IO") else (
            "zmq other" if name.startswith("ZMQbg") else "python")
        by.setdefault(role, {}).setdefault(kind, 0.0)
        by[role][kind] += cpu
    print(f"{summary['status']}, {summary['batches_per_s']:.1f} batches/s; "
          f"CPU per batch in ms, by role and thread:")
    for role in sorted(by):
        parts = ", ".join(f"{k} {v / batches * 1e3:.3f}" for k, v in sorted(by[role].items()))
        print(f"  {role:>8}: {parts}")
    total = {k: sum(r.get(k, 0.0) for r in by.values()) for k in ("python", "zmq I/O")}
    print("  all workers: " + ", ".join(f"{k} {v / batches * 1e3:.3f}" for k, v in total.items()))
    return 0 if summary["status"] == "completed" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
