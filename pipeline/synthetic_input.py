"""The synthetic-input model of hidden layer k > 1 (``--unlock forward``).

It maps the network's input x (n, d0), with the labels under conditioning,
to a prediction of the layer's true input h_{k-1} (n, d_{k-1}), so the
layer can step before the layer below has sent that batch (Jaderberg et al.
2016, "complete unlock"). Linear, ``inp @ U + b``, zero-initialised; it
learns by the SG module's L2 regression onto the true activation when that
arrives, with its own optimiser, and the same refresh rule. Pure numpy: the
caller passes batch ids and the layer's clock in.

The two steps of an unlocked layer, in terms of ``pipeline.layers``, are
``synthetic_forward`` and ``true_input_arrives`` (a hidden layer),
``synthetic_output_step`` and ``true_output_input`` (the output layer), at
the end of this module;
docs/unlock.md has the design of the whole feature.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline import nn, optim
from pipeline.layers import HiddenLayer, sg_quality
from pipeline.output_layer import OutputLayer


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


@dataclass
class InputApplied:
    """One true input, as the predictor regressed onto it."""
    batch: int
    staleness: int          # forward staleness: layer steps between the guess and now
    loss: float             # the regression's loss (at the refreshed prediction)
    cosine: float | None    # cosine(synthetic input used, true input)
    rel_err: float | None   # |synthetic - true| / |true|


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


# --- the two steps of an unlocked hidden layer ------------------------------------

def synthetic_forward(layer: HiddenLayer, si: InputPredictor, batch: int, x: np.ndarray,
                      y: np.ndarray | None, now: float = 0.0) -> np.ndarray:
    """The source's batch (network input x, labels y) reaches layer k > 1:
    it forwards the synthetic input and updates at once with its SG module
    (``HiddenLayer.forward``, unchanged). Nothing is sent: the synthetic h
    is no one's input, and a dx at the synthetic input is not a gradient of
    the layer below's true output. Returns the synthetic h."""
    x_hat = si.guess(batch, x, y, layer.clock + 1)  # the clock the forward pass moves to
    h, _ = layer.forward(batch, x_hat, y, need_dx=False, now=now)
    return h


def true_input_arrives(layer: HiddenLayer, si: InputPredictor, batch: int,
                       h_prev: np.ndarray, y: np.ndarray | None, need_dx: bool,
                       second_step: bool = False, send_h=None, send_dx=None
                       ) -> tuple[InputApplied, np.ndarray, np.ndarray | None]:
    """The true input h_{k-1} of ``batch`` has arrived: the layer carries
    the true chain on (``HiddenLayer.forward_true``: h down, dx up, by
    option a second step on the true input), then the model regresses onto
    h_prev. The layer's math first, so h and dx leave before the regression;
    the two touch disjoint arrays, so the order changes no bits.
    Returns (the regression, h, dx)."""
    h, dx = layer.forward_true(batch, h_prev, y, need_dx, second_step, send_h, send_dx)
    return si.learn(batch, h_prev, layer.clock), h, dx


def synthetic_output_step(out: OutputLayer, si: InputPredictor, batch: int, x: np.ndarray,
                          y: np.ndarray) -> float:
    """The source's batch reaches the unlocked output layer: it steps on the
    loss at its synthetic input (``OutputLayer.train_step``, unchanged), the
    true loss's gradient in place of a synthetic one. Nothing is sent, and
    the loss returned is not the network's (the true chain's comes later)."""
    x_hat = si.guess(batch, x, y, out.clock + 1)  # the clock the step moves to
    _, loss, _ = out.train_step(x_hat, y, need_dx=False)
    return loss


def true_output_input(out: OutputLayer, si: InputPredictor, batch: int, h_prev: np.ndarray,
                      y: np.ndarray, need_dx: bool, second_step: bool = False
                      ) -> tuple[InputApplied, np.ndarray | None, float, int]:
    """The true input h_{L-1} of ``batch`` has reached the unlocked output
    layer: the network's loss and correct examples on it, the true gradient
    for the layer below, by option a second step (``OutputLayer.forward_true``),
    then the model's regression onto h_prev. Returns (the regression, dx,
    loss, correct examples)."""
    dx, loss, correct = out.forward_true(h_prev, y, need_dx, second_step)
    return si.learn(batch, h_prev, out.clock), dx, loss, correct
