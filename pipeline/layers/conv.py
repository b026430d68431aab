"""A convolutional hidden layer and its synthetic-gradient module.

The layer is a ``HiddenLayer`` whose own math is a convolution: a k x k
same-padded convolution of stride 1, batch norm per channel (unless the run
has none), ReLU, and a 2 x 2 max-pool, on channels-last image batches
(``pipeline.math.conv``). Everything else (the phases of a step, the modes,
the in-flight batches, staleness, checkpoints) is the hidden layer's, so a
convolutional layer runs in every mode and schedule a dense one does.

Its SG module predicts dl/dh for an image h (N, H', W', C) from h and, under
cDNI, the labels. The straightforward module, a zero-initialised 3 x 3
convolution on h and one-hot label planes, learns next to nothing here (its
cosine with the true gradient stays near 0): a convolution is translation
equivariant and label planes are constant in space, while the gradient at a
convolutional layer's output is position specific (each position and
channel has its own weights in the dense layer after the flatten), and
Adam's fixed-size steps on a weight with a fan-in of 9 x (C + 10) put more
noise into the prediction than there is signal in the small targets. So the
module here adds to that convolution two zero-initialised tables of h's
full shape, a bias and (cDNI) one map per label, the label half of the
paper's linear cDNI module, and gives the convolution's weights a step size
``WEIGHT_RATE`` times the module's. docs/cnn.md has the measurements.
"""
from __future__ import annotations

import numpy as np

from pipeline.math import batchnorm as bn
from pipeline.math import conv, optim
from pipeline.layers.common import Chance, LayerSpec, Mode
from pipeline.layers.hidden import HiddenLayer

SG_KERNEL = 3          # the SG module's convolution
WEIGHT_RATE = 0.01     # its weights' step size, as a fraction of --sg-lr


