"""Tests for pipeline.math.layernorm and --layernorm against references written
here: the textbook formula with loops, central finite differences of the
function and of a hidden layer using it, and the configuration rules."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import layernorm as ln
from pipeline.config import Config, ConfigError
from pipeline.layers.hidden import HiddenLayer
from tests.numeric import numeric_grad, ref_act
from tests.kit import hidden_layer

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9


def ref_ln(z, gamma, beta, eps=ln.EPS):
    """Layer norm written out per example, with loops and the textbook formula."""
    out = np.empty_like(z)
    f = z.shape[1]
    for i in range(z.shape[0]):
        mu = sum(z[i]) / f
        var = sum((z[i, j] - mu) ** 2 for j in range(f)) / f
        out[i] = gamma * (z[i] - mu) / np.sqrt(var + eps) + beta
    return out


def make(rng, n=5, f=6, dtype=np.float64):
    z = (3.0 * rng.standard_normal((n, f)) + rng.standard_normal((n, 1))).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, f).astype(dtype)
    beta = rng.standard_normal(f).astype(dtype)
    return z, gamma, beta


def test_forward_matches_the_formula_and_normalises_each_example():
    z, gamma, beta = make(np.random.default_rng(0))
    out, (xhat, inv_std) = ln.ln_forward(z, gamma, beta)
    np.testing.assert_allclose(out, ref_ln(z, gamma, beta), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xhat.mean(axis=1), 0.0, atol=1e-12)
    np.testing.assert_allclose(xhat.var(axis=1), 1.0, rtol=1e-4)
    assert inv_std.shape == (z.shape[0], 1)
    g1, b0 = ln.init_ln(6)
    assert (g1 == 1).all() and (b0 == 0).all()


@pytest.mark.parametrize("n", [1, 4])
def test_backward_matches_finite_differences(n):
    rng = np.random.default_rng(2 + n)
    z, gamma, beta = make(rng, n=n, f=5)
    w = rng.standard_normal((n, 5))

    def loss():  # L = mean_i sum_j w_ij out_ij: per-example upstream gradient g_i = w_i
        return float(np.sum(w * ref_ln(z, gamma, beta)) / n)

    _, cache = ln.ln_forward(z, gamma, beta)
    dz, dgamma, dbeta = ln.ln_backward(w, cache, gamma)
    np.testing.assert_allclose(dz / n, numeric_grad(loss, z), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dgamma, numeric_grad(loss, gamma), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dbeta, numeric_grad(loss, beta), rtol=RTOL, atol=ATOL)


def test_examples_do_not_mix():
    # What makes it usable with --unlock: a row's output and gradient depend
    # on that row alone (batch norm's depend on the whole batch).
    rng = np.random.default_rng(7)
    z, gamma, beta = make(rng, n=4)
    g = rng.standard_normal(z.shape)
    out, cache = ln.ln_forward(z, gamma, beta)
    dz = ln.ln_backward(g, cache, gamma)[0]
    z2, g2 = z.copy(), g.copy()
    z2[1:] = 100.0 * rng.standard_normal(z2[1:].shape)
    g2[1:] = rng.standard_normal(g2[1:].shape)
    out2, cache2 = ln.ln_forward(z2, gamma, beta)
    np.testing.assert_array_equal(out2[0], out[0])
    np.testing.assert_allclose(ln.ln_backward(g2, cache2, gamma)[0][0], dz[0], rtol=1e-15)


def test_float32_stays_float32():
    rng = np.random.default_rng(5)
    z, gamma, beta = make(rng, dtype=np.float32)
    out, cache = ln.ln_forward(z, gamma, beta)
    assert out.dtype == np.float32 and all(c.dtype == np.float32 for c in cache)
    grads = ln.ln_backward(rng.standard_normal(z.shape).astype(np.float32), cache, gamma)
    assert all(gr.dtype == np.float32 for gr in grads)
    assert all(a.dtype == np.float32 for a in ln.init_ln(3, np.float32))


# --- in a hidden layer ------------------------------------------------------------------

FAN_IN, WIDTH, B, LABELS = 4, 5, 6, 3


def normed_layer(mode: str, act: str, lr: float, seed: int = 0, norm: str = "layernorm"
                 ) -> HiddenLayer:
    hl = hidden_layer(2, FAN_IN, WIDTH, mode=mode, activation=act, lr=lr, sg_lr=0.05,
                     label_dim=LABELS, rng=np.random.default_rng(seed), **{norm: True})
    rng = np.random.default_rng(seed + 1)
    for k in ("gamma", "beta", "b"):
        hl.weights()[k][...] = rng.uniform(0.5, 2.0, WIDTH) if k == "gamma" \
            else rng.standard_normal(WIDTH)
    if hl.sg is not None:  # it starts at zero: a zero g would test nothing
        hl.v[...] = rng.standard_normal(hl.v.shape)
        hl.c[...] = rng.standard_normal(hl.c.shape)
    return hl


def off_the_kink(rng, hl: HiddenLayer, normalise=None) -> np.ndarray:
    """An input whose normalised pre-activation keeps off the ReLU kink."""
    normalise = normalise or (lambda z: ref_ln(z, *hl.ln))
    while True:
        x = 2.0 * rng.standard_normal((B, FAN_IN))
        if np.min(np.abs(normalise(x @ hl.w + hl.b))) > 1e-3:
            return x


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_backprop_layer_with_layernorm_matches_finite_differences(act):
    lr = 0.1
    hl = normed_layer("backprop", act, lr)
    live = hl.weights()
    assert set(live) == {"w", "b", "gamma", "beta"}  # nothing tracked
    p = {k: live[k].copy() for k in live}
    rng = np.random.default_rng(4)
    x = off_the_kink(rng, hl)
    dh = rng.standard_normal((B, WIDTH))

    def f(x_):
        return ref_act(act, ref_ln(x_ @ p["w"] + p["b"], p["gamma"], p["beta"]))

    def loss():
        return np.sum(dh * f(x)) / B

    want = {k: numeric_grad(loss, p[k]) for k in p}
    want_dx = B * numeric_grad(loss, x)
    h, _ = hl.forward(0, x, None, need_dx=True)
    np.testing.assert_allclose(h, f(x), rtol=1e-12, atol=1e-14)
    np.testing.assert_array_equal(hl.forward_eval(x), h)  # train and eval: one function
    assert hl.receive(0, dh)
    [a] = hl.apply_ready(need_dx=True)
    np.testing.assert_allclose(a.dx, want_dx, rtol=RTOL, atol=ATOL)
    for k in p:
        np.testing.assert_allclose((p[k] - live[k]) / lr, want[k], rtol=RTOL, atol=ATOL,
                                   err_msg=k)


# --- configuration --------------------------------------------------------------------

def test_layernorm_is_exclusive_with_batchnorm_and_combines_with_unlock():
    with pytest.raises(ConfigError, match="--layernorm"):
        Config(layernorm=True, batchnorm=True).validate()
    Config(unlock="forward", layernorm=True).validate()
    with pytest.raises(ValueError, match="exclusive"):
        hidden_layer(1, 2, 3, mode="cdni", activation="relu", lr=0.1, sg_lr=0.1, label_dim=0,
                    rng=np.random.default_rng(0), batchnorm=True, layernorm=True)
