"""A layer's state and its updates: weights, SG module, in-flight cache, counters.

Pure numpy. The worker processes and the in-process reference both drive
these classes, so the same calls in the same order give the same bits.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from pipeline import nn


@dataclass
class Staleness:
    """Running count, sum and max of staleness in local update steps."""
    count: int = 0
    total: int = 0
    max: int = 0

    def add(self, steps: int) -> None:
        self.count += 1
        self.total += steps
        self.max = max(self.max, steps)

    def as_dict(self) -> dict:
        mean = self.total / self.count if self.count else 0.0
        return {"mean": mean, "max": self.max, "count": self.count}


@dataclass
class _Pending:
    """What a hidden layer keeps for a batch until its true gradient returns."""
    step: int                        # local update count after this batch's forward
    sent_at: float                   # monotonic time of the forward pass
    x: np.ndarray | None = None      # backprop: input, for the weight gradient
    h: np.ndarray | None = None      # backprop: output, for f'(z)
    sg_in: np.ndarray | None = None  # DNI: SG module input
    sg_pred: np.ndarray | None = None  # DNI: the synthetic gradient used
    sg_version: int = 0              # SG module version that made sg_pred


@dataclass
class LayerCounters:
    forward_batches: int = 0
    sg_updates: int = 0
    true_gradients: int = 0
    staleness: Staleness = field(default_factory=Staleness)

    def as_dict(self) -> dict:
        return {"forward_batches": self.forward_batches, "sg_updates": self.sg_updates,
                "true_gradients": self.true_gradients,
                "staleness_steps": self.staleness.as_dict()}


class HiddenLayer:
    """h = f(x W + b) with an optional synthetic-gradient module.

    mode "backprop": forward caches (x, h); ``backward`` applies the true
    gradient. Mode "dni"/"cdni": ``forward`` updates W with the synthetic
    gradient at once; ``train_sg`` later regresses the SG module onto the true
    gradient of that batch.
    """

    def __init__(self, index: int, fan_in: int, fan_out: int, *, mode: str,
                 activation: str, lr: float, sg_lr: float, label_dim: int,
                 rng: np.random.Generator, dtype: np.dtype = np.float64):
        self.index = index
        self.mode = mode
        self.activation = activation
        self.lr = lr
        self.sg_lr = sg_lr
        self.w, self.b = nn.init_dense(rng, fan_in, fan_out, dtype)
        self.conditioned = mode == "cdni"
        self.uses_sg = mode in ("dni", "cdni")
        sg_in = fan_out + (label_dim if self.conditioned else 0)
        self.v, self.c = nn.init_sg(sg_in, fan_out, dtype) if self.uses_sg else (None, None)
        self.step = 0          # local weight updates so far
        self.sg_version = 0    # SG module updates so far
        self.pending: dict[int, _Pending] = {}
        self.counters = LayerCounters()

    # -- forward --------------------------------------------------------------
    def forward(self, batch: int, x: np.ndarray, y: np.ndarray | None, need_dx: bool
                ) -> tuple[np.ndarray, np.ndarray | None]:
        """Training forward pass of ``batch``. Returns (h, dx): dx is the
        gradient to send upstream now (DNI), or None (backprop: it waits)."""
        assert batch not in self.pending, f"batch {batch} forwarded twice"
        h = nn.dense_forward(x, self.w, self.b, self.activation)
        self.counters.forward_batches += 1
        if not self.uses_sg:
            self.pending[batch] = _Pending(self.step, time.monotonic(), x=x, h=h)
            return h, None
        sg_in = nn.sg_input(h, y if self.conditioned else None)
        g = nn.sg_predict(sg_in, self.v, self.c)
        dz = g * nn.activation_slope(self.activation, h)
        dw, db, dx = nn.dense_grads(x, dz, self.w, need_dx)
        nn.sgd(self.w, dw, self.lr)
        nn.sgd(self.b, db, self.lr)
        self.step += 1
        self.pending[batch] = _Pending(self.step, time.monotonic(), sg_in=sg_in,
                                       sg_pred=g, sg_version=self.sg_version)
        return h, dx

    def forward_eval(self, x: np.ndarray) -> np.ndarray:
        return nn.dense_forward(x, self.w, self.b, self.activation)

    # -- true gradients --------------------------------------------------------
    def _arrival(self, batch: int) -> _Pending:
        p = self.pending.pop(batch)
        self.counters.true_gradients += 1
        self.counters.staleness.add(self.step - p.step)
        return p

    def backward(self, batch: int, dh: np.ndarray, need_dx: bool) -> np.ndarray | None:
        """Backprop: apply the true gradient of ``batch``; return dx for upstream."""
        p = self._arrival(batch)
        dz = dh * nn.activation_slope(self.activation, p.h)
        dw, db, dx = nn.dense_grads(p.x, dz, self.w, need_dx)
        nn.sgd(self.w, dw, self.lr)
        nn.sgd(self.b, db, self.lr)
        self.step += 1
        return dx

    def train_sg(self, batch: int, target: np.ndarray) -> float:
        """DNI: regress the SG module onto the true gradient of ``batch``.

        Returns the SG loss. The prediction is recomputed only when the module
        changed since the forward pass (same numbers otherwise, less work).
        """
        p = self._arrival(batch)
        pred = p.sg_pred
        if p.sg_version != self.sg_version:
            pred = nn.sg_predict(p.sg_in, self.v, self.c)
        loss, dv, dc = nn.sg_grads(p.sg_in, pred, target)
        nn.sgd(self.v, dv, self.sg_lr)
        nn.sgd(self.c, dc, self.sg_lr)
        self.sg_version += 1
        self.counters.sg_updates += 1
        return loss

    def receive_gradient(self, batch: int, grad: np.ndarray, need_dx: bool
                         ) -> tuple[np.ndarray | None, float | None]:
        """Apply a true gradient in this layer's mode: (dx for upstream, SG loss)."""
        if self.uses_sg:
            return None, self.train_sg(batch, grad)
        return self.backward(batch, grad, need_dx), None

    def weights(self) -> dict[str, np.ndarray]:
        out = {"w": self.w, "b": self.b}
        if self.uses_sg:
            out.update(sg_v=self.v, sg_c=self.c)
        return out


