"""Where an unlocked node (``--unlock forward``) stands in its two data
streams, the chain's and the source's inputs, and so which inbox it may
read next (``schedule.unlocked_reads``). Pure: no sockets, no clock; the
hidden and the output nodes of ``pipeline.nodes.driver`` each keep one."""
from __future__ import annotations

from pipeline.nodes import schedule
from pipeline.config import Config
from pipeline.wire.checks import ActivationCheck
from pipeline.wire.protocol import ACT, INPUT, SOURCE
from pipeline.nodes.schedule import Reads
from pipeline.layers.input_model import InputPredictor


class Streams:
    """The next turn of the chain (true inputs, evaluation batches, barriers,
    the end), the next training batch of the input inbox, and the layer's
    synthetic-input model with the guesses awaiting their true input."""

    def __init__(self, cfg: Config, si: InputPredictor):
        self.cfg, self.si = cfg, si
        self._chain = schedule.stream(cfg)
        self.chain_next = next(self._chain, None)
        self._inputs = schedule.input_stream(cfg)
        self.input_next = next(self._inputs, None)
        self.true_next = cfg.start_epoch * cfg.batches_per_epoch  # next true input's batch
        d = cfg.dims
        self.check = ActivationCheck(SOURCE, d[0], d[-1], cfg.batch_size,
                                     schedule.input_stream(cfg), cfg.np_dtype, kinds=(INPUT,))

    def took_chain(self, kind: str) -> None:
        if kind == ACT:
            self.true_next += 1
        self.chain_next = next(self._chain, None)

    def took_input(self) -> None:
        self.input_next = next(self._inputs, None)

    def inputs_left(self) -> bool:
        """May a synthetic step still come before the next barrier or the end?"""
        n, c = self.input_next, self.chain_next
        return (n is not None and not (c is not None and c.kind == "checkpoint")
                and n.batch <= schedule.input_stop(self.true_next, self.cfg))

    def owed(self, clock: int) -> bool:
        """Is the oldest guess's true input due and not yet taken?"""
        pending = self.si.pending  # in batch order: guesses are made in order
        oldest = pending[next(iter(pending))].clock if pending else None
        return schedule.input_owed(clock=clock, oldest_guess_clock=oldest,
                                   input_delay=self.cfg.input_delay,
                                   inputs_left=self.inputs_left())

    def reads(self, clock: int, take_batch: bool, blocked: bool) -> Reads:
        c, cfg = self.chain_next, self.cfg
        return schedule.unlocked_reads(
            lockstep=cfg.lockstep, chain_kind=c.kind if c is not None else None,
            head_guessed=c is not None and c.kind == ACT and c.batch in self.si.pending,
            owed=self.owed(clock), inputs_left=self.inputs_left(), take_batch=take_batch,
            blocked=blocked, guesses=len(self.si.pending), input_delay=cfg.input_delay,
            max_inflight=cfg.max_inflight)
