"""Layer math as pure numpy functions: dense layers, the loss, the synthetic-gradient module.

Conventions (shared by every caller, so the pipeline and the in-process
reference do the same floating-point operations in the same order):

* activations are row-major batches ``(B, features)``;
* a gradient *message* holds per-example gradients ``dl_i/dh_i``: the notebook's
  ``out - y`` is one. They do not depend on the batch size;
* parameter gradients are of the batch-mean loss ``L = mean_i l_i``, so a
  learning rate means the same thing for any batch size.
"""
from __future__ import annotations

import numpy as np

ACTIVATIONS = ("sigmoid", "relu")


def init_dense(rng: np.random.Generator, fan_in: int, fan_out: int,
               dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(fan_in, fan_out)`` scaled by 1/sqrt(fan_in); bias zero."""
    w = rng.standard_normal((fan_in, fan_out)) / np.sqrt(fan_in)
    return w.astype(dtype), np.zeros(fan_out, dtype=dtype)


def sigmoid(z: np.ndarray) -> np.ndarray:
    # exp of a large positive number overflows to inf, and 1/(1+inf) = 0 is
    # the right limit, so silence only that warning.
    with np.errstate(over="ignore"):
        return 1.0 / (1.0 + np.exp(-z))


def activate(name: str, z: np.ndarray) -> np.ndarray:
    if name == "sigmoid":
        return sigmoid(z)
    if name == "relu":
        return np.maximum(z, 0.0)
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


def activation_slope(name: str, h: np.ndarray) -> np.ndarray:
    """f'(z) written in terms of the output h = f(z) (what a layer caches)."""
    if name == "sigmoid":
        return h * (1.0 - h)
    if name == "relu":
        return (h > 0).astype(h.dtype)
    raise ValueError(f"unknown activation {name!r}; choose from {ACTIVATIONS}")


def dense_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray, act: str) -> np.ndarray:
    """h = f(x W + b): (B, i) @ (i, o) -> (B, o)."""
    return activate(act, x @ w + b)


def dense_grads(x: np.ndarray, dz: np.ndarray, w: np.ndarray, need_dx: bool
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Gradients of the batch-mean loss from per-example pre-activation grads.

    dz: (B, o) per-example dl_i/dz_i.  Returns dW (i, o), db (o,) and the
    per-example input gradient dx (B, i) computed with the weights *before*
    they are updated (the notebook used the updated ones).
    """
    n = x.shape[0]
    dw = x.T @ dz / n
    db = dz.sum(axis=0) / n
    dx = input_grad(dz, w) if need_dx else None
    return dw, db, dx


def input_grad(dz: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The per-example input gradient alone: ``dense_grads``'s dx, same bits."""
    return dz @ w.T


# --- output layer: sigmoid outputs with binary cross-entropy --------------------

def bce_loss(p: np.ndarray, y: np.ndarray) -> float:
    """Batch-mean of the per-example summed binary cross-entropy."""
    eps = np.finfo(p.dtype).tiny
    per_bit = -(y * np.log(p + eps) + (1.0 - y) * np.log(1.0 - p + eps))
    return float(per_bit.sum() / p.shape[0])


def bce_delta(p: np.ndarray, y: np.ndarray) -> np.ndarray:
    """dl_i/dz_i for sigmoid + BCE: the notebook's ``out - y``."""
    return p - y


def exact_matches(p: np.ndarray, y: np.ndarray) -> int:
    """Examples whose every output bit rounds to the target (exact sums)."""
    return int(np.all((p > 0.5) == (y > 0.5), axis=1).sum())


# --- synthetic-gradient module ----------------------------------------------------

def sg_input(h: np.ndarray, y: np.ndarray | None) -> np.ndarray:
    """What the SG module sees: h, or [h, labels] when conditioned (cDNI)."""
    return h if y is None else np.concatenate([h, y.astype(h.dtype, copy=False)], axis=1)


def init_sg(in_dim: int, out_dim: int, dtype: np.dtype = np.float64
            ) -> tuple[np.ndarray, np.ndarray]:
    """Zero-initialised linear SG module, as in the paper: training starts as
    plain forward passes and the module learns from the first true gradient."""
    return np.zeros((in_dim, out_dim), dtype=dtype), np.zeros(out_dim, dtype=dtype)


def sg_predict(inp: np.ndarray, v: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Predicted per-example gradient dl_i/dh_i: (B, i) @ (i, o) + (o,)."""
    return inp @ v + c


def sg_grads(inp: np.ndarray, pred: np.ndarray, target: np.ndarray
             ) -> tuple[float, np.ndarray, np.ndarray]:
    """L2 regression of the prediction onto the true gradient.

    Loss is the batch mean of 0.5 * ||pred_i - target_i||^2; returns it with
    its gradients dV (i, o) and dc (o,).
    """
    n = inp.shape[0]
    err = pred - target
    loss = float(0.5 * np.sum(err * err) / n)
    return loss, inp.T @ err / n, err.sum(axis=0) / n


# --- classification output ---------------------------------------------------------

def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row max so exp never overflows."""
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def one_hot(labels: np.ndarray, classes: int, dtype=np.float64) -> np.ndarray:
    out = np.zeros((len(labels), classes), dtype=dtype)
    out[np.arange(len(labels)), labels] = 1
    return out


def softmax_ce_loss(z: np.ndarray, labels: np.ndarray) -> float:
    """Batch-mean cross-entropy of integer ``labels`` under softmax(z),
    from log-sum-exp so that confident wrong answers stay finite."""
    m = z.max(axis=1, keepdims=True)
    log_norm = m[:, 0] + np.log(np.exp(z - m).sum(axis=1))
    return float(np.mean(log_norm - z[np.arange(len(labels)), labels]))


def softmax_ce_delta(p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """dl_i/dz_i for softmax + cross-entropy: p - onehot(labels)."""
    return p - one_hot(labels, p.shape[1], p.dtype)


def correct_classes(z: np.ndarray, labels: np.ndarray) -> int:
    return int((z.argmax(axis=1) == labels).sum())
