"""What a run writes in its directory, named in one place, and what follows
from it: recognising a run directory of ours, clearing one for --overwrite,
removing the run's own temporary files and old checkpoints, the space kept
for its last writes (``pipeline.files`` writes them, private and whole).

A run never deletes or rewrites a file it did not create: everything here
acts only on the names below, never on a pattern that could match a user's
file elsewhere.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path

from pipeline.files import temporary
from pipeline.limits import MAX_LAYERS

# Files of the run directory itself. ".reserve": the space kept at the start
# for the summary and the weights should the disk fill (rundir.RunDir).
FILES = ("config.json", "metrics.jsonl", "summary.json", "report.png", ".lock", ".reserve")
# What every run writes when it opens its directory: how one is recognised.
MARKS = (".lock", "metrics.jsonl")
WEIGHTS, CHECKPOINTS, LATEST = "weights", "checkpoints", "latest.json"
# --tensorboard: one event file per process that opened the run (a resumed
# run adds one), named by the time it was opened and that process's id
# (TensorBoard reads every name holding "tfevents").
TENSORBOARD = "tensorboard"
# The line each process that writes a run puts in metrics.jsonl before its
# events: they count epochs from 1 (the N-th epoch is "epoch": N). Lines
# before any such line are a run's from before this numbering, which counted
# from 0 (``finished.renumbered`` reads both).
NUMBERING = {"event": "numbering", "epoch_base": 1}
_ROLE = r"(?:layer[1-9][0-9]*|output)"
_EPOCH = re.compile(r"epoch-(\d{6,})")
# Names inside the run directory, by the directory they are in ("": the top);
# a temporary is the name of a file written whole, with a dot before and
# ".tmp" after (``temporary``).
_WHOLE = {"": re.compile(r"(?:config\.json|summary\.json|report\.png)"),
          WEIGHTS: re.compile(rf"{_ROLE}\.npz"),
          CHECKPOINTS: re.compile(re.escape(LATEST)),
          TENSORBOARD: re.compile(r"events\.out\.tfevents\.\d{10,}\.\d+"),
          "epoch": re.compile(rf"{_ROLE}\.(?:npz|json)")}


def checkpoint_dir(epochs_done: int) -> str:
    """The checkpoint taken when ``epochs_done`` epochs were trained, named as
    the progress line counts: ``epoch-000400`` after epoch 400/800, and a
    resume goes on at epoch 401. (Runs before this numbering named it by
    the epoch's index from 0, ``epoch-000399``; ``latest.json`` says which.)"""
    return f"epoch-{epochs_done:06d}"


def checkpoint_epoch(name: str) -> int | None:
    """The epochs done of a checkpoint directory's name, None for any other name."""
    m = _EPOCH.fullmatch(name)
    return int(m.group(1)) if m else None


def event_file(seconds: int, pid: int) -> str:
    """The name of the TensorBoard event file a process opened at ``seconds``
    (since the epoch) writes."""
    return f"events.out.tfevents.{seconds:010d}.{pid}"


# The longest path a run writes inside its directory (the temporary of a
# checkpoint's state), with room for any epoch a run may count to.
LONGEST_INSIDE = max(len(f"{CHECKPOINTS}/{checkpoint_dir(10 ** 19)}/"
                         f"{temporary(f'layer{MAX_LAYERS}.json')}"),
                     len(f"{TENSORBOARD}/{event_file(10 ** 11, 2 ** 32)}"))


def _is_ours(where: str, name: str, is_dir: bool) -> tuple[bool, bool]:
    """(written by a run, a temporary) for entry ``name`` of the run's
    directory ``where`` ("", "weights", "checkpoints", "tensorboard" or "epoch")."""
    if is_dir:
        return ((where == "" and name in (WEIGHTS, CHECKPOINTS, TENSORBOARD))
                or (where == CHECKPOINTS and checkpoint_epoch(name) is not None)), False
    if where == "" and name in FILES:
        return True, False
    whole = _WHOLE[where]
    if whole.fullmatch(name):
        return True, False
    tmp = name.startswith(".") and name.endswith(".tmp") and whole.fullmatch(name[1:-4])
    return bool(tmp), bool(tmp)


def survey(path: Path) -> tuple[list[Path], list[Path]]:
    """(what a run writes, what it does not) under ``path``: every file and
    directory, depth first, those of a run each with its parent after it. A
    link is never a run's (a run makes none, and none is followed)."""
    ours: list[Path] = []
    foreign: list[Path] = []

    def walk(d: Path, where: str) -> None:
        with os.scandir(d) as entries:
            for e in sorted(entries, key=lambda e: e.name):
                is_dir = e.is_dir(follow_symlinks=False)
                mine, _ = ((False, False) if e.is_symlink()
                           else _is_ours(where, e.name, is_dir))
                if not mine:
                    foreign.append(Path(e.path))
                    continue
                if is_dir:
                    walk(Path(e.path), "epoch" if where == CHECKPOINTS else e.name)
                ours.append(Path(e.path))
    walk(path, "")
    return ours, foreign


def is_run(path: Path) -> bool:
    """Whether ``path`` holds a run of ours: what every run writes at open."""
    return all((path / m).is_file() and not (path / m).is_symlink() for m in MARKS)


def clear(path: Path, keep: tuple[str, ...] = (".lock",)) -> list[str]:
    """--overwrite: remove everything a run wrote in ``path`` but ``keep``;
    the names removed, for the user (a directory with how many files it held).
    ValueError, with nothing removed, when anything else is there."""
    ours, foreign = survey(path)
    if foreign:
        raise ValueError(f"argument --overwrite: {path} also holds "
                         f"{foreign[0].relative_to(path)}, which no run writes; move it away or "
                         "choose another directory")
    said: dict[str, int] = {}
    for p in ours:
        rel = p.relative_to(path)
        if str(rel) in keep:
            continue
        top = rel.parts[0]
        if p.is_dir():
            p.rmdir()  # its files went first (survey lists them before it)
            said.setdefault(top, 0)
        else:
            p.unlink()
            said[top] = said.get(top, 0) + (len(rel.parts) > 1)
    return [f"{top}/ ({n} file{'s' * (n != 1)})" if top in (WEIGHTS, CHECKPOINTS, TENSORBOARD)
            else top
            for top, n in said.items()]


def is_empty(path: Path) -> bool:
    with os.scandir(path) as entries:
        return next(entries, None) is None


def what_run(path: Path) -> str:
    """The run in ``path``, and what may be done with it, for a refusal."""
    try:
        status = json.loads((path / "summary.json").read_text()).get("status")
    except (OSError, ValueError, AttributeError):
        status = None
    if status == "completed":
        return "a completed run; replace it with --overwrite, or choose another directory"
    what = {"interrupted": "an interrupted run", "failed": "a failed run"}.get(
        status, "a run that did not finish")
    return (f"{what}; go on with it with --resume {path}, replace it with --overwrite, or "
            "choose another directory")


def whole_lines(path: Path, fd: int) -> int:
    """The length of the metrics file open as ``fd``, cut back to its last
    whole line: a run killed mid-write left half a line, which the next
    line (of a resumed run) must not join."""
    size = os.fstat(fd).st_size
    if size == 0:
        return 0
    window = 4 * 64 * 1024  # several of the largest events a role may send
    with open(path, "rb") as f:
        f.seek(max(0, size - window))
        tail = f.read()
    cut = tail.rfind(b"\n")
    if cut < 0 and size > window:
        return size  # no line end in sight: not ours to judge
    whole = size - len(tail) + cut + 1
    if whole < size:
        os.ftruncate(fd, whole)
    return whole


def remove_temporaries(path: Path) -> None:
    """The run's own temporary files under ``path`` (a write cut short; its
    target is intact), and nothing else."""
    def walk(d: Path, where: str) -> None:
        with contextlib.suppress(FileNotFoundError, NotADirectoryError), os.scandir(d) as it:
            for e in list(it):
                if e.is_symlink():
                    continue
                if e.is_dir():
                    if _is_ours(where, e.name, True)[0]:
                        walk(Path(e.path), "epoch" if where == CHECKPOINTS else e.name)
                elif _is_ours(where, e.name, False)[1]:
                    Path(e.path).unlink(missing_ok=True)
    walk(path, "")


def remove_checkpoint(d: Path) -> None:
    """A checkpoint directory the run wrote, and only what the run wrote in it
    (anything else keeps it)."""
    if not d.is_dir() or d.is_symlink():
        return
    with os.scandir(d) as it:
        for e in list(it):
            if not e.is_symlink() and e.is_file() and _is_ours("epoch", e.name, False)[0]:
                Path(e.path).unlink(missing_ok=True)
    with contextlib.suppress(OSError):
        d.rmdir()


def prune_checkpoints(path: Path, committed: int, keep: int, roles: list[str]) -> list[int]:
    """After the checkpoint of epoch ``committed`` is in force: remove all but
    the newest ``keep`` complete ones (each of ``roles`` with its .npz and
    .json) up to it, and any incomplete one before it (0: keep all). Later
    epochs (a killed run's, to be written again) stay. The epochs removed."""
    if keep <= 0:
        return []
    top = path / CHECKPOINTS
    found = []
    with os.scandir(top) as it:
        for e in it:
            epoch = checkpoint_epoch(e.name)
            if epoch is not None and epoch <= committed and e.is_dir(follow_symlinks=False):
                found.append(epoch)
    found.sort(reverse=True)

    def whole(epoch: int) -> bool:
        d = top / checkpoint_dir(epoch)
        return all((d / f"{r}.{x}").is_file() for r in roles for x in ("npz", "json"))
    complete = [e for e in found if whole(e)]
    gone = [e for e in found if e not in complete[:keep]]
    for epoch in gone:
        remove_checkpoint(top / checkpoint_dir(epoch))
    return gone


# --- the space a run keeps for its last writes ----------------------------------------

BLOCK = 4096                 # a file takes whole blocks of the disk
NPZ_ARRAY_BYTES = 512        # an array's zip headers and .npy header in an .npz, at most
SUMMARY_BYTES = 16 * 1024    # summary.json without its layers, with room to spare
SUMMARY_LAYER_BYTES = 4 * 1024  # each layer's entry (its staleness histogram the most of it)


def weight_sizes(cfg) -> list[list[int]]:
    """The element count of every array in each layer's weights file
    (``weights/<role>.npz``, layer 1 first), from the configuration alone."""
    d, top = cfg.dims, cfg.layers
    out = []
    for k in range(1, top + 1):
        sizes = [d[k - 1] * d[k], d[k]]
        if k < top:
            sizes += [d[k]] * (4 if cfg.batchnorm else 2 if cfg.layernorm else 0)
            if cfg.mode in ("dni", "cdni"):
                widths = [d[k] + (d[-1] if cfg.mode == "cdni" else 0), *cfg.sg_hidden, d[k]]
                for a, b in zip(widths, widths[1:]):
                    sizes += [a * b, b]
        if cfg.unlocks(k):
            fan_in = d[0] + (d[-1] if cfg.mode == "cdni" and k < top else 0)
            sizes += [fan_in * d[k - 1], d[k - 1]]
        out.append(sizes)
    return out


def _blocks(n: int) -> int:
    return -(-n // BLOCK) * BLOCK + BLOCK


def reserve_bytes(cfg) -> int:
    """The space kept at the start for a run's last writes should the disk
    fill: each layer's weights file and the summary, in whole blocks."""
    item = cfg.np_dtype.itemsize
    files = sum(_blocks(sum(s) * item + NPZ_ARRAY_BYTES * (len(s) + 1))
                for s in weight_sizes(cfg))
    return files + _blocks(SUMMARY_BYTES + SUMMARY_LAYER_BYTES * cfg.layers)
