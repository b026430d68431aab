"""The output layer's state and its updates: the loss, the true gradient,
and an update with it at once. Pure numpy, and it never calls out: its
node sends what it returns (see ``pipeline.layers.hidden``)."""
from __future__ import annotations

import numpy as np

from pipeline.math import nn, optim
from pipeline.layers.common import Chance, descend, flat
from pipeline.layers.stats import Applied, InputApplied, LayerStats


class Diverged(ValueError):
    """The loss is no longer a number: the weights have gone to inf or NaN,
    and nothing further would be worth training or saving."""


class OutputLayer:
    """The output layer: sigmoid outputs with binary cross-entropy (addition)
    or softmax with cross-entropy (classification). It computes the loss and
    the true gradient, and updates with it at once (it has no SG module)."""

    def __init__(self, index: int, fan_in: int, fan_out: int, *, lr: float,
                 rng: np.random.Generator, update: Chance | None = None,
                 dtype: np.dtype = np.float64, optimizer: str = "sgd",
                 softmax: bool = False, momentum: float = 0.0):
        self.index = index
        self.softmax = softmax
        self.update = update or Chance(1.0, rng)
        self.w, self.b = nn.init_dense(rng, fan_in, fan_out, dtype)
        self.si = None  # --unlock forward: its InputPredictor (model.make_output)
        self.si_scale = 1.0  # its step on a synthetic input, times lr (--si-output-scale)
        self.opt = optim.make(optimizer, self.weights(), lr, momentum)
        self.clock = 0
        self.step = 0
        self.stats = LayerStats(seed=index)

    def _loss(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int]:
        """(per-example dl_i/dz_i, batch-mean loss, correct examples); ``y`` is
        the sum's bits, or one-hot labels under softmax."""
        z = flat(x) @ self.w + self.b
        if self.softmax:
            labels = y.argmax(axis=1)
            return (nn.softmax(z) - y, nn.softmax_ce_loss(z, labels),
                    nn.correct_classes(z, labels))
        p = nn.sigmoid(z)
        return nn.bce_delta(p, y), nn.bce_loss(p, y), nn.exact_matches(p, y)

    def _checked_loss(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, float, int]:
        dz, loss, correct = self._loss(x, y)
        if not np.isfinite(loss):
            raise Diverged(f"training diverged at batch {self.clock}: the loss is {loss} "
                           f"(activations or weights went to inf or NaN); try a smaller "
                           f"--lr or --sg-lr")
        return dz, loss, correct

    def train_step(self, x: np.ndarray, y: np.ndarray, need_dx: bool, scale: float = 1.0
                   ) -> tuple[np.ndarray | None, float, int]:
        """Forward, loss, update (its step size times ``scale``). Returns (dx
        for upstream, loss, correct examples). Under ``--unlock forward`` this
        is the synthetic step, on x_hat."""
        dz, loss, correct = self._checked_loss(x, y)
        dx = self._grads(x, dz, need_dx, scale)
        self.clock += 1
        self.stats.forward_batches += 1
        self.stats.record(Applied(self.clock, None, 0, 0.0))
        return dx, loss, correct

    def forward_true(self, x: np.ndarray, y: np.ndarray, need_dx: bool,
                     second_step: bool = False) -> tuple[np.ndarray | None, float, int]:
        """``--unlock forward``: the true input x of a batch arrived after the
        layer stepped on a synthetic one (``train_step``). The loss and the
        count of correct examples of the true chain, and the true gradient dx
        for the layer below, all with the weights as they are now; with
        ``second_step`` the layer also updates on it (a weight update, not a
        batch: the clock stays). Returns (dx, loss, correct examples)."""
        dz, loss, correct = self._checked_loss(x, y)
        if second_step:
            dx = self._grads(x, dz, need_dx)
        else:
            dx = nn.input_grad(dz, self.w).reshape(x.shape) if need_dx else None
        return dx, loss, correct

    def _grads(self, x: np.ndarray, dz: np.ndarray, need_dx: bool, scale: float = 1.0
               ) -> np.ndarray | None:
        """The update with the loss's gradient dz; returns dx at the input,
        shaped as x came (an image batch from a convolutional layer gets its
        gradient as one), or None without ``need_dx``."""
        dw, db, dx = nn.dense_grads(flat(x), dz, self.w, need_dx)
        descend(self, {"w": dw, "b": db}, scale)
        return None if dx is None else dx.reshape(x.shape)

    def synthetic_step(self, batch: int, x_net: np.ndarray, y: np.ndarray,
                       now: float = 0.0) -> float:
        """``--unlock forward``: the source's batch reaches the output layer,
        which steps on the loss at the input its model predicts from the
        network input ``x_net`` (``train_step``), the true loss's gradient in
        place of a synthetic one, with its step size times ``si_scale``
        (that input is the poorest of the net). Nothing is sent, and the loss returned is
        not the network's (the true chain's comes later). ``now``: as for a
        hidden layer; the output layer keeps no times."""
        x_hat = self.si.guess(batch, x_net, y, self.clock + 1)  # the clock the step moves to
        _, loss, _ = self.train_step(x_hat, y, need_dx=False, scale=self.si_scale)
        return loss

    def true_input(self, batch: int, x: np.ndarray, y: np.ndarray, need_dx: bool,
                   second_step: bool = False
                   ) -> tuple[InputApplied, np.ndarray | None, float, int]:
        """The true input of ``batch`` has reached the unlocked output layer:
        the network's loss and correct examples on it, the true gradient for
        the layer below, by option a second step (``forward_true``), then the
        model's regression onto x. Returns (the regression, dx, loss, correct
        examples)."""
        dx, loss, correct = self.forward_true(x, y, need_dx, second_step)
        return self.si.learn(batch, x, self.clock), dx, loss, correct

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        _, loss, correct = self._loss(x, y)
        return loss, correct

    def weights(self) -> dict[str, np.ndarray]:
        out = {"w": self.w, "b": self.b}
        if self.si is not None:
            out.update(self.si.model.params())
        return out
