"""Tests for pipeline.math.batchnorm against references written here: hand formulas,
hand-computed running statistics, and central finite differences."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import batchnorm as bn
from tests.numeric import numeric_grad

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9


def ref_forward(z, gamma, beta, eps=bn.EPS):
    """Batch norm written out per feature, with loops and the textbook formula."""
    out = np.empty_like(z)
    n = z.shape[0]
    for j in range(z.shape[1]):
        mu = sum(z[:, j]) / n
        var = sum((z[i, j] - mu) ** 2 for i in range(n)) / n
        out[:, j] = gamma[j] * (z[:, j] - mu) / np.sqrt(var + eps) + beta[j]
    return out


def make(rng, n=6, f=4, dtype=np.float64):
    z = (3.0 * rng.standard_normal((n, f)) + rng.standard_normal(f)).astype(dtype)
    gamma = rng.uniform(0.5, 2.0, f).astype(dtype)
    beta = rng.standard_normal(f).astype(dtype)
    return z, gamma, beta


def test_forward_normalises_each_feature():
    z, _, _ = make(np.random.default_rng(0), n=32, f=5)
    gamma, beta, _, _ = bn.init_bn(5, np.float64)
    out, (xhat, inv_std, mean, var) = bn.bn_train(z, gamma, beta)
    np.testing.assert_allclose(out.mean(axis=0), 0.0, atol=1e-12)
    # biased variance of xhat is var / (var + eps): ~1 for unit-scale inputs
    np.testing.assert_allclose(out.var(axis=0), 1.0, rtol=1e-4)
    np.testing.assert_allclose(xhat, out, rtol=1e-14)
    np.testing.assert_allclose(mean, np.mean(z, axis=0), rtol=1e-12)
    np.testing.assert_allclose(var, np.var(z, axis=0, ddof=0), rtol=1e-12)
    np.testing.assert_allclose(inv_std, 1.0 / np.sqrt(np.var(z, axis=0) + bn.EPS), rtol=1e-12)


def test_forward_with_gamma_beta_matches_formula():
    z, gamma, beta = make(np.random.default_rng(1))
    out, _ = bn.bn_train(z, gamma, beta)
    np.testing.assert_allclose(out, ref_forward(z, gamma, beta), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n", [2, 5])
def test_backward_matches_finite_differences(n):
    rng = np.random.default_rng(2 + n)
    z, gamma, beta = make(rng, n=n, f=3)
    w = rng.standard_normal((n, 3))

    def loss():  # L = mean_i sum_j w_ij out_ij
        return float(np.sum(w * ref_forward(z, gamma, beta)) / n)

    # dL/dout_ij = w_ij / n, so the per-example upstream gradient is
    # g_i = dl_i/dout_i = n * dL/dout_i = w_i.
    _, cache = bn.bn_train(z, gamma, beta)
    dz, dgamma, dbeta = bn.bn_backward(w, cache, gamma)
    assert dz.shape == z.shape and dgamma.shape == gamma.shape and dbeta.shape == beta.shape
    # dz is per example (n * dL/dz_i); dgamma, dbeta are of L itself.
    np.testing.assert_allclose(dz / n, numeric_grad(loss, z), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dgamma, numeric_grad(loss, gamma), rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dbeta, numeric_grad(loss, beta), rtol=RTOL, atol=ATOL)


def test_input_gradient_sums_to_zero_over_batch():
    rng = np.random.default_rng(4)
    z, gamma, beta = make(rng, n=16, f=5)
    _, cache = bn.bn_train(z, gamma, beta)
    dz, _, _ = bn.bn_backward(rng.standard_normal(z.shape), cache, gamma)
    scale = np.abs(dz).max()
    np.testing.assert_allclose(dz.sum(axis=0) / scale, 0.0, atol=1e-12)


def test_eval_uses_running_statistics():
    z = np.array([[1.0, -2.0], [3.0, 4.0]])
    gamma, beta = np.array([2.0, 0.5]), np.array([0.1, -1.0])
    rm, rv = np.array([0.5, 1.0]), np.array([4.0, 0.25])
    want = np.array([[2.0 * 0.5 / np.sqrt(4.0 + bn.EPS) + 0.1, 0.5 * -3.0 / np.sqrt(0.25 + bn.EPS) - 1.0],
                     [2.0 * 2.5 / np.sqrt(4.0 + bn.EPS) + 0.1, 0.5 * 3.0 / np.sqrt(0.25 + bn.EPS) - 1.0]])
    np.testing.assert_allclose(bn.bn_eval(z, gamma, beta, rm, rv), want, rtol=1e-14)


def test_track_two_steps_by_hand():
    _, _, rm, rv = bn.init_bn(1, np.float64)  # 0 and 1
    # step 1: batch [1, 3] -> mean 2, biased var 1, unbiased 2
    bn.bn_track(rm, rv, np.array([2.0]), np.array([1.0]), rows=2)
    np.testing.assert_allclose(rm, [0.9 * 0.0 + 0.1 * 2.0], rtol=1e-14)  # 0.2
    np.testing.assert_allclose(rv, [0.9 * 1.0 + 0.1 * 2.0], rtol=1e-14)  # 1.1
    # step 2: batch [0, 0, 6, 6] -> mean 3, biased var 9, unbiased 12
    bn.bn_track(rm, rv, np.array([3.0]), np.array([9.0]), rows=4)
    np.testing.assert_allclose(rm, [0.9 * 0.2 + 0.1 * 3.0], rtol=1e-14)  # 0.48
    np.testing.assert_allclose(rv, [0.9 * 1.1 + 0.1 * 12.0], rtol=1e-14)  # 2.19


def test_track_with_train_statistics_and_other_momentum():
    z = np.array([[1.0], [3.0]])
    _, (_, _, mean, var) = bn.bn_train(z, np.ones(1), np.zeros(1))
    rm, rv = np.zeros(1), np.ones(1)
    bn.bn_track(rm, rv, mean, var, rows=2, momentum=0.5)
    np.testing.assert_allclose(rm, [1.0], rtol=1e-14)   # 0.5*0 + 0.5*2
    np.testing.assert_allclose(rv, [1.5], rtol=1e-14)   # 0.5*1 + 0.5*2


def test_float32_stays_float32():
    rng = np.random.default_rng(5)
    z, gamma, beta = make(rng, dtype=np.float32)
    out, cache = bn.bn_train(z, gamma, beta)
    assert out.dtype == z.dtype
    assert all(c.dtype == z.dtype for c in cache)
    grads = bn.bn_backward(rng.standard_normal(z.shape).astype(np.float32), cache, gamma)
    assert all(gr.dtype == z.dtype for gr in grads)
    _, _, rm, rv = bn.init_bn(z.shape[1], np.float32)
    assert rm.dtype == rv.dtype == np.float32
    bn.bn_track(rm, rv, cache[2], cache[3], rows=z.shape[0])
    assert rm.dtype == rv.dtype == np.float32
    assert bn.bn_eval(z, gamma, beta, rm, rv).dtype == z.dtype


def test_single_row_batch_is_finite():
    z, gamma, beta = make(np.random.default_rng(6), n=1, f=3)
    out, cache = bn.bn_train(z, gamma, beta)
    np.testing.assert_allclose(out, beta[None, :], atol=1e-12)  # xhat = 0
    dz, dgamma, dbeta = bn.bn_backward(np.ones_like(z), cache, gamma)
    for a in (out, dz, dgamma, dbeta):
        assert np.all(np.isfinite(a))
    np.testing.assert_allclose(dz, 0.0, atol=1e-12)
    _, _, rm, rv = bn.init_bn(3, np.float64)
    bn.bn_track(rm, rv, cache[2], cache[3], rows=1)  # var 0 used as is
    assert np.all(np.isfinite(rm)) and np.all(np.isfinite(rv))
    np.testing.assert_allclose(rv, 0.9, rtol=1e-14)
