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

from pipeline import data
from pipeline.config import Config
from pipeline.model import make_hidden, make_output, role_name
from pipeline.nodes import HiddenLayer, OutputLayer
from pipeline.stats import EpochStats

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


def evaluate(hidden: list[HiddenLayer], output: OutputLayer, x: np.ndarray, y: np.ndarray,
             slices: list[slice]) -> tuple[float, float]:
    """Mean loss and exact-match rate with the current weights, batch by batch
    (the same batches the pipeline's evaluation pass uses)."""
    loss = 0.0
    correct = 0
    for s in slices:
        h = x[s]
        for layer in hidden:
            h = layer.forward_eval(h)
        batch_loss, batch_correct = output.evaluate(h, y[s])
        loss += batch_loss * (s.stop - s.start)
        correct += batch_correct
    return loss / len(x), correct / len(x)


def train_reference(cfg: Config, emit: Emit | None = None,
                    should_stop: Callable[[], bool] | None = None) -> ReferenceResult:
    """Train ``cfg`` in this process. Per batch t, as the seed does:
    forward through every layer (DNI layers update at once with their
    synthetic gradient), the output layer's update, then the gradients flow
    back (backprop: each layer updates with them; DNI: each SG module is
    trained on them)."""
    emit = emit or (lambda event: None)
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    slices = data.batch_slices(cfg.examples, cfg.batch_size)
    hidden = [make_hidden(cfg, k) for k in range(1, cfg.layers)]
    output = make_output(cfg)
    out_stats = EpochStats()
    sg_stats = [EpochStats() for _ in hidden]
    start = time.perf_counter()
    t = 0
    for epoch in range(cfg.epochs):
        for s in slices:
            if should_stop is not None and should_stop():
                raise KeyboardInterrupt
            xb, yb = x[s], y[s]
            h = xb
            upstream: list[np.ndarray | None] = []
            for k, layer in enumerate(hidden):
                h, dx = layer.forward(t, h, yb, need_dx=k > 0)
                upstream.append(dx)
            grad, loss, correct = output.train_step(h, yb, need_dx=True)
            out_stats.add(loss, correct, len(yb))
            for k in range(len(hidden) - 1, -1, -1):
                dx, sg_loss = hidden[k].receive_gradient(t, grad, need_dx=k > 0)
                if sg_loss is not None:
                    sg_stats[k].add(sg_loss, 0, len(yb))
                grad = upstream[k] if hidden[k].uses_sg else dx
            t += 1
        elapsed = time.perf_counter() - start
        emit(out_stats.epoch_event("output", epoch, elapsed))
        for k, st in enumerate(sg_stats):
            if hidden[k].uses_sg:
                emit(st.sg_event(role_name(k + 1, cfg), epoch, elapsed))
    wall = time.perf_counter() - start
    final_loss, acc = evaluate(hidden, output, x, y, slices)
    return ReferenceResult(hidden, output, wall, t, final_loss, acc)
