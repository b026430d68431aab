"""The synthetic-input model of hidden layer k > 1 (``--unlock forward``).

It maps the network's input x (n, d0), with the labels under conditioning,
to a prediction of the layer's true input h_{k-1} (n, d_{k-1}), so the
layer can step before the layer below has sent that batch (Jaderberg et al.
2016, "complete unlock"). Linear, ``inp @ U + b``, zero-initialised; it
learns by the SG module's L2 regression onto the true activation when that
arrives, with its own optimiser, and the same refresh rule. Pure numpy: the
caller passes batch ids and the layer's clock in.

The two steps of an unlocked layer are its methods (``HiddenLayer.synthetic_step``
and ``begin_true``/``end_true``; ``OutputLayer.synthetic_step`` and
``true_input``); docs/unlock.md has the design of the whole feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.math import nn, optim
from pipeline.layers.stats import InputApplied, sg_quality


class SIModule:
    """The linear model ``inp @ U + b``: U (in_dim, out_dim), b (out_dim,).

    Both start at zero, as the SG module's last layer does: (1) the first
    synthetic inputs are zero, so the layer's weight gradient ``x_hatᵀ dz``
    is zero and its weights wait (only its bias moves) until the model has
    seen a true input, instead of training on noise; (2) no random draw, so
    the layer's other streams (its weights, update and drop chances) are the
    same bits with and without ``--unlock forward``; (3) a least-squares fit
    is convex and linear, with no symmetry to break.
    """

    def __init__(self, in_dim: int, out_dim: int, dtype: np.dtype = np.float64,
                 optimizer: str = "sgd", lr: float = 0.03, momentum: float = 0.0):
        self.u, self.b = nn.init_sg(in_dim, out_dim, dtype)
        self.version = 0  # updates so far: a cached prediction is current while this is unchanged
        self.opt = optim.make(optimizer, self.params(), lr, momentum)

    def params(self) -> dict[str, np.ndarray]:
        """The live arrays, by the names a checkpoint will give them."""
        return {"si_u": self.u, "si_b": self.b}

    def predict(self, inp: np.ndarray) -> np.ndarray:
        """(n, in_dim) -> (n, out_dim)."""
        return nn.sg_predict(inp, self.u, self.b)

    def train(self, inp: np.ndarray, pred: np.ndarray, target: np.ndarray,
              scale: float = 1.0) -> float:
        """One step of regression of ``pred`` (made from ``inp``) onto
        ``target``, its step size times ``scale``; returns the loss, the
        batch mean of 0.5 * ||pred_i - target_i||^2 (summed over features,
        not averaged, so a step size means what the SG module's does)."""
        loss, du, db = nn.sg_grads(inp, pred, target)
        self.opt.step({"si_u": du, "si_b": db}, scale)
        self.version += 1
        return loss


@dataclass
class Guess:
    """What the predictor keeps of a batch until its true input arrives."""
    inp: np.ndarray     # the model's input: x, or [x, labels]
    pred: np.ndarray    # the synthetic input the layer stepped on
    version: int        # the model's version that made ``pred``
    clock: int          # the layer's clock when it stepped on ``pred``


class InputPredictor:
    """A layer's synthetic-input model and the guesses it has in flight.

    ``conditioned``: the model also sees the batch's labels (one-hot classes
    or the sum's bits), as a cDNI SG module does. ``refresh``: as the SG
    module's ``sg_refresh``, recompute the prediction from the cached input
    before the regression step when the model has changed since the guess,
    so the step is the gradient at the current model.
    """

    def __init__(self, in_dim: int, label_dim: int, out_dim: int, *, conditioned: bool,
                 dtype: np.dtype = np.float64, optimizer: str = "sgd", lr: float = 0.03,
                 momentum: float = 0.0, refresh: bool = True):
        self.conditioned = conditioned
        self.refresh = refresh
        self.model = SIModule(in_dim + (label_dim if conditioned else 0), out_dim, dtype,
                              optimizer, lr, momentum)
        self.pending: dict[int, Guess] = {}

    def guess(self, batch: int, x: np.ndarray, y: np.ndarray | None, clock: int) -> np.ndarray:
        """The synthetic input of ``batch`` from the network input x (n, d0)
        and labels y, the layer's clock being ``clock`` as it steps on it."""
        assert batch not in self.pending, f"batch {batch} guessed twice"
        inp = nn.sg_input(x, y if self.conditioned else None)
        pred = self.model.predict(inp)
        self.pending[batch] = Guess(inp, pred, self.model.version, clock)
        return pred

    def learn(self, batch: int, true_input: np.ndarray, clock: int,
              scale: float = 1.0) -> InputApplied:
        """The true input of ``batch`` has arrived at clock ``clock``: one
        regression step onto it. Quality is of the synthetic input that was
        actually used, as for the SG module."""
        g = self.pending.pop(batch)
        pred = g.pred
        if self.refresh and g.version != self.model.version:
            pred = self.model.predict(g.inp)
        loss = self.model.train(g.inp, pred, true_input, scale)
        cosine, rel = sg_quality(g.pred, true_input)
        return InputApplied(batch, clock - g.clock, loss, cosine, rel)

    def expire(self) -> int:
        """Training is over: the guesses whose true input never came."""
        n = len(self.pending)
        self.pending.clear()
        return n
