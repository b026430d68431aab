"""Tests for pipeline.math.nn: every gradient against central finite differences of a loss written here."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from pipeline.math import nn
from tests.numeric import EPS, numeric_grad, ref_act

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9


def away_from_kink(rng, x, w, b, margin=1e-3):
    """Shift the bias so no pre-activation sits within ``margin`` of relu's kink."""
    z = x @ w + b
    while np.min(np.abs(z)) < margin:
        b = b + rng.uniform(0.01, 0.02, size=b.shape)
        z = x @ w + b
    return b


# --- dense layer ------------------------------------------------------------------

@pytest.mark.parametrize("act", nn.ACTIVATIONS)
@pytest.mark.parametrize("n", [1, 5])
def test_dense_grads_match_finite_differences(act, n):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((n, 4))
    w = rng.standard_normal((4, 3))
    b = rng.standard_normal(3)
    b = away_from_kink(rng, x, w, b)
    r = rng.standard_normal((n, 3))  # per-example dl_i/dh_i

    def loss():  # L = mean_i sum_j R_ij f(x W + b)_ij
        return float(np.sum(r * ref_act(act, x @ w + b)) / n)

    h = nn.dense_forward(x, w, b, act)
    np.testing.assert_allclose(h, ref_act(act, x @ w + b), rtol=1e-14, atol=1e-15)
    dz = r * nn.activation_slope(act, h)
    dw, db, dx = nn.dense_grads(x, dz, w, need_dx=True)
    assert dw.shape == w.shape and db.shape == b.shape and dx.shape == x.shape
    np.testing.assert_allclose(dw, numeric_grad(loss, w), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=RTOL, atol=ATOL)
    # dx is per example: dl_i/dx_i = n * dL/dx_i
    np.testing.assert_allclose(dx, n * numeric_grad(loss, x), rtol=RTOL, atol=ATOL)


def test_dense_grads_without_dx():
    rng = np.random.default_rng(0)
    x, dz, w = rng.standard_normal((3, 2)), rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    dw, db, dx = nn.dense_grads(x, dz, w, need_dx=False)
    assert dx is None
    np.testing.assert_allclose(dw, sum(np.outer(x[i], dz[i]) for i in range(3)) / 3, rtol=1e-14)
    np.testing.assert_allclose(db, dz.mean(axis=0), rtol=1e-14)


def test_dense_grads_do_not_depend_on_batch_size_for_a_repeated_batch():
    # The parameter gradient is of the batch-*mean* loss: a batch stacked on
    # itself has the same gradient; the per-example dx is stacked too.
    rng = np.random.default_rng(1)
    x, dz, w = rng.standard_normal((3, 2)), rng.standard_normal((3, 4)), rng.standard_normal((2, 4))
    dw1, db1, dx1 = nn.dense_grads(x, dz, w, True)
    dw2, db2, dx2 = nn.dense_grads(np.vstack([x, x]), np.vstack([dz, dz]), w, True)
    np.testing.assert_allclose(dw2, dw1, rtol=1e-14)
    np.testing.assert_allclose(db2, db1, rtol=1e-14)
    np.testing.assert_array_equal(dx2, np.vstack([dx1, dx1]))


