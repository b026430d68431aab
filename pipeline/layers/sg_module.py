"""The synthetic-gradient module of one layer: linear, or a small ReLU network.

It maps what the layer sees (its output h, with the one-hot label under cDNI)
to a predicted per-example gradient dl_i/dh_i, and learns by L2 regression
onto the true gradient when that comes back. Its last layer starts at zero,
as in the paper: training begins as plain forward passes. Pure numpy.
"""
from __future__ import annotations

import numpy as np

from pipeline.math import nn, optim, staleness


class SGModule:
    """``hidden`` = () is the paper's linear module ``inp @ V + c``; otherwise
    ReLU layers of those widths come first (He-initialised from ``rng``)."""

    def __init__(self, rng: np.random.Generator, in_dim: int, out_dim: int,
                 hidden: tuple[int, ...] = (), dtype: np.dtype = np.float64,
                 optimizer: str = "sgd", lr: float = 0.03, momentum: float = 0.0,
                 track_drift: bool = False):
        widths = [in_dim, *hidden]
        self.layers: list[tuple[np.ndarray, np.ndarray]] = []
        for fan_in, fan_out in zip(widths, widths[1:]):
            w, b = nn.init_dense(rng, fan_in, fan_out, dtype)
            w *= np.sqrt(2.0)  # He initialisation: ReLU halves the variance
            self.layers.append((w, b))
        self.layers.append(nn.init_sg(widths[-1], out_dim, dtype))
        self.version = 0  # updates so far: a cached prediction is current while this is unchanged
        self.opt = optim.make(optimizer, self.params(), lr, momentum)
        # --sg-lookahead: the smoothed update per step of every array, by name
        self.drift = ({name: np.zeros_like(a) for name, a in self.params().items()}
                      if track_drift else None)

    @property
    def v(self) -> np.ndarray:
        return self.layers[-1][0]

    @property
    def c(self) -> np.ndarray:
        return self.layers[-1][1]

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one example of each array ``predict`` returns in its
        list: the input of every layer (what a checkpoint keeps of a batch
        in flight)."""
        return [(w.shape[0],) for w, _ in self.layers]

    def params(self) -> dict[str, np.ndarray]:
        """The live arrays by name: sg_v0, sg_c0, ... for hidden layers, sg_v
        and sg_c for the last (so a linear module keeps the paper's names)."""
        out = {}
        for i, (w, b) in enumerate(self.layers):
            tag = "" if i == len(self.layers) - 1 else str(i)
            out[f"sg_v{tag}"], out[f"sg_c{tag}"] = w, b
        return out

    def predict(self, inp: np.ndarray, ahead: float = 0.0
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prediction, the input of every layer, for ``train``). With
        ``ahead`` > 0 (and a drift tracked), the prediction of the module
        extrapolated that many of its updates ahead (``--sg-lookahead``)."""
        layers = self.layers
        if ahead and self.drift is not None:
            names = list(self.params())
            layers = [(staleness.lookahead(w, self.drift[names[2 * i]], ahead),
                       staleness.lookahead(b, self.drift[names[2 * i + 1]], ahead))
                      for i, (w, b) in enumerate(self.layers)]
        acts = [inp]
        a = inp
        for w, b in layers[:-1]:
            a = nn.dense_forward(a, w, b, "relu")
            acts.append(a)
        v, c = layers[-1]
        return nn.sg_predict(a, v, c), acts

    def train(self, acts: list[np.ndarray], pred: np.ndarray, target: np.ndarray,
              scale: float = 1.0) -> float:
        """One step of regression onto ``target``, its step size times
        ``scale``; returns the SG loss (batch mean of 0.5 * ||pred_i - target_i||^2)."""
        loss, dv, dc = nn.sg_grads(acts[-1], pred, target)
        names = list(self.params())
        grads = {names[-2]: dv, names[-1]: dc}
        if len(self.layers) > 1:  # (a linear module has no hidden layer to carry it to)
            delta = (pred - target) @ self.layers[-1][0].T  # per-example d(loss_i)/d(acts[-1])
        for i in range(len(self.layers) - 2, -1, -1):
            dz = delta * nn.activation_slope("relu", acts[i + 1])
            w = self.layers[i][0]
            dw, db, delta = nn.dense_grads(acts[i], dz, w, need_dx=i > 0)
            grads[names[2 * i]], grads[names[2 * i + 1]] = dw, db
        before = ({k: a.copy() for k, a in self.params().items()}
                  if self.drift is not None else None)
        self.opt.step(grads, scale)
        if before is not None:
            for name, a in self.params().items():
                staleness.drift(self.drift[name], a - before[name])
        self.version += 1
        return loss
