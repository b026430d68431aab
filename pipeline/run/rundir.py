"""The run directory: config.json, metrics.jsonl, summary.json, weights/*.npz.

Written so that nothing already written is lost: metrics are appended a line
at a time, and a line the disk had no room for is cut back off; the summary,
weights and checkpoints go to a temporary file renamed into place, whole or
absent. The names a run writes are listed once, in ``runfiles``: a new run
goes only into a directory that is absent, empty or (``--overwrite``) one of
ours, and never touches a file it did not write. Should the disk fill, the
space kept at the start (``.reserve``) takes the weights as they are at the
stop and the summary.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import time
from pathlib import Path
from typing import TextIO

import numpy as np

from pipeline import files
from pipeline.coord.coordinator import Commit, SaveCheckpoint
from pipeline.run import runfiles
from pipeline.files import open_private
from pipeline.run.runfiles import checkpoint_dir

try:
    import fcntl
except ImportError:  # not POSIX: no lock, the rest works
    fcntl = None

FULL = (errno.ENOSPC, errno.EDQUOT)


class WriteError(Exception):
    """A file of the run directory could not be written; the message names
    it. ``full``: the disk (or the user's quota) had no room."""

    def __init__(self, path: Path, exc: OSError):
        super().__init__(f"cannot write {path}: {exc.strerror or exc}")
        self.path = path
        self.full = exc.errno in FULL


def default_path(mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{mode}-{secrets.token_hex(2)}"


# Run directories open_run has opened and not yet closed, with their
# config: a command interrupted before its run takes charge of the directory
# (a signal while the sockets bind) still writes it up (``unfinished``).
_OPENED: list[tuple["RunDir", object]] = []


def open_run(cfg, resuming: bool, stream: TextIO) -> "RunDir":
    """The run directory of ``cfg`` (a new one, or the one a resumed run goes
    on in), announced on ``stream`` unless --quiet; what --overwrite removed
    is said whatever --quiet."""
    if cfg.tensorboard:  # tensorboardX is imported only when asked for
        from pipeline.run import tensorboard
        tensorboard.require()  # before anything is made
    rd = RunDir(cfg.run_dir or default_path(cfg.mode), resume=resuming,
                overwrite=cfg.overwrite, reserve=runfiles.reserve_bytes(cfg))
    _OPENED.append((rd, cfg))
    if cfg.tensorboard:
        tensorboard.attach(rd)
    if rd.removed:
        print(f"--overwrite: removed {', '.join(rd.removed)} from {rd.path}", file=stream,
              flush=True)
    if not cfg.quiet:
        print(f"run directory: {rd.path}", file=stream, flush=True)
        if resuming:
            print(f"resuming at epoch {cfg.start_epoch + 1}/{cfg.epochs}, after the "
                  f"checkpoint of epoch {cfg.start_epoch}", file=stream, flush=True)
    return rd


class RunDir:
    """One run's directory, held by this process alone while it is open: an
    exclusive lock (``.lock``) keeps a second run out; what it makes is the
    user's alone (files 0600, directories 0700, the run directory made so
    when the run takes it)."""

    def __init__(self, path: str | os.PathLike, resume: bool = False, overwrite: bool = False,
                 reserve: int = 0):
        """``resume``: go on in a directory whose run was interrupted or
        failed; ``overwrite``: replace the run there; ``reserve``: bytes to
        keep for the last writes should the disk fill."""
        self.path = Path(path)
        self.removed: list[str] = []   # what --overwrite removed, for the user
        self.full: WriteError | None = None  # the write that found the disk full
        self.board = None  # --tensorboard: a tensorboard.Board, given every event too
        option = "--resume" if resume else "--run-dir"
        files.check_path(self.path, option, runfiles.LONGEST_INSIDE)
        ours = self._check_place(option, resume, overwrite)
        self._made = not self.path.exists()  # for ``discard``
        self._fresh = not resume
        try:
            files.make_private_dirs(self.path)
            os.chmod(self.path, 0o700)
        except OSError as exc:
            raise ValueError(f"argument {option}: cannot make {self.path}: "
                             f"{exc.strerror or exc}") from None
        self._lock = _lock(self.path, option)
        try:
            if resume:
                self.check_resumable(self.path)
                runfiles.remove_temporaries(self.path)
            elif ours:
                if not overwrite:
                    raise ValueError(f"argument --run-dir: {self.path} already holds "
                                     f"{runfiles.what_run(self.path)}")
                self.removed = runfiles.clear(self.path)
            self._reserve(reserve, option)
            self._metrics_path = self.path / "metrics.jsonl"
            self._metrics = open_private(self._metrics_path, os.O_APPEND)
            self._metrics_end = runfiles.whole_lines(self._metrics_path, self._metrics)
        except BaseException:
            self._lock.close()
            if not ours:  # a new run refused: nothing it made stays
                with contextlib.suppress(OSError):
                    (self.path / ".lock").unlink()
                    if self._made:
                        self.path.rmdir()
            raise

    def _check_place(self, option: str, resume: bool, overwrite: bool) -> bool:
        """Whether the directory holds a run of ours; ValueError if the run
        may not go there, before anything is written."""
        p = self.path
        if p.exists() and not p.is_dir():
            raise ValueError(f"argument {option}: {p} exists and is not a directory")
        if resume:
            if not runfiles.is_run(p):
                raise ValueError(f"argument --resume: {p} is not a run directory")
            return True
        try:
            empty = not p.exists() or runfiles.is_empty(p)
        except OSError as exc:
            raise ValueError(f"argument {option}: cannot read {p}: {exc.strerror}") from None
        if empty or runfiles.is_run(p):
            return not empty
        but = ", and --overwrite replaces only a run" if overwrite else ""
        raise ValueError(f"argument --run-dir: {p} is not empty and holds no run (a run goes "
                         f"into a new or empty directory{but})")

    def _reserve(self, size: int, option: str) -> None:
        """Keep ``size`` bytes of the disk for the weights at a stop and the
        summary, or refuse the run now."""
        self._reserve_path = self.path / ".reserve"
        if size <= 0:
            return
        try:
            fd = open_private(self._reserve_path, os.O_TRUNC)
            try:
                files.allocate(fd, size)
            finally:
                os.close(fd)
        except OSError as exc:
            self._reserve_path.unlink(missing_ok=True)
            free = files.free_bytes(self.path)
            have = f" ({free // 1024} KiB free)" if free is not None else ""
            raise ValueError(f"argument {option}: {self.path} has no room for the "
                             f"{size // 1024} KiB a run keeps for its weights and summary "
                             f"should the disk fill{have}: {exc.strerror or exc}") from None

    def release(self) -> None:
        """Give the kept space back, for the last writes it was kept for."""
        with contextlib.suppress(OSError):
            self._reserve_path.unlink(missing_ok=True)

    def _failed(self, path: Path, exc: OSError) -> WriteError:
        """A write into the run directory failed: the error to raise. A full
        disk stops metrics and checkpoints for good and frees the reserve for
        the weights and the summary."""
        err = WriteError(path, exc)
        if err.full and self.full is None:
            self.full = err
            self.release()
        return err

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

    def _atomic(self, name: str, write, sync: bool = True) -> Path:
        """Write ``name`` whole or not at all (a temporary, then a rename);
        ``sync``: on the disk before the rename, and the rename too."""
        final = self.path / name
        tmp = final.with_name(files.temporary(final.name))
        try:
            files.make_private_dirs(final.parent)
            with open(open_private(tmp, os.O_TRUNC), "wb") as f:
                write(f)
                if sync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException as exc:  # no temporary stays, whatever stopped the write
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError):
                raise self._failed(final, exc) from None
            raise
        if sync:
            _fsync_dir(final.parent)  # the rename itself survives a crash
        return final

    def write_config(self, obj: dict) -> Path:
        """config.json, as this process starts the run (or goes on with it),
        and in metrics.jsonl the numbering of the events it will append."""
        path = self.write_json("config.json", obj)
        self.metric(dict(runfiles.NUMBERING))
        return path

    def write_json(self, name: str, obj: dict) -> Path:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
        return self._atomic(name, lambda f: f.write(text.encode()))

    def metric(self, event: dict) -> None:
        """Append one event, a whole line or nothing (and with --tensorboard
        its scalars, a whole record); once the disk is full, none (the run is
        stopping)."""
        if self.full is not None:
            return
        line = (json.dumps(event, default=_jsonable) + "\n").encode()
        try:
            done = 0
            while done < len(line):
                done += os.write(self._metrics, line[done:])
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(self._metrics, self._metrics_end)  # no half line
            raise self._failed(self._metrics_path, exc) from None
        self._metrics_end += len(line)
        if self.board is not None:
            try:
                self.board.add(event)
            except OSError as exc:
                raise self._failed(self.board.path, exc) from None

    def write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        return self._atomic(name, lambda f: np.savez(f, **arrays))

    def write_weights(self, role: str, arrays: dict[str, np.ndarray]) -> Path:
        return self.write_npz(f"{runfiles.WEIGHTS}/{role}.npz", arrays)

    def write_checkpoint(self, epoch: int, role: str, state: dict,
                         arrays: dict[str, np.ndarray]) -> None:
        """One role's part of the checkpoint taken when ``epoch`` epochs
        were done, counted from 1 as the user reads them (none once the disk
        is full). A write that fails takes the epoch's directory with it:
        never in force, it would only be half."""
        if self.full is not None:
            return
        d = f"{runfiles.CHECKPOINTS}/{checkpoint_dir(epoch)}"
        try:
            self.write_npz(f"{d}/{role}.npz", arrays)
            self.write_json(f"{d}/{role}.json", state)
        except WriteError:
            runfiles.remove_checkpoint(self.path / d)
            raise

    def commit_checkpoint(self, epoch: int, roles: list[str] | None = None,
                          keep: int = 0) -> list[int]:
        """Every role's state after ``epoch`` epochs is on disk: make it the one to
        resume from. Written last and atomically, so a crash mid-checkpoint
        leaves the previous one in force. Then, with ``keep`` (and the
        ``roles`` a checkpoint holds), all but the newest ``keep`` complete
        checkpoints go; the epochs removed."""
        if self.full is not None:
            return []
        try:
            self.write_json(f"{runfiles.CHECKPOINTS}/{runfiles.LATEST}",
                            {"epochs_done": epoch, "dir": checkpoint_dir(epoch)})
        except WriteError:
            runfiles.remove_checkpoint(self.path / runfiles.CHECKPOINTS / checkpoint_dir(epoch))
            raise
        if not keep or roles is None:
            return []
        return runfiles.prune_checkpoints(self.path, epoch, keep, roles)

    def take_checkpoint(self, action, roles: list[str], keep: int) -> bool:
        """Carry out the coordinator's checkpoint ``action`` (``SaveCheckpoint``:
        write a role's part; ``Commit``: make it the one to resume from, keep
        ``keep`` of them, each holding ``roles``); whether it was one. Its epoch
        is the barrier's index from 0; the run directory names a checkpoint by
        the epochs done, as users count."""
        if isinstance(action, SaveCheckpoint):
            self.write_checkpoint(action.epoch + 1, action.role, action.state, action.arrays)
        elif isinstance(action, Commit):
            self.commit_checkpoint(action.epoch + 1, roles, keep)
        else:
            return False
        return True

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._metrics)
        if self.board is not None:
            self.board.close()
        self.release()
        self._lock.close()  # and with it the lock
        _OPENED[:] = [(rd, cfg) for rd, cfg in _OPENED if rd is not self]

    def discard(self) -> None:
        """Close a new run's directory that it never began to write (the
        coordinator could not start): what opening it made goes again, so
        the same command can be run once the cause is fixed."""
        began = self._metrics_end or (self.path / "config.json").exists()
        self.close()
        if self._fresh and not began:
            for name in ("metrics.jsonl", ".lock"):
                with contextlib.suppress(OSError):
                    (self.path / name).unlink()
            if self._made:
                with contextlib.suppress(OSError):
                    self.path.rmdir()

    def write_json_at_once(self, name: str, obj: dict) -> Path:
        """As write_json, whole or absent, but not synced: a kill of this
        process loses nothing the kernel already has, a crash of the machine
        may. For a provisional summary that must be in place within a
        fraction of a second whatever the disk's load; write_json follows."""
        text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
        return self._atomic(name, lambda f: f.write(text.encode()), sync=False)


def unfinished() -> list[tuple[RunDir, object]]:
    """(RunDir, Config) of every run directory open_run opened that is still
    open and holds no summary: what an interrupted command must write up."""
    return [(rd, cfg) for rd, cfg in _OPENED if not (rd.path / "summary.json").exists()]


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
    fd = os.open(path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
    if hasattr(os, "fchmod"):
        os.fchmod(fd, 0o600)
    f = open(fd, "rb", buffering=0)
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
