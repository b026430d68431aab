"""The node drivers: what each role of the pipeline does with each message.

Socket-free and clock-free: a node takes a message and the time, works on
its layer, and hands what it has to say to its *outlet*, given at
construction: ``outlet(port, message)`` with port ``down`` (activations, to
the next role), ``up`` (gradients, to the previous layer) or ``link``
(metrics and checkpoints, to the coordinator). The layer itself never calls
out: it returns what it computed, phase by phase, and the node sends each
result the moment it is known (a layer's output goes down before its own
update, dx up before its weight gradient), so a worker's neighbours start on
it at once. The schedule rule (which message a layer may read next, when it
is done) is the node's: ``may_take`` and ``finished``, from
``pipeline.nodes.schedule``.

The worker processes are socket pumps around these nodes
(``pipeline.net.pump``); the in-process reference (``pipeline.nodes.reference``)
drives the very same objects through plain queues. So the lockstep pipeline
and the reference run one implementation of the schedule, and end with the
same bits.
"""
from __future__ import annotations

from typing import Callable, Iterator, Protocol

import numpy as np

from pipeline.nodes import schedule
from pipeline.wire import protocol
from pipeline.layers.state import layer_state
from pipeline.config import Config
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.build import make_hidden, make_output
from pipeline.layers.output import OutputLayer
from pipeline.wire.checks import ActivationCheck, expect
from pipeline.wire.protocol import ACT, CHECKPOINT, EOF, EVAL, GRAD, Message, Speaker
from pipeline.layers.stats import EpochStats, InputEpoch, LayerEpoch
from pipeline.nodes.streams import Streams

Outlet = Callable[[str, Message], None]  # (port: "down", "up" or "link", message)


class Arrays(Protocol):
    """What a run trains on, as the source sends it (``tasks.Task``)."""
    x: np.ndarray                   # (examples, features) training inputs
    y: np.ndarray                   # (examples, outputs) training targets
    test_x: np.ndarray | None
    test_y: np.ndarray | None


class _LayerNode:
    """What the hidden and the output nodes share: the check of their
    activation inbox, and under ``--unlock forward`` their place in the two
    data streams (``pipeline.nodes.streams``), which decides the inbox to read."""

    def __init__(self, cfg: Config, layer: HiddenLayer | OutputLayer, role: str,
                 run_id: str, start: float, outlet: Outlet):
        self.cfg, self.layer, self.role = cfg, layer, role
        self.say = Speaker(run_id, role)
        self.outlet = outlet
        self.start = start
        self.stream_ended = False
        shapes = cfg.shapes
        self.check_activation = ActivationCheck(
            protocol.upstream(layer.index, cfg.layers), shapes[layer.index - 1], cfg.dims[-1],
            cfg.batch_size, schedule.stream(cfg), cfg.np_dtype)
        self.streams = Streams(cfg, layer.si) if layer.si is not None else None
        self.check_input = self.streams.check if self.streams is not None else None

    # -- the schedule: the rule of each kind of node --------------------------------
    def _take_batch(self) -> bool:
        """May a new training batch come in (the gradient rule)?"""
        return True

    def _blocked(self) -> bool:
        """Is the node held at a checkpoint barrier?"""
        return False

    def may_take(self) -> bool:
        """May the next message of the activation inbox be read?"""
        take = self._take_batch() if self.streams is None else self._reads().act
        return schedule.may_read(stream_ended=self.stream_ended, at_barrier=self._blocked(),
                                 take=take)

    def may_take_input(self) -> bool:
        """May the next message of the input inbox be read (unlocked only)?"""
        return self.streams is not None and self._reads().input

    def _reads(self) -> schedule.Reads:
        return self.streams.reads(self.layer.clock, self._take_batch(),
                                  blocked=self._blocked())

    # -- messages ------------------------------------------------------------------
    def on_input(self, msg: Message, now: float) -> None:
        """The source's copy of a training batch: the synthetic step (nothing sent)."""
        x, y = msg.arrays
        self.layer.synthetic_step(msg.batch, x, y, now)
        self.streams.took_input()

    def _expire_guesses(self) -> None:
        """Unlocked: the synthetic steps whose true input never came (a run
        cut short; a finished stream takes every one) are counted."""
        if self.layer.si is not None:
            self.layer.stats.inputs.expired_inputs += self.layer.si.expire()


