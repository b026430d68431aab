"""The in-process reference trainer: the pipeline's math in one process, in the seed's order.

It is the oracle for the multi-process pipeline (under ``--lockstep`` the
pipeline must end with the same weights, bit for bit) and the baseline it is
timed against.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from pipeline import data, tasks
from pipeline.config import Config
from pipeline.model import make_hidden, make_output, role_name
from pipeline.nodes import HiddenLayer, OutputLayer
from pipeline.stats import EpochStats, LayerEpoch

Event = dict
Emit = Callable[[Event], None]


@dataclass
class ReferenceResult:
    hidden: list[HiddenLayer]
    output: OutputLayer
    wall_s: float
    batches: int
    final_loss: float
    train_accuracy: float
    test_loss: float | None = None       # after the last epoch, on the test split
    test_accuracy: float | None = None


def evaluate(hidden: list[HiddenLayer], output: OutputLayer, x: np.ndarray, y: np.ndarray,
             slices: list[slice]) -> tuple[float, float]:
    """Mean loss and accuracy (exact sums, or correct classes) with the
    current weights, batch by batch (the batches of the pipeline's
    evaluation pass), no updates."""
    stats = EpochStats()
    for s in slices:
        h = x[s]
        for layer in hidden:
            h = layer.forward_eval(h)
        stats.add(*output.evaluate(h, y[s]), s.stop - s.start)
    loss, accuracy, _ = stats.take()
    return loss, accuracy


def train_reference(cfg: Config, emit: Emit | None = None,
                    should_stop: Callable[[], bool] | None = None) -> ReferenceResult:
    """Train ``cfg`` in this process, under the pipeline's --lockstep rules.

    Per batch t, as the seed does: forward through every layer (DNI layers
    update at once with their synthetic gradient and send dx up), the output
    layer's update, then, from the top layer down, every layer applies the
    true gradients that have arrived and are due (backprop modes pass each
    one further up). Each layer thus sees exactly the sequence of operations
    it sees in the lockstep pipeline, which makes the weights bit-identical.
    """
    emit = emit or (lambda event: None)
    task = tasks.load(cfg)
    x, y = task.x, task.y
    hidden = [make_hidden(cfg, k) for k in range(1, cfg.layers)]
    output = make_output(cfg)
    out_stats = EpochStats()
    layer_epochs = [LayerEpoch(role_name(k, cfg), cfg.batches_per_epoch)
                    for k in range(1, cfg.layers)]
    start = time.perf_counter()

    def deliver(k: int, batch: int, grad: np.ndarray) -> None:
        """The gradient of ``batch`` reaches hidden layer k (0-based)."""
        if k >= 0 and not hidden[k].receive(batch, grad):
            lost(k - 1, batch)

    def lost(k: int, batch: int) -> None:
        """Backprop modes: a gradient lost at k+1 never reaches k either."""
        if k >= 0 and not hidden[k].uses_sg:
            hidden[k].lose(batch)
            lost(k - 1, batch)

    def settle(k: int, elapsed: float) -> None:
        for a in hidden[k].apply_ready(need_dx=k > 0):
            if a.dx is not None:
                deliver(k - 1, a.batch, a.dx)
            event = layer_epochs[k].add(a, elapsed)
            if event:
                emit(event)

    t = 0
    test = None
    for epoch in range(cfg.epochs):
        for s in tasks.epoch_batches(cfg, epoch):
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            xb, yb = x[s], y[s]
            h = xb
            for k, layer in enumerate(hidden):
                h, dx = layer.forward(t, h, yb, need_dx=k > 0)
                if dx is not None:
                    deliver(k - 1, t, dx)
            grad, loss, correct = output.train_step(h, yb, need_dx=True)
            out_stats.add(loss, correct, len(yb))
            deliver(len(hidden) - 1, t, grad)
            elapsed = time.perf_counter() - start
            for k in range(len(hidden) - 1, -1, -1):
                settle(k, elapsed)
            t += 1
        event = out_stats.epoch_event("output", epoch, time.perf_counter() - start)
        if task.test_x is not None:  # as the pipeline does: between this epoch and the next
            test = evaluate(hidden, output, task.test_x, task.test_y, tasks.test_batches(cfg))
            event.update(test_loss=test[0], test_accuracy=test[1])
        emit(event)
    wall = time.perf_counter() - start
    for layer, epochs in zip(hidden, layer_epochs):
        layer.expire()
        event = epochs.flush(wall)
        if event:
            emit(event)
    final_loss, acc = evaluate(hidden, output, x, y, data.batch_slices(cfg.examples,
                                                                      cfg.batch_size))
    return ReferenceResult(hidden, output, wall, t, final_loss, acc, *(test or (None, None)))
