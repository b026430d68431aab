"""Softmax cross-entropy against finite differences, Adam against steps
computed by hand from its definition."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline import nn
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


def test_adam_two_steps_by_hand():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = np.array([1.0, -2.0])
    g1, g2 = np.array([0.5, -0.25]), np.array([-1.0, 0.5])
    opt = nn.Adam(p.shape, lr, b1, b2, eps)
    opt.step(p, g1)
    # step 1: m_hat = g1, v_hat = g1**2, so the move is lr * g1 / (|g1| + eps)
    want1 = np.array([1.0, -2.0]) - lr * g1 / (np.abs(g1) + eps)
    assert np.allclose(p, want1, rtol=0, atol=1e-12)
    opt.step(p, g2)
    m = b1 * (1 - b1) * g1 + (1 - b1) * g2
    v = b2 * (1 - b2) * g1 ** 2 + (1 - b2) * g2 ** 2
    want2 = want1 - lr * (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
    assert np.allclose(p, want2, rtol=0, atol=1e-12)
    assert opt.t == 2


def test_adam_descends_a_quadratic():
    p = np.array([3.0, -4.0])
    opt = nn.Adam(p.shape, lr=0.1)
    for _ in range(300):
        opt.step(p, 2 * p)  # gradient of |p|^2
    assert np.abs(p).max() < 0.05
