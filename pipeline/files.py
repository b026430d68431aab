"""How the project writes a file of the user's: 0600 in directories 0700
whatever the umask, whole or not at all (a temporary, then a rename), in
space taken before it is needed; and whether a path fits the file system
at all. Every command that writes uses these (the run directory,
``runfiles``, names what a run writes)."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Callable


def temporary(name: str) -> str:
    """The temporary name a file ``name`` is written under before its rename."""
    return f".{name}.tmp"


# --- modes: the user's alone ---------------------------------------------------------

def make_private_dirs(path: Path) -> None:
    """``path`` and every missing parent, each made 0700 (mkdir's mode goes
    through the umask, and ``parents=True`` gives the parents the default)."""
    missing = []
    p = Path(os.path.abspath(path))
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    for d in reversed(missing):
        with contextlib.suppress(FileExistsError):
            d.mkdir(mode=0o700)
            os.chmod(d, 0o700)


def open_private(path: Path, flags: int) -> int:
    """A file descriptor for writing ``path``, readable by its owner only,
    whatever the umask or the mode of a file already there."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)
    try:
        if hasattr(os, "fchmod"):  # (not on Windows, where modes are not the user's guard)
            os.fchmod(fd, 0o600)
    except OSError:
        os.close(fd)
        raise
    return fd


def allocate(fd: int, size: int) -> None:
    """Take ``size`` bytes of the disk for the file open as ``fd`` (OSError,
    ENOSPC, when there is not that much)."""
    try:
        os.posix_fallocate(fd, 0, size)
        return
    except AttributeError:  # not on every platform
        pass
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
            raise
    chunk = bytes(min(size, 1 << 20))
    done = 0
    while done < size:
        done += os.write(fd, chunk[:size - done])
    os.fsync(fd)


def write_private(path: Path, write: Callable, text: bool = False) -> Path:
    """Write ``path`` whole (a temporary, then a rename), 0600, its missing
    parents 0700: for what the commands write beside runs (plots, a sweep's
    tables). ``write(f)`` gets the open file."""
    path = Path(path)
    make_private_dirs(path.parent)
    tmp = path.with_name(temporary(path.name))
    try:
        with open(open_private(tmp, os.O_TRUNC), "w" if text else "wb",
                  **({"newline": "", "encoding": "utf-8"} if text else {})) as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return path


# --- path lengths ----------------------------------------------------------------------

def _limit(path: Path, name: str, default: int) -> int:
    """A limit of the file system ``path`` would be on (its nearest existing parent's)."""
    p = Path(os.path.abspath(path))
    while not os.path.exists(p) and p != p.parent:  # (False for a name too long, too)
        p = p.parent
    try:
        return os.pathconf(p, name)
    except (OSError, ValueError):
        return default


def check_path(path: str | os.PathLike, option: str, inside: int = 0) -> None:
    """ValueError in one line, before anything is made, if a name in ``path``
    is longer than the file system takes, or the path with the longest name
    written inside it (``inside`` characters) longer than a path may be.
    Measured as an absolute path, as the run opens it."""
    full = os.fsencode(os.path.abspath(path))
    name_max = _limit(Path(os.fsdecode(full)), "PC_NAME_MAX", 255)
    for part in full.split(b"/"):
        if len(part) > name_max:
            shown = os.fsdecode(part)
            raise ValueError(f"argument {option}: a name of {len(part)} bytes in the path "
                             f"({shown[:20]}...), longer than the {name_max} the file system "
                             "allows")
    path_max = _limit(Path(os.fsdecode(full)), "PC_PATH_MAX", 4096)
    if len(full) + 1 + inside >= path_max:
        text = os.fsdecode(full)
        shown = text if len(text) <= 60 else f"{text[:28]}...{text[-28:]}"
        raise ValueError(f"argument {option}: the path is {len(full)} bytes long ({shown}); "
                         f"with the {inside} of the longest name written inside it, that is "
                         f"beyond the {path_max} a path may have")


def free_bytes(path: Path) -> int | None:
    """Bytes free to this user on ``path``'s file system, if it says."""
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None
