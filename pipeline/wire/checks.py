"""The checks a data inbox makes of each message before its node sees it:
the kind, the sender, the arrays' shapes and dtype, and that it is exactly
the next message of the run's data stream. A failed check is ValueError,
which the inbox counts and drops like any malformed message."""
from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from pipeline.wire.protocol import ACT, CHECKPOINT, EOF, EVAL, Message, epoch, test_epoch


def expect(msg: Message, kinds: Sequence[str], shapes: Sequence[tuple[int | None, ...]],
           dtype: np.dtype, max_rows: int) -> None:
    """Raise ValueError unless ``msg`` is one of ``kinds`` carrying arrays of
    these shapes ((None, w): rows of w numbers; (None, h, w, c): images;
    any row count from 1 to max_rows, the same in every array)."""
    if msg.kind not in kinds:
        raise ValueError(f"unexpected message kind {msg.kind!r} on this socket")
    if msg.kind in (EOF, CHECKPOINT):
        if msg.arrays:
            raise ValueError(f"{msg.kind} carries no arrays, got {len(msg.arrays)}")
        return
    if len(msg.arrays) != len(shapes):
        raise ValueError(f"{msg.kind} needs {len(shapes)} arrays, got {len(msg.arrays)}")
    rows = msg.arrays[0].shape[0] if msg.arrays and msg.arrays[0].ndim >= 1 else -1
    for arr, (_, *each) in zip(msg.arrays, shapes):
        if arr.dtype != dtype or list(arr.shape[1:]) != each or arr.ndim != 1 + len(each):
            raise ValueError(f"{msg.kind} array {arr.dtype}{list(arr.shape)} is not "
                             f"{dtype}[{', '.join(['n', *map(str, each)])}]")
        if arr.shape[0] != rows or not 1 <= rows <= max_rows:
            raise ValueError(f"{msg.kind} arrays have {arr.shape[0]} rows, need 1..{max_rows}, equal")


CHAIN = (ACT, EVAL, EOF, CHECKPOINT)  # what goes down the chain of layers


class ActivationCheck:
    """The check of a layer's activation inbox: act/eval/checkpoint/eof from
    the one upstream role, (n, width) inputs with (n, labels) labels, each
    exactly the next message of the run's data stream (``turns``, from
    ``schedule.stream``): kind, batch id, epoch and row count. A message out
    of turn (early, late, a second copy, an eof or a test batch nobody sent
    at that point) cannot be ours, and is dropped before the node sees it.
    Inputs are images (n, h, w, c) below a convolutional layer.
    The input inbox of an unlocked layer is checked the same way: ``kinds``
    (INPUT,) from the source, ``turns`` from ``schedule.input_stream``."""

    def __init__(self, upstream: str, shape: int | tuple[int, ...], labels: int, max_rows: int,
                 turns: Iterator[tuple], dtype: np.dtype = np.dtype(np.float64),
                 kinds: tuple[str, ...] = CHAIN):
        self.kinds = kinds
        self.upstream = upstream
        each = (shape,) if isinstance(shape, int) else tuple(shape)  # one example's
        self.shapes = [(None, *each), (None, labels)]
        self.max_rows = max_rows
        self.dtype = dtype
        self.turns = turns
        self.next = next(turns, None)  # (kind, batch, epoch or None, rows): what must come

    def __call__(self, msg: Message) -> None:
        expect(msg, self.kinds, self.shapes, self.dtype, self.max_rows)
        if msg.sender != self.upstream:
            raise ValueError(f"activation from {msg.sender!r}, expected {self.upstream!r}")
        at = (test_epoch(msg) if msg.kind == EVAL else epoch(msg) if msg.kind == CHECKPOINT
              else None)  # each raises on a malformed field
        got = (msg.kind, msg.batch, at, msg.arrays[0].shape[0] if msg.arrays else 0)
        if self.next is None:
            raise ValueError(f"{msg.kind} of batch {msg.batch} after the end of the stream")
        if got != tuple(self.next):
            raise ValueError(f"out of turn: {_turn(got)}, expected {_turn(self.next)}")
        self.next = next(self.turns, None)


def _turn(t: tuple) -> str:
    kind, batch, at, rows = t
    return (f"{kind} of batch {batch}" + (f" (epoch {at})" if at is not None else "")
            + (f" with {rows} rows" if rows else ""))
