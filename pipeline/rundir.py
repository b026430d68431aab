"""The run directory: config.json, metrics.jsonl, summary.json, weights/*.npz.

Written so that a crash loses nothing already written: metrics are appended
and flushed line by line; the summary and weights are written to a temporary
file and renamed into place, so they are either whole or absent.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TextIO

import numpy as np

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest works
    fcntl = None


def default_path(mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{mode}-{secrets.token_hex(2)}"


# Run directories open_run has opened and not yet closed, with their
# config: a command interrupted before its run takes charge of the directory
# (a signal while the sockets bind) still writes it up (``unfinished``).
_OPENED: list[tuple["RunDir", object]] = []


def open_run(cfg, resuming: bool, stream: TextIO) -> "RunDir":
    """The run directory of ``cfg`` (a new one, or the one a resumed run goes
    on in), announced on ``stream`` unless --quiet."""
    rd = RunDir(cfg.run_dir or default_path(cfg.mode), resume=resuming)
    _OPENED.append((rd, cfg))
    if not cfg.quiet:
        print(f"run directory: {rd.path}", file=stream, flush=True)
        if resuming:
            print(f"resuming at epoch {cfg.start_epoch + 1}", file=stream, flush=True)
    return rd


class RunDir:
    """One run's directory, held by this process alone while it is open: an
    exclusive lock (``.lock``) keeps a second run out; files are the user's
    alone (0600, the directory 0700 where this makes it); temporary files an
    interrupted write left behind are removed when it is opened."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        """``resume``: go on in a directory whose run was interrupted or failed."""
        self.path = Path(path)
        option = "--resume" if resume else "--run-dir"
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"argument {option}: {self.path} exists and is not a directory")
        try:
            self.path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"argument {option}: cannot make {self.path}: "
                             f"{exc.strerror or exc}") from None
        self._lock = _lock(self.path, option)
        try:
            if resume:
                self.check_resumable(self.path)
            elif (self.path / "summary.json").exists():
                raise ValueError(f"argument --run-dir: {self.path} already holds a finished "
                                 "run; choose another directory (or --resume it)")
            for stale in self.path.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)  # a write cut short; its target is intact
            self._metrics = open(_private(self.path / "metrics.jsonl", os.O_APPEND),
                                 "a", encoding="utf-8", closefd=True)
        except BaseException:
            self._lock.close()
            raise

    @staticmethod
    def check_resumable(path: Path) -> None:
        summary = path / "summary.json"
        if summary.exists():
            try:
                status = json.loads(summary.read_text()).get("status")
            except (ValueError, AttributeError):
                status = None
            if status == "completed":
                raise ValueError(f"argument --resume: the run in {path} completed; "
                                 "there is nothing to resume")

    def _atomic(self, name: str, write) -> Path:
        final = self.path / name
        final.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(_private(tmp, os.O_TRUNC), "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)  # the rename itself survives a crash
        return final

    def write_json(self, name: str, obj: dict) -> Path:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
        return self._atomic(name, lambda f: f.write(text.encode()))

    def metric(self, event: dict) -> None:
        self._metrics.write(json.dumps(event, default=_jsonable) + "\n")
        self._metrics.flush()

    def write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        return self._atomic(name, lambda f: np.savez(f, **arrays))

    def write_weights(self, role: str, arrays: dict[str, np.ndarray]) -> Path:
        return self.write_npz(f"weights/{role}.npz", arrays)

    def write_checkpoint(self, epoch: int, role: str, state: dict,
                         arrays: dict[str, np.ndarray]) -> None:
        d = f"checkpoints/{checkpoint_dir(epoch)}"
        self.write_npz(f"{d}/{role}.npz", arrays)
        self.write_json(f"{d}/{role}.json", state)

    def commit_checkpoint(self, epoch: int) -> None:
        """Every role's state of ``epoch`` is on disk: make it the one to
        resume from. Written last and atomically, so a crash mid-checkpoint
        leaves the previous one in force."""
        self.write_json("checkpoints/latest.json", {"epoch": epoch,
                                                     "dir": checkpoint_dir(epoch)})

    def close(self) -> None:
        self._metrics.close()
        self._lock.close()  # and with it the lock
        _OPENED[:] = [(rd, cfg) for rd, cfg in _OPENED if rd is not self]

    def write_json_at_once(self, name: str, obj: dict) -> None:
        """As write_json, whole or absent, but not synced: a kill of this
        process loses nothing the kernel already has, a crash of the machine
        may. For a provisional summary that must be in place within a
        fraction of a second whatever the disk's load; write_json follows."""
        final = self.path / name
        tmp = final.with_name(f".{final.name}.tmp")
        text = json.dumps(obj, indent=2, default=_jsonable) + "\n"
        with open(_private(tmp, os.O_TRUNC), "wb") as f:
            f.write(text.encode())
        os.replace(tmp, final)


def unfinished() -> list[tuple[RunDir, object]]:
    """(RunDir, Config) of every run directory open_run opened that is still
    open and holds no summary: what an interrupted command must write up."""
    return [(rd, cfg) for rd, cfg in _OPENED if not (rd.path / "summary.json").exists()]


def checkpoint_dir(epoch: int) -> str:
    return f"epoch-{epoch:06d}"


def _private(path: Path, flags: int) -> int:
    """A file descriptor for writing ``path``, created readable by its owner only."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o600)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename stands
    finally:
        os.close(fd)


def _lock(path: Path, option: str):
    """An exclusive lock on the run directory, held until ``close`` (or until
    the RunDir is gone, or the process): a second run there is refused
    instead of interleaving with the first."""
    f = open(os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600), "rb", buffering=0)
    if fcntl is not None:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ValueError(f"argument {option}: another run is using {path}") from None
    return f


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# --- reading a finished run --------------------------------------------------------------

def load_run(run_dir: str | os.PathLike) -> dict:
    """{"path", "summary", "config", "events", "bad_lines"} of a finished run.

    Lines of metrics.jsonl that are not JSON objects (a run killed mid-write
    leaves half a line) are skipped and counted in ``bad_lines``. Raises
    ValueError naming the file if the directory is not a finished run.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    if not summary_path.is_file():
        raise ValueError(f"{summary_path}: missing (the run has not finished, "
                         "or this is not a run directory)")
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path}: missing")
    summary = _json_object(summary_path)
    config_path = path / "config.json"
    config = _json_object(config_path) if config_path.is_file() else {}

    events: list[dict] = []
    bad = 0
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                bad += 1
    return {"path": path, "summary": summary, "config": config, "events": events,
            "bad_lines": bad}


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
