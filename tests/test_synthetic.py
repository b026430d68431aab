"""Tests for pipeline.synthetic: the SG module, linear (bit for bit the nn
functions) and with hidden layers (against finite differences); the scaled
step, and the drift and extrapolated prediction of --sg-lookahead against
the formula written out here."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import nn
from pipeline.layers.sg_module import SGModule
from tests.numeric import numeric_grad

pytestmark = pytest.mark.timeout(30)

RTOL = 1e-6
ATOL = 1e-8
B, WIDTH = 6, 3


# --- the module -------------------------------------------------------

def test_linear_sg_module_is_bitwise_the_nn_functions():
    rng = np.random.default_rng(0)
    lr = 0.03
    sg = SGModule(np.random.default_rng(1), 5, WIDTH, (), np.float64, "sgd", lr)
    assert list(sg.params()) == ["sg_v", "sg_c"]
    assert not sg.v.any() and not sg.c.any()
    sg.v[...] = rng.standard_normal(sg.v.shape)
    sg.c[...] = rng.standard_normal(sg.c.shape)
    for t in range(2):
        inp, target = rng.standard_normal((B, 5)), rng.standard_normal((B, WIDTH))
        v0, c0 = sg.v.copy(), sg.c.copy()
        want_pred = nn.sg_predict(inp, v0, c0)
        want_loss, dv, dc = nn.sg_grads(inp, want_pred, target)
        pred, acts = sg.predict(inp)
        assert np.array_equal(pred, want_pred) and len(acts) == 1 and acts[0] is inp
        assert sg.version == t
        assert sg.train(acts, pred, target) == want_loss
        assert sg.version == t + 1
        assert np.array_equal(sg.v, v0 - lr * dv) and np.array_equal(sg.c, c0 - lr * dc)
        assert sg.params()["sg_v"] is sg.v  # live arrays, not copies


def test_hidden_sg_module_train_applies_the_finite_difference_gradient():
    lr, in_dim = 0.5, 4
    sg = SGModule(np.random.default_rng(2), in_dim, WIDTH, (5,), np.float64, "sgd", lr)
    p = sg.params()
    assert list(p) == ["sg_v0", "sg_c0", "sg_v", "sg_c"]
    assert p["sg_v0"].shape == (in_dim, 5) and p["sg_v"].shape == (5, WIDTH)
    assert not p["sg_v"].any() and not p["sg_c"].any() and p["sg_v0"].any()
    rng = np.random.default_rng(3)
    for name in ("sg_c0", "sg_v", "sg_c"):  # a non-zero last layer, so every gradient is too
        p[name][...] = rng.standard_normal(p[name].shape)
    while True:  # finite differences need every ReLU away from its kink
        inp = rng.standard_normal((B, in_dim))
        if np.min(np.abs(inp @ p["sg_v0"] + p["sg_c0"])) > 1e-3:
            break
    target = rng.standard_normal((B, WIDTH))
    before = {k: v.copy() for k, v in p.items()}

    def loss():
        hid = np.where(inp @ before["sg_v0"] + before["sg_c0"] > 0,
                       inp @ before["sg_v0"] + before["sg_c0"], 0.0)
        err = hid @ before["sg_v"] + before["sg_c"] - target
        return 0.5 * np.sum(err ** 2) / B

    want = {k: numeric_grad(loss, before[k]) for k in before}
    pred, acts = sg.predict(inp)
    assert len(acts) == 2
    got_loss = sg.train(acts, pred, target)
    assert got_loss == pytest.approx(loss(), rel=1e-12)
    assert sg.version == 1
    for k in before:
        assert np.abs(want[k]).max() > 1e-3, k
        np.testing.assert_allclose((before[k] - p[k]) / lr, want[k], rtol=RTOL, atol=ATOL,
                                   err_msg=k)
    sg.train(*sg.predict(inp)[::-1], target)
    assert sg.version == 2




# --- --sg-lookahead: drift and extrapolation ------------------------------------------------

def test_drift_is_the_average_update_and_lookahead_predicts_with_the_module_moved_along_it():
    rng = np.random.default_rng(3)
    sg = SGModule(np.random.default_rng(1), 5, WIDTH, (), np.float64, "sgd", 0.1,
                  track_drift=True)
    drift_v, drift_c = np.zeros_like(sg.v), np.zeros_like(sg.c)
    for _ in range(3):
        inp, target = rng.standard_normal((B, 5)), rng.standard_normal((B, WIDTH))
        v0, c0 = sg.v.copy(), sg.c.copy()
        pred, acts = sg.predict(inp)
        sg.train(acts, pred, target, scale=2.0)
        _, dv, dc = nn.sg_grads(inp, inp @ v0 + c0, target)
        np.testing.assert_allclose(sg.v, v0 - 0.2 * dv, rtol=1e-12)   # the scaled step
        drift_v += 0.1 * ((sg.v - v0) - drift_v)
        drift_c += 0.1 * ((sg.c - c0) - drift_c)
    np.testing.assert_allclose(sg.drift["sg_v"], drift_v, rtol=1e-12)
    np.testing.assert_allclose(sg.drift["sg_c"], drift_c, rtol=1e-12)
    inp = rng.standard_normal((B, 5))
    ahead, _ = sg.predict(inp, ahead=2.5)
    np.testing.assert_allclose(ahead, inp @ (sg.v + 2.5 * drift_v) + (sg.c + 2.5 * drift_c),
                               rtol=1e-12)
    own, _ = sg.predict(inp)
    np.testing.assert_array_equal(own, inp @ sg.v + sg.c)   # the module itself did not move


def test_without_a_tracked_drift_there_is_nothing_to_look_ahead_along():
    sg = SGModule(np.random.default_rng(1), 4, WIDTH, (), np.float64, "sgd", 0.1)
    sg.v[...] = 1.0
    inp = np.ones((B, 4))
    np.testing.assert_array_equal(sg.predict(inp, ahead=3.0)[0], sg.predict(inp)[0])
    assert sg.drift is None
