"""Softmax cross-entropy against finite differences; one-hot labels and class counts."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.math import nn
from tests.numeric import numeric_grad


def test_softmax_rows_sum_to_one_and_survive_large_logits():
    z = np.array([[1000.0, 0.0, -1000.0], [1.0, 2.0, 3.0]])
    p = nn.softmax(z)
    assert np.allclose(p.sum(axis=1), 1) and np.all(np.isfinite(p))
    e = np.exp([1.0, 2.0, 3.0])
    assert np.allclose(p[1], e / e.sum())


def test_ce_loss_by_hand_and_finite_for_confident_mistakes():
    z = np.array([[2.0, 0.0], [0.0, 3.0]])
    labels = np.array([0, 0])
    want = (-math.log(math.exp(2) / (math.exp(2) + 1)) - math.log(1 / (1 + math.exp(3)))) / 2
    assert nn.softmax_ce_loss(z, labels) == pytest.approx(want, rel=1e-12)
    assert math.isfinite(nn.softmax_ce_loss(np.array([[-1e4, 1e4]]), np.array([0])))


def test_ce_delta_is_the_per_example_gradient():
    rng = np.random.default_rng(3)
    z = rng.standard_normal((5, 4))
    labels = rng.integers(0, 4, 5)
    # the batch-mean loss's gradient is delta / n
    numeric = numeric_grad(lambda: nn.softmax_ce_loss(z, labels), z)
    analytic = nn.softmax_ce_delta(nn.softmax(z), labels) / len(z)
    assert np.allclose(numeric, analytic, rtol=1e-6, atol=1e-9)


def test_correct_classes_and_one_hot():
    z = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert nn.correct_classes(z, np.array([1, 1, 1])) == 2
    assert np.array_equal(nn.one_hot(np.array([2, 0]), 3), [[0, 0, 1], [1, 0, 0]])
