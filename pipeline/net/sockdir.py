"""A local run's private socket directory: made for the run alone (0700),
named after the process that owns it. The run removes it at its end; what a
supervisor killed outright (SIGKILL) left behind, the next run on the
machine removes, once it has made sure that the owner is gone.

The name says who the owner is: ``dni-<pid namespace>-<pid>-<start>-<8 hex
digits>``, where ``start`` is when that process started (clock ticks after
boot, field 22 of /proc/PID/stat), so that another process given the same
pid later is not taken for it, and the pid namespace says where the pid
means that process (another container sharing the temporary directory has
its own pids, which ours cannot judge).
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import stat
import tempfile

# What a Unix socket's address holds (107 bytes on Linux, 103 on macOS),
# less a margin: the directory's path, "/" and a socket's 16-character name.
MAX_SOCKET_PATH = 100
SOCKET_NAME_CHARS = 16
_NAME = re.compile(r"dni-(\d{1,20})-(\d{1,10})-(\d{1,20})-[0-9a-f]{8}")


def make() -> str:
    """A fresh directory for this process's run, in the temporary directory
    (under /tmp when that path would make socket paths too long), after
    removing the leftovers of runs whose supervisor is gone."""
    ns, start = _pid_namespace(), _start_time("self")
    while True:
        name = f"dni-{ns}-{os.getpid()}-{start}-{secrets.token_hex(4)}"
        base = tempfile.gettempdir()
        if len(base) + len(name) + SOCKET_NAME_CHARS + 2 > MAX_SOCKET_PATH:
            base = "/tmp"
        remove_leftovers(base)
        path = os.path.join(base, name)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            continue
        os.chmod(path, 0o700)  # whatever the umask
        return path


def remove_leftovers(base: str) -> list[str]:
    """Remove from ``base`` every socket directory of ours whose owner no
    longer runs; the paths removed. Ours: a directory (not a link) of this
    user, mode 0700, named exactly as ``make`` names them; anything else,
    and any directory whose owner runs or cannot be judged, is left alone."""
    removed = []
    try:
        entries = list(os.scandir(base))
    except OSError:
        return removed
    for entry in entries:
        match = _NAME.fullmatch(entry.name)
        if match is None:
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except OSError:
            continue  # gone meanwhile
        if (not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid()
                or stat.S_IMODE(st.st_mode) != 0o700):
            continue
        ns, pid, start = (int(g) for g in match.groups())
        if owner_runs(ns, pid, start):
            continue
        shutil.rmtree(entry.path, ignore_errors=True)  # another run may be at it too
        removed.append(entry.path)
    return removed


def owner_runs(ns: int, pid: int, start: int) -> bool:
    """Whether the process a directory's name records may still run: True
    unless it is known to be gone (no such pid, or that pid started at
    another time), and whenever it cannot be judged (another pid namespace)."""
    if ns != _pid_namespace():
        return True
    if ns == 0:  # no /proc here: no start times, only whether the pid exists
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass  # another user's process
        return True
    try:
        return _start_time(str(pid)) == start
    except FileNotFoundError:
        return False


def _pid_namespace() -> int:
    """This process's pid namespace (its inode), 0 where there is no /proc."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def _start_time(pid: str) -> int:
    """When a process ("self" or a pid) started, in clock ticks after boot;
    0 where there is no /proc. FileNotFoundError: no such process."""
    if not os.path.isdir("/proc/self"):
        return 0
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()  # after the command's name
    return int(fields[19])  # field 22, counted from the state, field 3
