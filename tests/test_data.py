"""Tests for pipeline.data: every example is a correct binary sum; batches cover an epoch once."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.data import arithmetic as data
from pipeline.nodes import schedule
from pipeline.config import Config

pytestmark = pytest.mark.timeout(60)


def decode(bits_row) -> int:
    """0/1 floats, most significant bit first -> a Python int (exact for any width)."""
    value = 0
    for bit in bits_row:
        assert bit in (0.0, 1.0)
        value = 2 * value + int(bit)
    return value


def test_to_bits_table():
    got = data.to_bits(np.array([0, 1, 5, 6, 7]), 3)
    np.testing.assert_array_equal(got, [[0, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 0], [1, 1, 1]])
    assert got.dtype == np.float64
    np.testing.assert_array_equal(data.to_bits(np.array([200]), 8), [[1, 1, 0, 0, 1, 0, 0, 0]])


@pytest.mark.parametrize("bits, examples, seed", [(8, 100, 1), (2, 10, 0), (5, 1, 3), (62, 50, 9)])
def test_every_row_is_the_binary_sum_of_its_operands(bits, examples, seed):
    x, y = data.addition(bits, examples, seed)
    assert x.shape == (examples, 2 * bits) and y.shape == (examples, bits)
    assert x.dtype == np.float64 and y.dtype == np.float64
    for xi, yi in zip(x, y):
        a, b = decode(xi[:bits]), decode(xi[bits:])
        assert a < 2 ** (bits - 1) and b < 2 ** (bits - 1)  # so the sum fits in `bits` bits
        assert decode(yi) == a + b


def test_seed_task_operands_are_varied():
    x, _ = data.addition(8, 100, 1)
    ops = {(decode(r[:8]), decode(r[8:])) for r in x}
    assert len(ops) > 90  # not a constant or tiny set
    assert max(a for a, _ in ops) > 100 and max(b for _, b in ops) > 100


def test_deterministic_per_seed():
    x1, y1 = data.addition(8, 100, 5)
    x2, y2 = data.addition(8, 100, 5)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)


@pytest.mark.parametrize("s1, s2", [(1, 2), (0, 1), (5, 2 ** 32 - 1)])
def test_different_seeds_differ(s1, s2):
    x1, _ = data.addition(8, 100, s1)
    x2, _ = data.addition(8, 100, s2)
    assert not np.array_equal(x1, x2)


@pytest.mark.parametrize("examples, batch_size, want", [
    (100, 10, [(i, i + 10) for i in range(0, 100, 10)]),
    (25, 10, [(0, 10), (10, 20), (20, 25)]),
    (10, 10, [(0, 10)]),
    (1, 10, [(0, 1)]),
    (3, 1, [(0, 1), (1, 2), (2, 3)]),
    (7, 3, [(0, 3), (3, 6), (6, 7)]),
])
def test_batch_slices_table(examples, batch_size, want):
    got = schedule.batch_slices(examples, batch_size)
    assert [(s.start, s.stop) for s in got] == want
    assert all(s.step in (None, 1) for s in got)


@given(examples=st.integers(1, 500), batch_size=st.integers(1, 60))
def test_batch_slices_cover_every_example_once(examples, batch_size):
    slices = schedule.batch_slices(examples, batch_size)
    covered = np.concatenate([np.arange(examples)[s] for s in slices])
    np.testing.assert_array_equal(covered, np.arange(examples))
    sizes = [s.stop - s.start for s in slices]
    assert all(n == batch_size for n in sizes[:-1])
    assert 1 <= sizes[-1] <= batch_size
    assert sizes[-1] == (examples % batch_size or batch_size)
    assert len(slices) == Config(examples=examples, batch_size=batch_size).batches_per_epoch
