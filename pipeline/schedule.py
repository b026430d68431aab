"""Scheduling rules, as pure functions: when a layer may take its next batch,
and where a batch falls in the epochs."""
from __future__ import annotations


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