class HiddenNode(_LayerNode):
    """A hidden layer: forward each training batch (DNI: update at once with
    the synthetic gradient and send dx up), apply true gradients when they
    are due, pass evaluation batches, barriers and the end of the stream on.

    Unlocked (``--unlock forward``, layers above the first): a third inbox,
    the source's inputs (``on_input``: the synthetic step, nothing sent);
    a true input from the chain carries the true chain on (h down, dx up)
    and trains the synthetic-input model; ``pipeline.nodes.streams`` says which
    inbox may be read next."""

    def __init__(self, cfg: Config, index: int, outlet: Outlet, run_id: str = "",
                 start: float = 0.0, layer: HiddenLayer | None = None):
        layer = layer if layer is not None else make_hidden(cfg, index)
        super().__init__(cfg, layer, protocol.layer_role(index, cfg.layers), run_id, start,
                         outlet)
        self.index = index
        self.down_role = protocol.downstream(index, cfg.layers)
        self.has_up = index > 1
        self.barrier: Message | None = None   # a checkpoint waiting for due gradients
        self.epochs = LayerEpoch(self.role, cfg.batches_per_epoch)

    # -- the schedule --------------------------------------------------------------
    def _take_batch(self) -> bool:
        c, layer = self.cfg, self.layer
        return schedule.may_take_batch(mode=c.mode, lockstep=c.lockstep,
                                       pending=len(layer.pending),
                                       due_outstanding=layer.due_outstanding(),
                                       max_inflight=c.max_inflight, grad_delay=c.grad_delay)

    def _blocked(self) -> bool:
        return self.barrier is not None

    @property
    def finished(self) -> bool:
        return schedule.finished(stream_ended=self.stream_ended,
                                 due_outstanding=self.layer.due_outstanding())

    # -- checks of what arrives (ValueError: counted and dropped) ------------------
    def check_gradient(self, msg: Message) -> None:
        lost = protocol.is_lost(msg)
        expect(msg, (GRAD,), [] if lost else [(None, *self.cfg.shapes[self.index])],
               self.cfg.np_dtype, self.cfg.batch_size)
        if msg.sender != self.down_role:
            raise ValueError(f"gradient from {msg.sender!r}, expected {self.down_role!r}")
        p = self.layer.pending.get(msg.batch)
        if p is None or msg.batch in self.layer.arrived:
            raise ValueError(f"gradient for batch {msg.batch}, which is not awaited")
        if not lost and msg.arrays[0].shape[0] != p.rows:
            raise ValueError(f"gradient for batch {msg.batch} has {msg.arrays[0].shape[0]} "
                             f"rows, the batch had {p.rows}")

    # -- messages ------------------------------------------------------------------
    def on_input(self, msg: Message, now: float) -> None:
        super().on_input(msg, now)
        self._settle(now)  # the clock moved: gradients may have become due

    def on_activation(self, msg: Message, now: float) -> None:
        say, layer = self.say, self.layer
        if self.streams is not None:
            self.streams.took_chain(msg.kind)
        if msg.kind == ACT:
            self._train(msg.batch, *msg.arrays, now)
            self._settle(now)  # the clock moved: gradients may have become due
        elif msg.kind == EVAL:
            x, y = msg.arrays
            self.outlet("down", say.evaluation(msg.batch, layer.step, layer.forward_eval(x), y,
                                               protocol.test_epoch(msg)))
        elif msg.kind == CHECKPOINT:
            self.barrier = msg  # take nothing more until the barrier may pass
        elif msg.kind == EOF:
            self.outlet("down", say.eof(msg.batch))
            self.stream_ended = True
        self._at_barrier()

    def _train(self, b: int, x: np.ndarray, y: np.ndarray, now: float) -> None:
        """A training batch from the chain: h down at once, then (DNI) dx up
        before the layer's own update. Unlocked, it is the true input of a
        batch the layer already stepped on synthetically."""
        say, layer = self.say, self.layer
        unlocked = self.streams is not None
        h = layer.begin_true(b, x, y) if unlocked else layer.begin(b, x, y, now)
        self.outlet("down", say.act(b, layer.step, h, y))
        if not layer.uses_sg:
            return  # backprop modes: the batch waits for its true gradient
        dx = layer.synthetic_dx(need_dx=self.has_up)
        if dx is not None:
            self.outlet("up", say.grad(b, layer.step, dx))
        if not unlocked:
            layer.end()
            return
        a = layer.end_true(self.cfg.si_second_step)
        layer.stats.inputs.record(a)
        self.epochs.add_input(a)

    def on_gradient(self, msg: Message, now: float) -> None:
        if protocol.is_lost(msg):
            self.layer.lose(msg.batch)
            self._lost_upstream(msg.batch)
        elif not self.layer.receive(msg.batch, msg.arrays[0]):
            self._lost_upstream(msg.batch)
        self._settle(now)
        self._at_barrier()

    def finish(self, now: float) -> tuple[dict, dict[str, np.ndarray]]:
        """Training is over: the gradients not yet due expire (and the
        guesses whose true input never came); returns the layer's counters
        and weights."""
        self.layer.expire()
        self._expire_guesses()
        event = self.epochs.flush(now - self.start)
        if event:
            self.outlet("link", self.say.metric(event))
        return self.layer.stats.as_dict(), self.layer.weights()

    def _settle(self, now: float) -> None:
        """Apply every true gradient that has come and is due, oldest first
        (backprop modes: each dx up before its update)."""
        say, layer = self.say, self.layer
        if not layer.arrived:
            return  # nothing to apply (the common case right after a forward pass)
        if self.streams is not None and self.streams.owed(layer.clock):
            return  # a step's true input comes before its gradients (schedule.input_owed)
        applied = []
        while (batch := layer.next_due()) is not None:
            dx = None if layer.uses_sg else layer.backward_dx(batch, need_dx=self.has_up)
            if dx is not None:
                self.outlet("up", say.grad(batch, layer.step, dx))
            applied.append(layer.apply(batch, now, dx))
        for a in applied:
            event = self.epochs.add(a, now - self.start)
            if event:
                self.outlet("link", say.metric(event))

    def _lost_upstream(self, batch: int) -> None:
        # Backprop modes: no gradient for this batch will go up; say so, or
        # the layer above would wait for it forever.
        if not self.layer.uses_sg and self.has_up:
            self.outlet("up", self.say.lost(batch, self.layer.step))

    def _at_barrier(self) -> None:
        """Save this layer's state to the coordinator once the barrier may
        pass (``schedule.barrier_passes``), then pass it on."""
        layer = self.layer
        if self.barrier is None or not schedule.barrier_passes(
                uses_sg=layer.uses_sg, due_outstanding=layer.due_outstanding(),
                awaited=len(layer.pending) - len(layer.arrived)):
            return
        msg, self.barrier = self.barrier, None
        epoch = protocol.epoch(msg)
        self.outlet("link", self.say.state(epoch, *layer_state(self.layer)))
        self.outlet("down", self.say.barrier(msg.batch, epoch))


