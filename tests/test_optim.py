"""Tests for pipeline.optim: SGD (with momentum) and Adam against steps written
out by hand, the per-step scale, and the state a checkpoint keeps."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import optim

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
