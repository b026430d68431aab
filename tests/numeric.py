"""Independent references shared by the math tests: central finite
differences and the activations written without pipeline.nn."""
from __future__ import annotations

import numpy as np

EPS = 1e-6


def numeric_grad(loss, arr: np.ndarray, eps: float = EPS) -> np.ndarray:
    """Central differences of ``loss()`` w.r.t. every entry of ``arr`` (perturbed in place)."""
    grad = np.zeros_like(arr)
    it = np.nditer(arr, flags=["multi_index"])
    for _ in it:
        i = it.multi_index
        keep = arr[i]
        arr[i] = keep + eps
        up = loss()
        arr[i] = keep - eps
        down = loss()
        arr[i] = keep
        grad[i] = (up - down) / (2 * eps)
    return grad


def ref_act(name: str, z: np.ndarray) -> np.ndarray:
    """The activations written independently of nn (tanh form of the sigmoid)."""
    if name == "sigmoid":
        return 0.5 * (1.0 + np.tanh(0.5 * z))
    return np.where(z > 0, z, 0.0)
