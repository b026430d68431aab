"""Layer normalisation as pure numpy functions, with the conventions of ``nn``
and ``batchnorm``.

Each example (row) is normalised over its own features, so there are no batch
statistics and nothing tracked: training and evaluation compute the same
function, and a batch of synthetic inputs (``--unlock``) changes nothing but
its own rows. Ba, Kiros and Hinton 2016: ``out = gamma * (z - mu) / sigma + beta``
with mu and sigma² the mean and biased variance of the row.

* the gradient passed into ``ln_backward`` is per example, ``g_i = dl_i/dout_i``
  for the batch-mean loss ``L = mean_i l_i``; the input gradient it returns is
  per example too (``dz_i = dl_i/dz_i``: rows do not mix) and the parameter
  gradients are of ``L`` itself, as ``nn.dense_grads`` does for W and b;
* dtype preserving: float32 in gives float32 out.
"""
from __future__ import annotations

import numpy as np

EPS = 1e-5


def init_ln(features: int, dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """gamma ones, beta zeros."""
    return np.ones(features, dtype=dtype), np.zeros(features, dtype=dtype)


def ln_forward(z: np.ndarray, gamma: np.ndarray, beta: np.ndarray, eps: float = EPS
               ) -> tuple[np.ndarray, tuple[np.ndarray, np.ndarray]]:
    """Returns ``(out, cache)`` with ``cache = (xhat, inv_std)``, inv_std (B, 1)."""
    mean = z.mean(axis=1, keepdims=True)
    centred = z - mean
    var = (centred * centred).mean(axis=1, keepdims=True)
    inv_std = 1.0 / np.sqrt(var + eps)
    xhat = centred * inv_std
    return gamma * xhat + beta, (xhat, inv_std)


def ln_backward(g: np.ndarray, cache: tuple, gamma: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients from per-example ``g_i = dl_i/dout_i``: (dz, dgamma, dbeta).

    With ``dxhat = g * gamma`` and means over the row's features,
    ``dz = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))``: the
    batch-norm formula with the roles of rows and features swapped.
    """
    xhat, inv_std = cache
    n = g.shape[0]
    dxhat = g * gamma
    dz = inv_std * (dxhat - dxhat.mean(axis=1, keepdims=True)
                    - xhat * (dxhat * xhat).mean(axis=1, keepdims=True))
    return dz, (g * xhat).sum(axis=0) / n, g.sum(axis=0) / n