class ConvSG:
    """pred = conv3x3([h, label planes]; V) + c + L[y], with V (3, 3, C + labels,
    C), the position bias c (H', W', C) and the label maps L (labels, H'*W'*C),
    all zero at the start (training begins as plain forward passes, as with
    the paper's modules). The input is h with the label planes concatenated
    as channels (``inputs``), so a batch's SG input is one array."""

    def __init__(self, shape: tuple[int, int, int], labels: int, dtype: np.dtype,
                 optimizer: str, lr: float, momentum: float = 0.0):
        h, w, c = shape
        self.shape, self.labels = shape, labels
        self.v = np.zeros((SG_KERNEL, SG_KERNEL, c + labels, c), dtype)
        self.c = np.zeros(shape, dtype)
        self.maps = np.zeros((labels, h * w * c), dtype) if labels else None
        self.version = 0
        self.drift = None  # (--sg-lookahead is refused for convolutional layers)
        self.opt = optim.make(optimizer, self.params(), lr, momentum,
                              rates={"sg_v": WEIGHT_RATE})

    def params(self) -> dict[str, np.ndarray]:
        out = {"sg_v": self.v, "sg_c": self.c}
        if self.maps is not None:
            out["sg_l"] = self.maps
        return out

    def input_shapes(self) -> list[tuple[int, ...]]:
        """The shape of one example of each array ``predict`` returns in its
        list (what a checkpoint keeps of a batch in flight)."""
        h, w, c = self.shape
        return [(h, w, c + self.labels)]

    def inputs(self, h: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        """h, with one plane per label concatenated as channels (all ones for
        the example's label, zeros for the others) under cDNI."""
        if y is None:
            return h
        planes = np.broadcast_to(y.astype(h.dtype, copy=False)[:, None, None, :],
                                 h.shape[:3] + (y.shape[1],))
        return np.concatenate([h, planes], axis=3)

    def predict(self, inp: np.ndarray, ahead: float = 0.0
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """(prediction (N, H', W', C), [inp] for ``train``)."""
        n, c = inp.shape[0], self.shape[2]
        z = conv.im2col(inp, SG_KERNEL) @ self.v.reshape(-1, c)
        pred = z.reshape(n, *self.shape) + self.c
        if self.maps is not None:
            pred += (self._labels(inp) @ self.maps).reshape(pred.shape)
        return pred, [inp]

    def _labels(self, inp: np.ndarray) -> np.ndarray:
        """The one-hot labels, read off the label planes at one pixel."""
        return inp[:, 0, 0, self.shape[2]:]

    def train(self, acts: list[np.ndarray], pred: np.ndarray, target: np.ndarray,
              scale: float = 1.0) -> float:
        """One step of L2 regression onto ``target`` (per-example gradients,
        loss the batch mean of 0.5 * ||pred_i - target_i||^2), its step size
        times ``scale``; returns the loss. The convolution's input rows are
        computed again from the kept input (cheaper to hold than to keep)."""
        inp = acts[0]
        n, c = inp.shape[0], self.shape[2]
        err = pred - target.reshape(pred.shape)
        loss = float(0.5 * np.sum(err * err) / n)
        rows = err.reshape(-1, c)
        cols = conv.im2col(inp, SG_KERNEL)
        grads = {"sg_v": (cols.T @ rows / n).reshape(self.v.shape),
                 "sg_c": err.sum(axis=0) / n}
        if self.maps is not None:
            grads["sg_l"] = self._labels(inp).T @ err.reshape(n, -1) / n
        self.opt.step(grads, scale)
        self.version += 1
        return loss


class ConvLayer(HiddenLayer):
    """h = pool(ReLU(BN(conv(x, W) + b))) over channels-last images: x
    (N, H, W, C_in) (or the source's rows of H*W*C_in numbers), h
    (N, H/2, W/2, C). ReLU comes after the pool, which is the same function
    (ReLU is monotone) on a quarter of the numbers."""

    def __init__(self, index: int, in_shape: tuple[int, int, int], channels: int,
                 kernel: int, *, spec: LayerSpec, mode: Mode, label_dim: int,
                 rng: np.random.Generator, update: Chance | None = None,
                 drop: Chance | None = None):
        if spec.norm == "layer":
            raise ValueError("layer norm is for dense layers; a convolutional layer "
                             "normalises per channel")
        self._setup(index, spec, mode, rng, update, drop)
        self.in_shape = tuple(in_shape)
        self.w, self.b = conv.init_conv(rng, kernel, in_shape[2], channels, spec.dtype)
        self.out_shape = (*conv.pooled(in_shape[0], in_shape[1]), channels)
        self._normalise(channels)
        self.sg = (ConvSG(self.out_shape, label_dim if self.conditioned else 0, spec.dtype,
                          spec.optimizer, mode.lr, spec.momentum)
                   if self.uses_sg else None)
        self.opt = optim.make(spec.optimizer, self._trainable(), spec.lr, spec.momentum)

    def _pixels(self) -> int:
        return self.in_shape[0] * self.in_shape[1]

    def _forward(self, x: np.ndarray, train: bool, track: bool = True
                 ) -> tuple[np.ndarray, tuple]:
        """(h, cache): the cache is (the input's im2col rows, the batch
        norm's cache, the pool's argmax)."""
        n = x.shape[0]
        x = x.reshape(n, *self.in_shape)
        z, cols = conv.conv_forward(x, self.w, self.b)      # rows (N*H*W, C)
        norm = None
        if self.norm is not None:
            z, norm = self._batch_norm(z, train, track)   # per channel: pixels are rows
        pooled, where = conv.pool_forward(z.reshape(n, *self.in_shape[:2], -1))
        return np.maximum(pooled, 0), (cols, norm, where)

    def _dz(self, h: np.ndarray, cache: tuple, dh: np.ndarray
            ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """dz rows (N*H*W, C) at the convolution's output, per example, and
        the batch norm's parameter gradients of the batch-mean loss (its
        rows are pixels: the sums over a batch's pixels divided by its
        examples, as for the weights)."""
        _, norm, where = cache
        g = dh.reshape(h.shape) * (h > 0)
        n, channels = h.shape[0], h.shape[3]
        dz = conv.pool_backward(g, where, (n, *self.in_shape[:2], channels))
        dz = dz.reshape(-1, channels)
        if norm is None:
            return dz, {}
        dz, dgamma, dbeta = bn.bn_backward(dz, norm, self.norm[0])
        pixels = self._pixels()
        return dz, {"gamma": dgamma * pixels, "beta": dbeta * pixels}

    def _weight_grads(self, x: np.ndarray, dz: np.ndarray, extra: dict, cache: tuple
                      ) -> dict[str, np.ndarray]:
        n = x.shape[0]
        cols = cache[0] if cache[0] is not None else conv.im2col(
            x.reshape(n, *self.in_shape), self.w.shape[0])
        dw, db = conv.conv_weight_grads(cols, dz, n)
        return {"w": dw.reshape(self.w.shape), "b": db, **extra}

    def _input_grad(self, dz: np.ndarray, x: np.ndarray) -> np.ndarray:
        return conv.conv_input_grad(dz, self.w, (x.shape[0], *self.in_shape)).reshape(x.shape)

    def _sg_input(self, h: np.ndarray, y: np.ndarray | None) -> np.ndarray:
        return self.sg.inputs(h, y)

    def _kept(self, cache: tuple) -> tuple:
        """A backprop-mode batch in flight keeps the batch norm's cache and
        the pool's argmax, not the im2col rows (k*k times the input): the
        update computes them again from the input it keeps."""
        return (None, *cache[1:])