class OutputLayer:
    """Sigmoid outputs with binary cross-entropy: computes the loss and the
    true gradient, and updates with it (it has no SG module)."""

    def __init__(self, index: int, fan_in: int, fan_out: int, *, lr: float,
                 rng: np.random.Generator, dtype: np.dtype = np.float64):
        self.index = index
        self.lr = lr
        self.w, self.b = nn.init_dense(rng, fan_in, fan_out, dtype)
        self.step = 0
        self.counters = LayerCounters()

    def train_step(self, x: np.ndarray, y: np.ndarray, need_dx: bool
                   ) -> tuple[np.ndarray | None, float, int]:
        """Forward, loss, update. Returns (dx for upstream, loss, exact matches)."""
        p = nn.sigmoid(x @ self.w + self.b)
        loss = nn.bce_loss(p, y)
        dz = nn.bce_delta(p, y)
        dw, db, dx = nn.dense_grads(x, dz, self.w, need_dx)
        nn.sgd(self.w, dw, self.lr)
        nn.sgd(self.b, db, self.lr)
        self.step += 1
        self.counters.forward_batches += 1
        self.counters.true_gradients += 1
        self.counters.staleness.add(0)
        return dx, loss, nn.exact_matches(p, y)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        p = nn.sigmoid(x @ self.w + self.b)
        return nn.bce_loss(p, y), nn.exact_matches(p, y)

    def weights(self) -> dict[str, np.ndarray]:
        return {"w": self.w, "b": self.b}
