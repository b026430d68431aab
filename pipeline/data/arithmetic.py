"""The addition task, binary addition."""
from __future__ import annotations

import numpy as np


def to_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Integers (n,) -> (n, bits) of 0/1, most significant bit first."""
    shifts = np.arange(bits - 1, -1, -1)
    return ((values[:, None] >> shifts) & 1).astype(np.float64)


def addition(bits: int, examples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """x = [bits(a), bits(b)] (n, 2*bits), y = bits(a + b) (n, bits).

    Operands are below 2**(bits-1), as in the notebook, so every sum fits in
    ``bits`` bits.
    """
    rng = np.random.default_rng([seed, 0xDA7A])
    a = rng.integers(0, 2 ** (bits - 1), size=examples)
    b = rng.integers(0, 2 ** (bits - 1), size=examples)
    x = np.concatenate([to_bits(a, bits), to_bits(b, bits)], axis=1)
    return x, to_bits(a + b, bits)
