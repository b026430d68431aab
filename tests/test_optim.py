"""Tests for pipeline.math.optim: SGD (with momentum) and Adam against steps written
out by hand, the per-step scale, the state a checkpoint keeps, and a plain
step that lowers a network's loss."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import nn, optim
from tests.numeric import ref_act
from tests.test_nn import bce_from_logits

pytestmark = pytest.mark.timeout(10)


def params():
    return {"w": np.array([[1.0, -2.0], [0.5, 0.0]]), "b": np.array([0.25, -0.75])}


GRADS = [{"w": np.array([[0.5, 1.0], [-1.0, 2.0]]), "b": np.array([1.0, -1.0])},
         {"w": np.array([[-0.5, 0.0], [1.0, 1.0]]), "b": np.array([0.0, 2.0])}]


def test_plain_sgd_by_hand():
    p = params()
    opt = optim.make("sgd", p, 0.1)
    opt.step(GRADS[0])
    np.testing.assert_allclose(p["w"], [[0.95, -2.1], [0.6, -0.2]], rtol=1e-15)
    np.testing.assert_allclose(p["b"], [0.15, -0.65], rtol=1e-15)
    assert opt.state() == ({}, {})


def test_heavy_ball_momentum_by_hand():
    # buf1 = g1; buf2 = 0.9 * g1 + g2; p -= lr * buf
    p = params()
    opt = optim.make("sgd", p, 0.1, momentum=0.9)
    opt.step(GRADS[0])
    opt.step(GRADS[1])
    buf2_w = 0.9 * GRADS[0]["w"] + GRADS[1]["w"]
    buf2_b = 0.9 * GRADS[0]["b"] + GRADS[1]["b"]
    want_w = params()["w"] - 0.1 * GRADS[0]["w"] - 0.1 * buf2_w
    want_b = params()["b"] - 0.1 * GRADS[0]["b"] - 0.1 * buf2_b
    np.testing.assert_allclose(p["w"], want_w, rtol=1e-14)
    np.testing.assert_allclose(p["b"], want_b, rtol=1e-14)
    _, arrays = opt.state()
    np.testing.assert_allclose(arrays["w.buf"], buf2_w, rtol=1e-15)


def test_momentum_state_round_trip_continues_the_same_steps():
    a_p, b_p = params(), params()
    a = optim.make("sgd", a_p, 0.1, momentum=0.5)
    a.step(GRADS[0])
    b = optim.make("sgd", b_p, 0.1, momentum=0.5)
    for k in b_p:
        b_p[k][...] = a_p[k]
    b.load_state(*a.state())
    a.step(GRADS[1])
    b.step(GRADS[1])
    for k in a_p:
        assert np.array_equal(a_p[k], b_p[k])


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_scale_multiplies_that_step_alone(name):
    """A step at scale s equals a step of an optimiser with s times the rate;
    the next unscaled step is the plain one again."""
    a_p, b_p, c_p = params(), params(), params()
    a = optim.make(name, a_p, 0.01)
    b = optim.make(name, b_p, 0.01 * 2.5)
    a.step(GRADS[0], 2.5)
    b.step(GRADS[0])
    for k in a_p:
        np.testing.assert_allclose(a_p[k], b_p[k], rtol=1e-14)
    # unscaled again: the same change as an optimiser that took the first step plain
    c = optim.make(name, c_p, 0.01)
    c.step(GRADS[0])
    before_a = {k: v.copy() for k, v in a_p.items()}
    before_c = {k: v.copy() for k, v in c_p.items()}
    a.step(GRADS[1])
    c.step(GRADS[1])
    for k in a_p:
        np.testing.assert_allclose(a_p[k] - before_a[k], c_p[k] - before_c[k], rtol=1e-12)


@pytest.mark.parametrize("name", ["sgd", "adam"])
def test_scale_one_is_the_same_bits(name):
    a_p, b_p = params(), params()
    a, b = optim.make(name, a_p, 0.003), optim.make(name, b_p, 0.003)
    for g in GRADS:
        a.step(g)
        b.step(g, 1.0)
    for k in a_p:
        assert np.array_equal(a_p[k], b_p[k])


def test_adam_scaled_step_by_hand():
    p = {"x": np.array([1.0, -1.0])}
    g = np.array([0.5, -2.0])
    opt = optim.make("adam", p, 0.1)
    opt.step({"x": g}, 0.5)
    # first step: m_hat = g, v_hat = g^2, step = lr * scale * g / (|g| + eps)
    np.testing.assert_allclose(p["x"], [1.0 - 0.05 * 0.5 / (0.5 + 1e-8),
                                        -1.0 + 0.05 * 2.0 / (2.0 + 1e-8)], rtol=1e-14)


def test_unknown_optimiser_is_refused():
    with pytest.raises(ValueError, match="unknown optimizer"):
        optim.make("rmsprop", params(), 0.1)


# --- one array's Adam --------------------------------------------------------------------

def test_adam_two_steps_by_hand():
    lr, b1, b2, eps = 0.1, 0.9, 0.999, 1e-8
    p = np.array([1.0, -2.0])
    g1, g2 = np.array([0.5, -0.25]), np.array([-1.0, 0.5])
    opt = optim.AdamSlot(p.shape, lr, b1, b2, eps)
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
    opt = optim.AdamSlot(p.shape, lr=0.1)
    for _ in range(300):
        opt.step(p, 2 * p)  # gradient of |p|^2
    assert np.abs(p).max() < 0.05


# --- one plain step, within a layer's math --------------------------------------------------------------------------------

def test_sgd_updates_in_place_and_descends():
    rng = np.random.default_rng(9)
    a = rng.standard_normal(5)
    p = rng.standard_normal(5)
    before = p.copy()
    alias = p

    def loss(q):
        return 0.5 * float(np.sum((q - a) ** 2))

    grad = p - a
    optim.descend(p, grad, 0.1)
    assert alias is p
    np.testing.assert_allclose(p, before - 0.1 * grad, rtol=1e-15)
    assert loss(p) < loss(before)


@pytest.mark.parametrize("act", nn.ACTIVATIONS)
def test_sgd_step_with_dense_grads_lowers_the_network_loss(act):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 5))
    w, b = nn.init_dense(rng, 5, 4)
    w2 = rng.standard_normal((4, 3))
    y = (rng.uniform(size=(8, 3)) > 0.5).astype(float)

    def loss(w, b):
        return float(bce_from_logits(ref_act(act, x @ w + b) @ w2, y).mean())

    h = nn.dense_forward(x, w, b, act)
    dh = nn.bce_delta(nn.sigmoid(h @ w2), y) @ w2.T
    dw, db, _ = nn.dense_grads(x, dh * nn.activation_slope(act, h), w, need_dx=False)
    before = loss(w, b)
    optim.descend(w, dw, 1e-2)
    optim.descend(b, db, 1e-2)
    assert loss(w, b) < before