@pytest.mark.parametrize("act", nn.ACTIVATIONS)
def test_activation_slope_is_derivative_in_terms_of_output(act):
    z = np.array([-3.0, -0.7, -0.01, 0.02, 0.5, 4.0])
    fd = (ref_act(act, z + EPS) - ref_act(act, z - EPS)) / (2 * EPS)
    np.testing.assert_allclose(nn.activation_slope(act, nn.activate(act, z)), fd,
                               rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("fn", [nn.activate, nn.activation_slope])
def test_unknown_activation_raises_value_error(fn):
    with pytest.raises(ValueError, match="tanh"):
        fn("tanh", np.zeros(2))


def test_init_dense_shapes_scale_and_determinism():
    w, b = nn.init_dense(np.random.default_rng(3), 400, 300)
    assert w.shape == (400, 300) and b.shape == (300,)
    assert w.dtype == np.float64
    np.testing.assert_array_equal(b, 0.0)
    assert abs(w.std() * math.sqrt(400) - 1.0) < 0.02  # 1/sqrt(fan_in) scaling
    w2, _ = nn.init_dense(np.random.default_rng(3), 400, 300)
    np.testing.assert_array_equal(w, w2)
    w32, b32 = nn.init_dense(np.random.default_rng(3), 4, 3, np.float32)
    assert w32.dtype == np.float32 and b32.dtype == np.float32


# --- sigmoid ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_sigmoid_is_stable_for_large_inputs(dtype):
    z = np.array([-1e6, -1000.0, -745.0, -100.0, -30.0, 0.0, 30.0, 100.0, 1000.0, 1e6], dtype=dtype)
    # numpy's default ignores underflow (exp(-1e6) -> 0 is exact enough); any
    # overflow, invalid or divide warning escaping sigmoid is an error here.
    with warnings.catch_warnings(), np.errstate(over="raise", invalid="raise", divide="raise"):
        warnings.simplefilter("error")
        s = nn.sigmoid(z)
    assert s.dtype == dtype
    assert np.all(np.isfinite(s))
    assert np.all((s >= 0) & (s <= 1))
    # reference: exp of a non-positive number only, so it never overflows
    zf = [float(v) for v in z]
    want = [1 / (1 + math.exp(-v)) if v >= 0 else math.exp(v) / (1 + math.exp(v)) for v in zf]
    np.testing.assert_allclose(s, np.array(want), rtol=1e-6 if dtype == np.float32 else 1e-15,
                               atol=np.finfo(dtype).tiny)  # subnormal results may flush to 0
    assert s[5] == 0.5 and s[-1] == 1.0 and s[0] == 0.0
    assert np.all(np.diff(s) >= 0)


# --- output layer: BCE --------------------------------------------------------------

def test_bce_loss_hand_computed():
    p = np.array([[0.5, 0.25, 0.9],
                  [0.75, 0.1, 0.2]])
    y = np.array([[1.0, 0.0, 1.0],
                  [1.0, 1.0, 0.0]])
    ex0 = -math.log(0.5) - math.log(0.75) - math.log(0.9)
    ex1 = -math.log(0.75) - math.log(0.1) - math.log(0.8)
    assert nn.bce_loss(p, y) == pytest.approx((ex0 + ex1) / 2, rel=1e-14)
    # summed over bits, averaged over examples: one example alone gives its own sum
    assert nn.bce_loss(p[:1], y[:1]) == pytest.approx(ex0, rel=1e-14)


def test_bce_loss_of_a_perfect_and_a_saturated_prediction_is_finite():
    y = np.array([[1.0, 0.0]])
    assert nn.bce_loss(np.array([[1.0, 0.0]]), y) == 0.0
    wrong = nn.bce_loss(np.array([[0.0, 1.0]]), y)
    assert math.isfinite(wrong) and wrong > 1000  # -2 log(tiny), not inf


def bce_from_logits(z: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-example summed BCE of sigmoid(z), from logits: log(1+e^z) - y z."""
    return np.sum(np.logaddexp(0.0, z) - y * z, axis=1)


@pytest.mark.parametrize("soft", [False, True])
def test_bce_delta_is_derivative_of_per_example_bce_wrt_logits(soft):
    rng = np.random.default_rng(11)
    z = rng.standard_normal((4, 5)) * 3
    y = rng.uniform(size=(4, 5)) if soft else (rng.uniform(size=(4, 5)) > 0.5).astype(float)

    def loss():  # sum_i l_i: its gradient w.r.t. z_i is dl_i/dz_i
        return float(bce_from_logits(z, y).sum())

    fd = numeric_grad(loss, z)
    np.testing.assert_allclose(nn.bce_delta(nn.sigmoid(z), y), fd, rtol=RTOL, atol=ATOL)
    # and bce_loss agrees with the logit form
    assert nn.bce_loss(nn.sigmoid(z), y) == pytest.approx(bce_from_logits(z, y).mean(), rel=1e-12)


def test_exact_matches_table():
    p = np.array([[0.9, 0.1],    # right
                  [0.6, 0.4],    # second bit wrong
                  [0.5, 0.9],    # 0.5 reads as 0: first bit wrong
                  [0.2, 0.7],    # right
                  [0.49, 0.51],  # both wrong
                  [0.51, 0.0]])  # right
    y = np.array([[1, 0], [1, 1], [1, 1], [0, 1], [1, 0], [1, 0]], dtype=float)
    assert nn.exact_matches(p, y) == 3
    assert nn.exact_matches(p[[0, 3, 5]], y[[0, 3, 5]]) == 3
    assert nn.exact_matches(p[[1, 2, 4]], y[[1, 2, 4]]) == 0
    assert isinstance(nn.exact_matches(p, y), int)


# --- synthetic-gradient module --------------------------------------------------------

def test_sg_input_plain_and_conditioned():
    h = np.arange(6, dtype=np.float64).reshape(2, 3)
    assert nn.sg_input(h, None) is h
    y = np.array([[1, 0], [0, 1]], dtype=np.int64)
    got = nn.sg_input(h, y)
    np.testing.assert_array_equal(got, [[0, 1, 2, 1, 0], [3, 4, 5, 0, 1]])
    assert got.dtype == np.float64
    h32 = h.astype(np.float32)
    assert nn.sg_input(h32, y.astype(np.float64)).dtype == np.float32


def test_init_sg_is_all_zeros():
    v, c = nn.init_sg(7, 4)
    assert v.shape == (7, 4) and c.shape == (4,)
    assert v.dtype == np.float64 and c.dtype == np.float64
    assert not v.any() and not c.any()
    v32, c32 = nn.init_sg(2, 3, np.float32)
    assert v32.dtype == np.float32 and c32.dtype == np.float32
    # a zero module predicts a zero gradient for any input
    inp = np.random.default_rng(0).standard_normal((5, 7))
    np.testing.assert_array_equal(nn.sg_predict(inp, v, c), np.zeros((5, 4)))


def test_sg_predict_is_affine():
    rng = np.random.default_rng(2)
    inp, v, c = rng.standard_normal((3, 4)), rng.standard_normal((4, 2)), rng.standard_normal(2)
    want = np.array([[sum(inp[i, k] * v[k, j] for k in range(4)) + c[j] for j in range(2)]
                     for i in range(3)])
    np.testing.assert_allclose(nn.sg_predict(inp, v, c), want, rtol=1e-13)


@pytest.mark.parametrize("n", [1, 6])
def test_sg_grads_match_finite_differences(n):
    rng = np.random.default_rng(5)
    inp = rng.standard_normal((n, 4))
    v = rng.standard_normal((4, 3))
    c = rng.standard_normal(3)
    target = rng.standard_normal((n, 3))

    def loss():  # mean_i 0.5 * ||inp_i V + c - t_i||^2, written elementwise
        total = 0.0
        for i in range(n):
            for j in range(3):
                pred = sum(inp[i, k] * v[k, j] for k in range(4)) + c[j]
                total += 0.5 * (pred - target[i, j]) ** 2
        return total / n

    want_loss = loss()
    got_loss, dv, dc = nn.sg_grads(inp, nn.sg_predict(inp, v, c), target)
    assert isinstance(got_loss, float)
    assert got_loss == pytest.approx(want_loss, rel=1e-13)
    np.testing.assert_allclose(dv, numeric_grad(loss, v), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dc, numeric_grad(loss, c), rtol=RTOL, atol=ATOL)


def test_sg_grads_zero_when_prediction_is_exact():
    inp = np.ones((2, 3))
    pred = np.full((2, 2), 0.25)
    loss, dv, dc = nn.sg_grads(inp, pred, pred.copy())
    assert loss == 0.0 and not dv.any() and not dc.any()