class OutputNode(_LayerNode):
    """The output layer: loss, true gradient up, its own update; the test
    split's evaluation after every epoch; the final evaluation pass, whose
    result goes to the coordinator at the end of the stream."""

    def __init__(self, cfg: Config, outlet: Outlet, run_id: str = "", start: float = 0.0,
                 layer: OutputLayer | None = None):
        layer = layer if layer is not None else make_output(cfg)
        super().__init__(cfg, layer, protocol.OUTPUT, run_id, start, outlet)
        self.batches = 0            # training batches done
        self.train_s = 0.0          # when the last training epoch ended
        self.stats, self.evaluation, self.test = EpochStats(), EpochStats(), EpochStats()
        self.last_test: dict = {}
        self.held: list[dict] = []  # an epoch's event, until its test split is evaluated
        self.input_epoch = InputEpoch()  # --unlock forward: the epoch's true inputs

    @property
    def finished(self) -> bool:
        return self.stream_ended

    def on_activation(self, msg: Message, now: float) -> None:
        cfg, out, say = self.cfg, self.layer, self.say
        if self.streams is not None:
            self.streams.took_chain(msg.kind)
        if msg.kind == ACT:
            x, y = msg.arrays
            if self.streams is None:
                dx, loss, correct = out.train_step(x, y, need_dx=True)
            else:
                a, dx, loss, correct = out.true_input(msg.batch, x, y, need_dx=True,
                                                      second_step=cfg.si_second_step)
                out.stats.inputs.record(a)
                self.input_epoch.add(a)
            self.batches += 1
            self.outlet("up", say.grad(msg.batch, out.step, dx))
            self.stats.add(loss, correct, len(y))
            if schedule.ends_epoch(msg.batch, cfg.batches_per_epoch):
                self._end_epoch(msg.batch, now)
        elif msg.kind == EVAL and protocol.test_epoch(msg) is not None:
            x, y = msg.arrays
            self.test.add(*out.evaluate(x, y), len(y))
            if self.test.batches == cfg.test_batches:
                loss, accuracy, _ = self.test.take()
                self.last_test.update(test_loss=loss, test_accuracy=accuracy)
                if self.held:  # the epoch just trained (a resumed run trains it first too)
                    self.outlet("link", say.metric({**self.held.pop(), **self.last_test}))
        elif msg.kind == EVAL:
            x, y = msg.arrays
            self.evaluation.add(*out.evaluate(x, y), len(y))
        elif msg.kind == CHECKPOINT:  # nothing in flight here: save at once
            self.outlet("link", say.state(protocol.epoch(msg), *layer_state(out)))
        elif msg.kind == EOF:
            self.stream_ended = True
            final_loss, accuracy, _ = self.evaluation.take()
            self.outlet("link", say.metric({
                "event": "final", "role": self.role, "final_loss": final_loss,
                "train_accuracy": accuracy, "batches": self.batches,
                "train_s": self.train_s, **self.last_test}))

    def _end_epoch(self, batch: int, now: float) -> None:
        """The epoch's event (its epoch counted from 1), held until its test
        split is evaluated (if any)."""
        cfg = self.cfg
        self.train_s = now - self.start
        event = self.stats.epoch_event(self.role, schedule.epoch_of(
            batch, cfg.batches_per_epoch) + 1, self.train_s)
        event.update(self.input_epoch.take())
        if cfg.test_examples:
            self.held.append(event)
        else:
            self.outlet("link", self.say.metric(event))

    def finish(self, now: float) -> tuple[dict, dict[str, np.ndarray]]:
        self._expire_guesses()
        return self.layer.stats.as_dict(), self.layer.weights()


