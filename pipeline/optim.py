"""Optimisers over a named set of parameter arrays, updated in place.

Each layer and each synthetic-gradient module owns one, so Adam's running
moments are per layer, as the paper trained. Their state goes into
checkpoints: a resumed run takes exactly the steps the uninterrupted one would.
"""
from __future__ import annotations

import numpy as np

from pipeline import nn

OPTIMIZERS = ("sgd", "adam")


class SGD:
    """``param -= lr * grad``: no state."""

    def __init__(self, params: dict[str, np.ndarray], lr: float):
        self.params = params
        self.lr = lr

    def step(self, grads: dict[str, np.ndarray]) -> None:
        for name, grad in grads.items():
            nn.sgd(self.params[name], grad, self.lr)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        pass


class Adam:
    """One ``nn.Adam`` per parameter array; every array steps together, so
    their bias corrections share one step count."""

    def __init__(self, params: dict[str, np.ndarray], lr: float):
        self.params = params
        self.slots = {name: nn.Adam(p.shape, lr, dtype=p.dtype) for name, p in params.items()}

    def step(self, grads: dict[str, np.ndarray]) -> None:
        for name, grad in grads.items():
            self.slots[name].step(self.params[name], grad)

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


def make(name: str, params: dict[str, np.ndarray], lr: float) -> SGD | Adam:
    if name == "sgd":
        return SGD(params, lr)
    if name == "adam":
        return Adam(params, lr)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
