"""Scheduling rules, as pure functions: when a layer may take its next batch,
and where a batch falls in the epochs."""
from __future__ import annotations


def may_take_batch(*, mode: str, lockstep: bool, pending: int, max_inflight: int) -> bool:
    """May a layer read its next activation message, with ``pending`` batches
    still waiting for their true gradient?

    * backprop: locked, one batch at a time: the gradient of t before t+1;
    * DNI under --lockstep: the same rule, so the layer's sequence of updates
      is the reference's (forward t, SG update t, forward t+1, ...);
    * DNI free-running: up to ``max_inflight`` batches in flight; past that it
      stops reading, and ZeroMQ's high-water mark pushes back upstream.
    """
    if mode == "backprop" or lockstep:
        return pending == 0
    return pending < max_inflight


def epoch_of(batch: int, batches_per_epoch: int) -> int:
    return batch // batches_per_epoch


def ends_epoch(batch: int, batches_per_epoch: int) -> bool:
    """Is ``batch`` the last of its epoch?"""
    return batch % batches_per_epoch == batches_per_epoch - 1
