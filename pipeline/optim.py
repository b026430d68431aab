"""Optimisers over a named set of parameter arrays, updated in place.

Each layer and each synthetic-gradient module owns one, so Adam's running
moments are per layer, as the paper trained. Their state goes into
checkpoints: a resumed run takes exactly the steps the uninterrupted one would.
Every ``step`` takes a ``scale`` of its step size for that step alone (the
staleness-aware steps of ``pipeline.staleness``); 1.0 is bit for bit the
unscaled step.
"""
from __future__ import annotations

import numpy as np

from pipeline import nn

OPTIMIZERS = ("sgd", "adam")


class SGD:
    """``param -= lr * grad``; with ``momentum`` mu > 0 the heavy ball:
    ``buf = mu * buf + grad; param -= lr * buf`` (one buffer per array)."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.0):
        self.params = params
        self.lr = lr
        self.momentum = momentum
        self.bufs = ({name: np.zeros_like(p) for name, p in params.items()}
                     if momentum else {})

    def step(self, grads: dict[str, np.ndarray], scale: float = 1.0) -> None:
        lr = self.lr * scale
        for name, grad in grads.items():
            if self.momentum:
                buf = self.bufs[name]
                buf *= self.momentum
                buf += grad
                grad = buf
            nn.sgd(self.params[name], grad, lr)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {f"{name}.buf": b.copy() for name, b in self.bufs.items()}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        for name, b in self.bufs.items():
            b[...] = arrays[f"{name}.buf"]


class Adam:
    """One ``nn.Adam`` per parameter array; every array steps together, so
    their bias corrections share one step count."""

    def __init__(self, params: dict[str, np.ndarray], lr: float):
        self.params = params
        self.slots = {name: nn.Adam(p.shape, lr, dtype=p.dtype) for name, p in params.items()}

    def step(self, grads: dict[str, np.ndarray], scale: float = 1.0) -> None:
        for name, grad in grads.items():
            self.slots[name].step(self.params[name], grad, scale)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        meta = {"t": {name: s.t for name, s in self.slots.items()}}
        arrays = {}
        for name, s in self.slots.items():
            arrays[f"{name}.m"] = s.m.copy()
            arrays[f"{name}.v"] = s.v.copy()
        return meta, arrays

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        for name, s in self.slots.items():
            s.t = int(meta["t"][name])
            s.m[...] = arrays[f"{name}.m"]
            s.v[...] = arrays[f"{name}.v"]


def make(name: str, params: dict[str, np.ndarray], lr: float,
         momentum: float = 0.0) -> SGD | Adam:
    """``momentum`` is SGD's; Adam keeps its own first moment (beta1 = 0.9)."""
    if name == "sgd":
        return SGD(params, lr, momentum)
    if name == "adam":
        return Adam(params, lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