class SourceNode:
    """The data source: every epoch's training batches (labels ride along),
    after each epoch the test split (when there is one) and a checkpoint
    barrier where one is due, then the evaluation pass over the training set,
    then the end of the stream. The data comes in (``task``): the node reads
    no file."""

    def __init__(self, cfg: Config, task: Arrays, run_id: str = ""):
        self.cfg = cfg
        self.task = task
        self.say = Speaker(run_id, protocol.SOURCE)
        self.batches = cfg.start_epoch * cfg.batches_per_epoch  # a resumed run goes on

    def fan_out(self, msg: Message) -> list[tuple[str, Message]]:
        """Where a message of ``messages`` goes: down the chain, and when
        unlocked a training batch also to every unlocked layer as an INPUT
        (the same arrays), port ``input:<role>``."""
        out = [("down", msg)]
        if msg.kind == ACT and self.cfg.unlocked:
            x, y = msg.arrays
            out += [(protocol.input_port(role), self.say.input(msg.batch, x, y))
                    for role in self.cfg.input_roles]
        return out

    def messages(self) -> Iterator[Message]:
        cfg, task, say = self.cfg, self.task, self.say
        # Contiguous arrays: each batch goes on the wire as its own zero-copy frame.
        test = (_cut(task.test_x, task.test_y, schedule.test_batches(cfg))
                if task.test_x is not None else [])
        for epoch in range(cfg.start_epoch, cfg.epochs):
            for s in schedule.epoch_batches(cfg, epoch):
                yield say.act(self.batches, 0, np.ascontiguousarray(task.x[s]),
                              np.ascontiguousarray(task.y[s]))
                self.batches += 1
            for i, (xb, yb) in enumerate(test):
                yield say.evaluation(i, 0, xb, yb, epoch)
            if schedule.checkpoint_due(epoch, cfg):
                yield say.barrier(self.batches - 1, epoch)
        for i, s in enumerate(schedule.batch_slices(cfg.examples, cfg.batch_size)):
            yield say.evaluation(i, 0, np.ascontiguousarray(task.x[s]),
                                 np.ascontiguousarray(task.y[s]), None)
        yield say.eof(self.batches)


def _cut(xs: np.ndarray, ys: np.ndarray, parts: list) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(np.ascontiguousarray(xs[s]), np.ascontiguousarray(ys[s])) for s in parts]
