"""Optimisers over a named set of parameter arrays, updated in place.

Each layer and each synthetic-gradient module owns one, so Adam's running
moments are per layer, as the paper trained. Their state goes into
checkpoints: a resumed run takes exactly the steps the uninterrupted one would.
Every ``step`` takes a ``scale`` of its step size for that step alone (the
staleness-aware steps of ``pipeline.math.staleness``); 1.0 is bit for bit the
unscaled step.
"""
from __future__ import annotations

import numpy as np

OPTIMIZERS = ("sgd", "adam")


def descend(param: np.ndarray, grad: np.ndarray, lr: float) -> None:
    """One plain gradient step, in place (the notebook climbed: ``+=``)."""
    param -= lr * grad


class AdamSlot:
    """Adam (Kingma & Ba 2015) for one parameter array, updated in place:
    m, v are running means of g and g**2, bias-corrected by step t."""

    def __init__(self, shape: tuple[int, ...], lr: float, beta1: float = 0.9,
                 beta2: float = 0.999, eps: float = 1e-8, dtype=np.float64):
        self.lr, self.beta1, self.beta2, self.eps = lr, beta1, beta2, eps
        self.m = np.zeros(shape, dtype)
        self.v = np.zeros(shape, dtype)
        self.t = 0

    def step(self, param: np.ndarray, grad: np.ndarray, scale: float = 1.0) -> None:
        """One step; ``scale`` multiplies the step size for this step alone
        (1.0 leaves the arithmetic exactly as without it)."""
        self.t += 1
        self.m *= self.beta1
        self.m += (1 - self.beta1) * grad
        self.v *= self.beta2
        self.v += (1 - self.beta2) * grad * grad
        m_hat = self.m / (1 - self.beta1 ** self.t)
        v_hat = self.v / (1 - self.beta2 ** self.t)
        param -= (self.lr * scale) * m_hat / (np.sqrt(v_hat) + self.eps)


class SGD:
    """``param -= lr * grad``; with ``momentum`` mu > 0 the heavy ball:
    ``buf = mu * buf + grad; param -= lr * buf`` (one buffer per array).
    ``rates``: arrays whose step size is lr times their rate."""

    def __init__(self, params: dict[str, np.ndarray], lr: float, momentum: float = 0.0,
                 rates: dict[str, float] | None = None):
        self.params = params
        self.lr = lr
        self.rates = rates or {}
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
            descend(self.params[name], grad, lr * self.rates[name] if name in self.rates else lr)

    def state(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {f"{name}.buf": b.copy() for name, b in self.bufs.items()}

    def load_state(self, meta: dict, arrays: dict[str, np.ndarray]) -> None:
        for name, b in self.bufs.items():
            b[...] = arrays[f"{name}.buf"]


class Adam:
    """One ``AdamSlot`` per parameter array; every array steps together, so
    their bias corrections share one step count."""

    def __init__(self, params: dict[str, np.ndarray], lr: float,
                 rates: dict[str, float] | None = None):
        self.params = params
        rates = rates or {}
        self.slots = {name: AdamSlot(p.shape, lr * rates.get(name, 1.0), dtype=p.dtype)
                      for name, p in params.items()}

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
         momentum: float = 0.0, rates: dict[str, float] | None = None) -> SGD | Adam:
    """``momentum`` is SGD's; Adam keeps its own first moment (beta1 = 0.9).
    ``rates``: arrays whose step size is ``lr`` times their rate."""
    if name == "sgd":
        return SGD(params, lr, momentum, rates)
    if name == "adam":
        return Adam(params, lr, rates)
    raise ValueError(f"unknown optimizer {name!r}; choose from {OPTIMIZERS}")
