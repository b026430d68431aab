"""Batch normalisation as pure numpy functions, with the conventions of ``nn``.

* activations are row-major batches ``(B, features)``;
* the gradient passed into ``bn_backward`` is per example, ``g_i = dl_i/dout_i``
  for the batch-mean loss ``L = mean_i l_i``; the input gradient it returns is
  per example too (``dz_i = B * dL/dz_i``) and the parameter gradients are of
  ``L`` itself, as ``nn.dense_grads`` does for W and b;
* dtype preserving: float32 in gives float32 out (only Python float scalars).
"""
from __future__ import annotations

import numpy as np

EPS = 1e-5
MOMENTUM = 0.1


def init_bn(features: int, dtype: np.dtype = np.float64
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """gamma ones, beta zeros, running_mean zeros, running_var ones."""
    return (np.ones(features, dtype=dtype), np.zeros(features, dtype=dtype),
            np.zeros(features, dtype=dtype), np.ones(features, dtype=dtype))


def bn_train(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = EPS
             ) -> tuple[np.ndarray, tuple]:
    """Training-mode forward with the batch mean and biased batch variance.

    Returns ``(out, cache)`` with ``cache = (xhat, inv_std, mean, var)``.
    """
    mean = z.mean(axis=0)
    centred = z - mean
    var = (centred * centred).mean(axis=0)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, inv_std, mean, var)


def bn_backward(g: np.ndarray, cache: tuple, gamma: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients from per-example ``g_i = dl_i/dout_i``: (dz, dgamma, dbeta).

    dz (B, f) is per example, ``B * dL/dz_i``; the batch statistics couple the
    rows, so dz_i depends on every g_j.  dgamma, dbeta (f,) are of the
    batch-mean loss L.  Since L's upstream gradient is g/B and the map is
    linear, ``B * dL/dz = inv_std * (dxhat - mean(dxhat) - xhat*mean(dxhat*xhat))``
    with ``dxhat = g * gamma`` and means over the batch.
    """
    xhat, inv_std = cache[0], cache[1]
    n = g.shape[0]
    dxhat = g * gamma
    dz = inv_std * (dxhat - dxhat.mean(axis=0) - xhat * (dxhat * xhat).mean(axis=0))
    return dz, (g * xhat).sum(axis=0) / n, g.sum(axis=0) / n


def bn_eval(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray,
            running_mean: np.ndarray, running_var: np.ndarray, eps: float = EPS
            ) -> np.ndarray:
    """Inference: normalise with the running statistics instead of the batch's."""
    return gamma * ((z - running_mean) / np.sqrt(running_var + eps)) + beta


def bn_track(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
             var: np.ndarray, rows: int, momentum: float = MOMENTUM) -> None:
    """``running = (1 - momentum) * running + momentum * batch``, in place.

    The running variance tracks the unbiased batch variance ``var * rows/(rows-1)``.
    A one-row batch has no unbiased estimate (its biased var is 0); its var is
    then used as is rather than dividing by zero.
    """
    if rows > 1:
        var = var * (rows / (rows - 1))
    running_mean *= 1.0 - momentum
    running_mean += momentum * mean
    running_var *= 1.0 - momentum
    running_var += momentum * var
