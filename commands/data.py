"""``launch.py data DATASET DIR``: a dataset's standard files fetched into
DIR from its mirrors and checked against their published SHA-256; progress
on stderr, the closing line (what is where, and how to train on it) on
stdout. Exit 0, or 1 with one line on stderr."""
from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path
from typing import Callable, TextIO

from pipeline import files
from pipeline.data import download
from pipeline.data.download import DownloadError
from pipeline.data.sources import DATASETS, Dataset, Remote
from pipeline.run.subcommands import DataArgs

MB = 1e6


def size_text(n: int) -> str:
    """A size for people: kB under a megabyte, else MB."""
    return f"{n / 1e3:.1f} kB" if n < MB else f"{n / MB:.1f} MB"


def progress_text(name: str, done: int, total: int, rate: float | None) -> str:
    """One file's progress: name, how much of how much, percent, and the
    rate in bytes a second (none if not known yet)."""
    rate = f"  {size_text(int(rate))}/s" if rate is not None else ""
    return f"{name}  {size_text(done)} of {size_text(total)}  {100 * done // max(total, 1)} %{rate}"


class Meter:
    """One file's progress on ``err``: on a terminal one line redrawn (at
    most ten times a second), otherwise a line at every tenth of the file.
    The rate counts what this process received (not a resume's start)."""

    def __init__(self, name: str, err: TextIO, clock: Callable[[], float] = time.monotonic):
        self.name, self.err, self.clock = name, err, clock
        self.tty = err.isatty()
        self.start = clock()
        self.first: int | None = None   # the byte this process started from
        self.drawn_at = -1.0            # terminal: when the line was last drawn
        self.tenth = 0                  # otherwise: the last tenth printed
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        if self.first is None:
            self.first, self.tenth = done, 10 * done // max(total, 1)
        now = self.clock()
        rate = (done - self.first) / (now - self.start) if now > self.start else None
        text = progress_text(self.name, done, total, rate)
        if self.tty:
            if now - self.drawn_at >= 0.1 or done == total:
                self.err.write(f"\r{text}\x1b[K")  # (erase what a longer line left)
                self.err.flush()
                self.drawn_at, self.drawn = now, True
            return
        tenth = 10 * done // max(total, 1)
        if tenth > self.tenth:
            print(text, file=self.err, flush=True)
            self.tenth = tenth

    def end(self) -> None:
        """Close the redrawn line (before anything else is printed)."""
        if self.tty and self.drawn:
            self.err.write("\n")
            self.err.flush()
            self.drawn = False


def main(args: DataArgs, stream: TextIO, err: TextIO | None = None,
         table: dict[str, Dataset] = DATASETS) -> int:
    """``launch.py data``: 0 when every file is in DIR and verified, else 1
    with one line saying what failed and what was kept."""
    err = err or sys.stderr
    dataset = table[args.dataset]
    mirrors = (args.mirror,) if args.mirror else dataset.mirrors
    directory = Path(args.directory)
    made = _missing(directory)
    try:
        if directory.exists() and not directory.is_dir():
            raise DownloadError(f"{directory}: not a directory")
        files.make_private_dirs(directory)
        local, in_place = download.look(directory, dataset)
        plan = download.plan(dataset, local, in_place)
        free = files.free_bytes(directory)
        if free is not None and plan.need_bytes > free:
            raise DownloadError(f"{directory}: {size_text(plan.need_bytes)} needed, "
                                f"{size_text(free)} free")
        for step in plan.steps:
            _fetch(step, directory, mirrors, args.timeout, err)
        if plan.extract:
            _extract(dataset, directory, args.keep_archive, err)
    except (DownloadError, OSError) as exc:  # OSError: the disk (DIR not writable, full)
        _remove_empty(made)
        text = str(exc) if isinstance(exc, DownloadError) else \
            f"{exc.filename or directory}: {exc.strerror or exc}"
        print(f"data: error: {text}", file=err)
        return 1
    except KeyboardInterrupt:  # (launch.py exits 130 on it)
        _remove_empty(made)
        kept = sorted(directory.glob(".*.part")) if directory.is_dir() else []
        print("data: interrupted" + (f"; {', '.join(p.name for p in kept)} kept in {directory}: "
                                     "the same command resumes from there" if kept else ""),
              file=err)
        raise
    print(_closing(dataset, directory, in_place), file=stream)
    return 0


def _missing(directory: Path) -> list[Path]:
    """The directories making ``directory`` would make, deepest first."""
    missing, p = [], Path(os.path.abspath(directory))
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    return missing


def _remove_empty(made: list[Path]) -> None:
    """A failed command leaves no directory it made, unless something (a part
    file to resume from) is in it."""
    for d in made:
        try:
            d.rmdir()
        except OSError:
            return


def _fetch(step: download.Step, directory: Path, mirrors: tuple[str, ...], timeout: float,
           err: TextIO) -> None:
    r: Remote = step.remote
    if step.action == "verified":
        print(f"{r.name}: already here, SHA-256 verified", file=err)
        return
    said = {"fetch": f"{r.name} ({size_text(r.size)}) from {mirrors[0]}",
            "resume": f"{r.name}: resuming at byte {step.have:,} of {r.size:,}, from {mirrors[0]}",
            "replace": f"{r.name}: here, but its SHA-256 is not the published one: fetching "
                       f"it again from {mirrors[0]}"}
    print(said[step.action], file=err, flush=True)
    meter = Meter(r.name, err)

    def note(text: str) -> None:
        meter.end()
        print(text, file=err, flush=True)
    try:
        download.fetch(r, directory, mirrors, timeout, meter, note)
    finally:
        meter.end()
    print(f"{r.name}: SHA-256 verified", file=err, flush=True)


def _extract(dataset: Dataset, directory: Path, keep: bool, err: TextIO) -> None:
    (archive,) = [directory / r.name for r in dataset.files]
    print(f"{archive.name}: taking out its {len(dataset.members)} files", file=err, flush=True)
    download.extract(archive, directory, dataset.members)
    if not keep:
        archive.unlink()
        print(f"{archive.name}: removed (--keep-archive keeps it)", file=err)


def _closing(dataset: Dataset, directory: Path, in_place: bool) -> str:
    """What is where now, and the run that trains on it."""
    train = f"python launch.py {dataset.dataset_option} --data-dir {shlex.quote(str(directory))}"
    if dataset.members:
        where = sorted({str(directory / Path(name).parent) for name, _ in dataset.members})
        how = "already there" if in_place else "taken out of the verified archive"
        return (f"{dataset.name}: {len(dataset.members)} files in {', '.join(where)} "
                f"({how}); train with: {train}")
    return (f"{dataset.name}: {len(dataset.files)} files in {directory}, each SHA-256 verified; "
            f"train with: {train}")
