"""Scheduling rules, as pure functions: when a true gradient is due, when a
layer may take its next batch, when it is done, and where a batch falls in
the epochs. The node drivers (``pipeline.driver``) ask these and nothing
else, in the workers and in the in-process reference alike."""
from __future__ import annotations

from typing import Container, Iterator, Mapping, NamedTuple, Protocol


class _Forwarded(Protocol):
    clock: int  # the layer's clock right after the batch's forward pass


def is_due(clock: int, batch_clock: int, grad_delay: int) -> bool:
    """Is the gradient of a batch forwarded at ``batch_clock`` due, the
    layer's clock being at ``clock``? (K = ``grad_delay`` steps later.)"""
    return clock - batch_clock >= grad_delay


def due_outstanding(clock: int, pending: Mapping[int, _Forwarded], arrived: Container[int],
                    grad_delay: int) -> int:
    """Batches ``pending`` (batch -> what the layer keeps of it, with the
    clock of its forward pass) whose gradient is due but has not ``arrived``."""
    due_clock = clock - grad_delay  # is_due, for every batch at once
    return sum(1 for b, p in pending.items() if b not in arrived and p.clock <= due_clock)


def may_take_batch(*, mode: str, lockstep: bool, pending: int, due_outstanding: int,
                   max_inflight: int, grad_delay: int) -> bool:
    """May a layer read its next activation message?

    ``pending``: batches forwarded whose gradient is not applied yet;
    ``due_outstanding``: those among them whose gradient is due (the layer's
    clock is ``grad_delay`` steps past them) but has not arrived.

    * backprop: locked, one batch at a time: the gradient of t before t+1;
    * --lockstep: never step past a due gradient, so each gradient is applied
      exactly ``grad_delay`` steps late and the sequence of updates is the
      reference's;
    * free-running: up to ``grad_delay + max_inflight`` batches in flight;
      past that the layer stops reading and ZeroMQ's high-water mark pushes
      back upstream.
    """
    if mode == "backprop":
        return pending == 0
    if lockstep:
        return due_outstanding == 0
    return pending < grad_delay + max_inflight


def may_read(*, stream_ended: bool, at_barrier: bool, take: bool) -> bool:
    """May a layer read its activation inbox at all? Not after the end of
    stream, nor while a checkpoint barrier waits for its due gradients;
    otherwise as ``may_take_batch`` says (``take``)."""
    return not stream_ended and not at_barrier and take


def finished(*, stream_ended: bool, due_outstanding: int) -> bool:
    """A layer is done when the stream has ended and no due gradient is
    still to come (those not yet due never will be: they expire)."""
    return stream_ended and due_outstanding == 0


def epoch_of(batch: int, batches_per_epoch: int) -> int:
    return batch // batches_per_epoch


def ends_epoch(batch: int, batches_per_epoch: int) -> bool:
    """Is ``batch`` the last of its epoch?"""
    return batch % batches_per_epoch == batches_per_epoch - 1


def checkpoint_due(epoch: int, cfg) -> bool:
    """Is there a checkpoint after ``epoch``? Every ``checkpoint_every``
    epochs, except after the last (the run's end saves the weights anyway)."""
    every = cfg.checkpoint_every
    return every > 0 and (epoch + 1) % every == 0 and epoch + 1 < cfg.epochs


class Turn(NamedTuple):
    """One message of the data stream as the source sends it and every layer
    passes it on: its kind, batch id, epoch (a test batch's or a barrier's,
    else None) and row count (0: no arrays)."""
    kind: str
    batch: int
    epoch: int | None
    rows: int


def _rows(examples: int, batch_size: int) -> Iterator[int]:
    return (min(batch_size, examples - i) for i in range(0, examples, batch_size))


def stream(cfg) -> Iterator[Turn]:
    """Every message of a run's data stream, in order: per epoch its training
    batches, the test split (if any) and a checkpoint barrier where one is
    due; then the final pass over the training set and the end of stream.
    The source sends exactly this; a layer takes nothing else, in no other
    order (``protocol.ActivationCheck``)."""
    batch = cfg.start_epoch * cfg.batches_per_epoch
    for epoch in range(cfg.start_epoch, cfg.epochs):
        for rows in _rows(cfg.examples, cfg.batch_size):
            yield Turn("act", batch, None, rows)
            batch += 1
        for i, rows in enumerate(_rows(cfg.test_examples, cfg.batch_size)):
            yield Turn("eval", i, epoch, rows)
        if checkpoint_due(epoch, cfg):
            yield Turn("checkpoint", batch - 1, epoch, 0)
    for i, rows in enumerate(_rows(cfg.examples, cfg.batch_size)):
        yield Turn("eval", i, None, rows)
    yield Turn("eof", batch, None, 0)
