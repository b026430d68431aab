"""Scheduling rules, as pure functions: when a layer may take its next batch
(a true gradient is due by ``staleness.is_due``), which inbox an unlocked
layer may read, when it is done, where a batch falls in the epochs, and
which examples make it. The node drivers (``pipeline.nodes.driver``) ask these and
nothing else, in the workers and in the in-process reference alike."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np

from pipeline.math.staleness import is_due


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
    stream, nor while a checkpoint barrier waits (``barrier_passes``);
    otherwise as ``may_take_batch`` says (``take``)."""
    return not stream_ended and not at_barrier and take


def barrier_passes(*, uses_sg: bool, due_outstanding: int, awaited: int) -> bool:
    """May a layer save its state at a checkpoint barrier and pass it on?

    ``awaited``: batches forwarded whose gradient has not arrived (due or
    not). DNI modes: once every gradient has arrived, due or not (each was
    sent when the layer above forwarded its batch, before the barrier got
    there), so the checkpoint holds the ones not yet due and a resume goes
    on exactly; backprop modes: once no due gradient is outstanding (a later
    one comes only when the layers above step on after the barrier: waiting
    for it would deadlock, and it expires at a resume)."""
    return (awaited if uses_sg else due_outstanding) == 0


def finished(*, stream_ended: bool, due_outstanding: int) -> bool:
    """A layer is done when the stream has ended and no due gradient is
    still to come (those not yet due never will be: they expire)."""
    return stream_ended and due_outstanding == 0


# --- --unlock forward: the input inbox beside the chain's ---------------------------

class Reads(NamedTuple):
    """Which data inboxes an unlocked layer may read now (gradients: always)."""
    input: bool   # the source's (x, y) of its next training batch: a synthetic step
    act: bool     # the chain's next message: a true input, or eval, checkpoint, eof


def input_stop(batch: int, cfg) -> int:
    """The last training batch an unlocked layer may step on synthetically
    while the chain's next true input is that of ``batch``: the last batch
    before the next checkpoint barrier, or of the run. So the forward delay
    never spans a barrier or the end: the true inputs held there are taken
    even if not yet due, and a checkpoint holds no guess."""
    bpe, every = cfg.batches_per_epoch, cfg.checkpoint_every
    if every:
        epoch = -(-(batch // bpe + 1) // every) * every - 1  # checkpoint_due's next epoch
        if epoch + 1 < cfg.epochs:
            return (epoch + 1) * bpe - 1
    return cfg.epochs * bpe - 1


def input_owed(*, clock: int, oldest_guess_clock: int | None, input_delay: int,
               inputs_left: bool) -> bool:
    """Is a true input due (``input_delay`` steps after its synthetic step,
    or at once when no synthetic step may come before the barrier) and not
    taken yet? ``oldest_guess_clock``: the layer's clock at its oldest
    synthetic step still waiting for its true input (None: none waits).
    While one is owed, the layer applies no true gradient: under --lockstep
    every step's true input comes before its gradients, whatever arrives first."""
    if oldest_guess_clock is None:
        return False
    return not inputs_left or is_due(clock, oldest_guess_clock, input_delay)


def unlocked_reads(*, lockstep: bool, chain_kind: str | None, head_guessed: bool,
                   owed: bool, inputs_left: bool, take_batch: bool, blocked: bool,
                   guesses: int, input_delay: int, max_inflight: int) -> Reads:
    """What may an unlocked layer read next?

    ``chain_kind``: the kind of the chain's next turn (None: it has ended);
    ``head_guessed``: it is a true input whose synthetic step was taken;
    ``owed``: ``input_owed``; ``inputs_left``: a synthetic step may still
    come before the barrier (``input_stop``); ``take_batch``: the gradient
    rule (``may_take_batch``) lets a new batch in; ``blocked``: at a
    checkpoint barrier; ``guesses``: synthetic steps awaiting their true input.

    * the chain: its evaluation batches, barriers and end at once (every true
      input before them is taken); a true input only once its synthetic step
      was taken and it is owed (a chain that runs ahead waits in its inbox);
    * --lockstep: the next synthetic step only when nothing may be read from
      the chain, so each true input comes exactly ``input_delay`` steps late;
    * free-running: up to ``input_delay + max_inflight`` guesses in flight.
    """
    act = chain_kind is not None and (chain_kind != "act" or (head_guessed and owed))
    take = inputs_left and take_batch and not blocked
    if lockstep:
        return Reads(take and not act, act)
    return Reads(take and guesses < input_delay + max_inflight, act)


def input_stream(cfg) -> Iterator[Turn]:
    """The messages of an unlocked layer's input inbox: each training batch
    of ``stream``, as the source sends it, and nothing else."""
    return (Turn("input", t.batch, None, t.rows) for t in stream(cfg) if t.kind == "act")


def epoch_of(batch: int, batches_per_epoch: int) -> int:
    """The index from 0 of ``batch``'s epoch, as the schedule counts (the
    metric events a user reads count from 1: this + 1)."""
    return batch // batches_per_epoch


def ends_epoch(batch: int, batches_per_epoch: int) -> bool:
    """Is ``batch`` the last of its epoch?"""
    return batch % batches_per_epoch == batches_per_epoch - 1


def checkpoint_due(epoch: int, cfg) -> bool:
    """Is there a checkpoint after ``epoch`` (its index from 0, as the
    barrier carries it; the run directory names it ``epoch + 1``)? Every
    ``checkpoint_every`` epochs, except after the last (the run's end saves
    the weights anyway)."""
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
    order (``checks.ActivationCheck``)."""
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


# --- which examples make each batch -----------------------------------------------------

def batch_slices(examples: int, batch_size: int) -> list[slice]:
    """The batches of one epoch, in the notebook's fixed order; the last may be short."""
    return [slice(i, min(i + batch_size, examples)) for i in range(0, examples, batch_size)]


def epoch_batches(cfg, epoch: int) -> list[np.ndarray] | list[slice]:
    """The batches of ``epoch``: the notebook's fixed order, or with ``shuffle`` a
    permutation drawn from (seed, epoch), so every process and the reference
    agree, and a resumed run draws what the uninterrupted one did."""
    if not cfg.shuffle:
        return batch_slices(cfg.examples, cfg.batch_size)
    order = np.random.default_rng([cfg.seed, 0x5F1E, epoch]).permutation(cfg.examples)
    return [order[i:i + cfg.batch_size] for i in range(0, cfg.examples, cfg.batch_size)]


def test_batches(cfg) -> list[slice]:
    return batch_slices(cfg.test_examples, cfg.batch_size)
