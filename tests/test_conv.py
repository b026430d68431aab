"""pipeline.math.conv against independent references: a convolution and a
max-pool written as plain loops, and central finite differences."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import conv
from tests.numeric import numeric_grad

pytestmark = pytest.mark.timeout(60)


def loop_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Same-padded, stride-1 convolution (cross-correlation, as every deep
    learning library computes it) written out pixel by pixel."""
    n, h, wd, c = x.shape
    k, _, _, out = w.shape
    p = k // 2
    z = np.zeros((n, h, wd, out))
    for e in range(n):
        for r in range(h):
            for s in range(wd):
                for o in range(out):
                    total = b[o]
                    for i in range(k):
                        for j in range(k):
                            rr, ss = r + i - p, s + j - p
                            if 0 <= rr < h and 0 <= ss < wd:
                                total += x[e, rr, ss, :] @ w[i, j, :, o]
                    z[e, r, s, o] = total
    return z


def loop_input_grad(dz: np.ndarray, w: np.ndarray, shape) -> np.ndarray:
    """dx of the same convolution, pixel by pixel: each output pixel's
    gradient sent back through every tap onto the input pixel it read."""
    n, h, wd, c = shape
    k, _, _, out = w.shape
    p = k // 2
    g = dz.reshape(n, h, wd, out)
    dx = np.zeros(shape)
    for e in range(n):
        for r in range(h):
            for s in range(wd):
                for i in range(k):
                    for j in range(k):
                        rr, ss = r + i - p, s + j - p
                        if 0 <= rr < h and 0 <= ss < wd:
                            dx[e, rr, ss, :] += w[i, j] @ g[e, r, s]
    return dx


def loop_pool_routes(a: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each window's index as np.argmax gives it over its four values in
    row-major order (the first of tied maxima, the first NaN), and the
    gradient ``g`` sent to that pixel alone."""
    n, h, w, k = a.shape
    idx = np.zeros((n, h // 2, w // 2, k), dtype=int)
    back = np.zeros_like(a, dtype=g.dtype)
    for e in range(n):
        for r in range(h // 2):
            for s in range(w // 2):
                for c in range(k):
                    i = int(np.argmax(a[e, 2 * r:2 * r + 2, 2 * s:2 * s + 2, c].ravel()))
                    idx[e, r, s, c] = i
                    back[e, 2 * r + i // 2, 2 * s + i % 2, c] = g[e, r, s, c]
    return idx, back


def loop_pool(a: np.ndarray) -> np.ndarray:
    n, h, w, k = a.shape
    out = np.zeros((n, h // 2, w // 2, k))
    for e in range(n):
        for r in range(h // 2):
            for s in range(w // 2):
                for c in range(k):
                    out[e, r, s, c] = a[e, 2 * r:2 * r + 2, 2 * s:2 * s + 2, c].max()
    return out


def case(seed: int, n=2, h=5, w=4, c=3, k=3, out=2, dtype=np.float64):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, h, w, c)).astype(dtype)
    wt = (rng.standard_normal((k, k, c, out)) / np.sqrt(k * k * c)).astype(dtype)
    b = rng.standard_normal(out).astype(dtype)
    return x, wt, b


TOL = {np.float32: 2e-5, np.float64: 1e-12}  # float32: its rounding over k*k*C terms


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (1, 7, 7, 1), (3, 6, 5, 1)])
def test_forward_is_the_loop_written_convolution(k, shape, dtype):
    n, h, w, c = shape
    x, wt, b = case(k, n, h, w, c, k, out=4, dtype=dtype)
    z, cols = conv.conv_forward(x, wt, b)
    assert z.shape == (n * h * w, 4) and cols.shape == (n * h * w, k * k * c)
    np.testing.assert_allclose(z.reshape(n, h, w, 4), loop_conv(x, wt, b), rtol=TOL[dtype],
                               atol=TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [1, 3, 5])
@pytest.mark.parametrize("shape", [(2, 5, 4, 3), (1, 7, 7, 1), (3, 6, 5, 1),
                                   (2, 4, 5, conv.FEW_CHANNELS)])  # both forms
def test_input_grad_is_the_loop_written_one_and_col2im_of_the_matmul(k, shape, dtype):
    n, h, w, c = shape
    _, wt, _ = case(k, n, h, w, c, k, out=4, dtype=dtype)
    dz = np.random.default_rng(k).standard_normal((n * h * w, 4)).astype(dtype)
    dx = conv.conv_input_grad(dz, wt, shape)
    assert dx.shape == shape and dx.dtype == dtype
    np.testing.assert_allclose(dx, loop_input_grad(dz, wt, shape), rtol=TOL[dtype],
                               atol=TOL[dtype])
    # the textbook form: the matmul back to cols, then col2im
    np.testing.assert_allclose(dx, conv.col2im(dz @ wt.reshape(-1, 4).T, shape, k),
                               rtol=TOL[dtype], atol=TOL[dtype])


@pytest.mark.parametrize("c", [1, 3])
def test_im2col_is_every_padded_window_in_row_column_channel_order(c):
    # written out from the definition, for the tap-by-tap copy (one channel)
    # and the strided one alike
    x = np.random.default_rng(6).standard_normal((2, 5, 4, c)).astype(np.float32)
    k, p = 3, 1
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    want = np.array([xp[e, r:r + k, s:s + k, :].ravel()
                     for e in range(2) for r in range(5) for s in range(4)])
    cols = conv.im2col(x, k)
    assert cols.shape == want.shape and cols.dtype == np.float32
    np.testing.assert_array_equal(cols, want)


@pytest.mark.parametrize("c", [2, conv.FEW_CHANNELS + 1])
def test_the_passes_in_chunks_are_the_passes_in_one(monkeypatch, c):
    # several chunks of images, the last one short: the same z, cols and dx
    x, wt, b = case(7, n=5, h=4, w=3, c=c, k=3, out=3, dtype=np.float32)
    dz = np.random.default_rng(7).standard_normal((5 * 4 * 3, 3)).astype(np.float32)
    z1, cols1 = conv.conv_forward(x, wt, b)
    dx1 = conv.conv_input_grad(dz, wt, x.shape)
    monkeypatch.setattr(conv, "CHUNK_BYTES", 2 * 4 * 3 * 9 * c * 4)  # two images a chunk
    z2, cols2 = conv.conv_forward(x, wt, b)
    np.testing.assert_array_equal(cols1, cols2)
    np.testing.assert_allclose(z1, z2, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(conv.conv_input_grad(dz, wt, x.shape), dx1, rtol=1e-6,
                               atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_is_kept(dtype):
    x, wt, b = case(1, dtype=dtype)
    z, cols = conv.conv_forward(x, wt, b)
    dz = np.ones_like(z)
    dw, db = conv.conv_weight_grads(cols, dz, x.shape[0])
    dx = conv.conv_input_grad(dz, wt, x.shape)
    out, idx = conv.pool_forward(z.reshape(2, 5, 4, 2))
    back = conv.pool_backward(out, idx, (2, 5, 4, 2))
    assert {a.dtype for a in (z, cols, dw, db, dx, out, back)} == {np.dtype(dtype)}
    assert np.issubdtype(idx.dtype, np.integer)
    np.testing.assert_allclose(db, dz.sum(axis=0) / 2, rtol=1e-6)
    assert conv.init_conv(np.random.default_rng(0), 3, 2, 4, dtype)[0].dtype == dtype


def test_gradients_are_finite_differences_of_the_batch_mean_loss():
    # L = mean over examples of sum(g_i * z_i): per-example dz_i = g_i, and the
    # parameter gradients are of L; dx is per example (n * dL/dx).
    x, wt, b = case(2, n=3, h=4, w=5, c=2, k=3, out=3)
    n = x.shape[0]
    g = np.random.default_rng(3).standard_normal((n * 4 * 5, 3))

    def loss():
        z, _ = conv.conv_forward(x, wt, b)
        return float(np.sum(g * z) / n)

    _, cols = conv.conv_forward(x, wt, b)
    dw, db = conv.conv_weight_grads(cols, g, n)
    np.testing.assert_allclose(dw.reshape(wt.shape), numeric_grad(loss, wt), rtol=1e-6,
                               atol=1e-9)
    np.testing.assert_allclose(db, numeric_grad(loss, b), rtol=1e-6, atol=1e-9)
    dx = conv.conv_input_grad(g, wt, x.shape)
    np.testing.assert_allclose(dx, n * numeric_grad(loss, x), rtol=1e-6, atol=1e-8)


def test_col2im_is_the_adjoint_of_im2col():
    # <im2col(x), c> == <x, col2im(c)> for every x and c: the backward pass
    # is the transpose of the forward one.
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 6, 5, 3))
    c = rng.standard_normal((2 * 6 * 5, 5 * 5 * 3))
    assert np.vdot(conv.im2col(x, 5), c) == pytest.approx(
        np.vdot(x, conv.col2im(c, x.shape, 5)), rel=1e-12)


@pytest.mark.parametrize("shape", [(2, 4, 6, 3), (1, 7, 5, 2)])  # odd edges are dropped
def test_pool_is_the_loop_written_max_and_routes_the_gradient_to_each_argmax(shape):
    rng = np.random.default_rng(5)
    a = rng.permutation(np.prod(shape)).reshape(shape) / np.prod(shape)  # no ties
    out, idx = conv.pool_forward(a)
    np.testing.assert_array_equal(out, loop_pool(a))
    g = rng.standard_normal(out.shape)

    def loss():
        return float(np.sum(g * conv.pool_forward(a)[0]))

    np.testing.assert_allclose(conv.pool_backward(g, idx, shape), numeric_grad(loss, a),
                               rtol=1e-6, atol=1e-9)


def test_a_tie_sends_the_gradient_to_the_first_maximum_only():
    a = np.zeros((1, 2, 2, 1))
    out, idx = conv.pool_forward(a)
    back = conv.pool_backward(np.ones_like(out), idx, a.shape)
    assert back[0, :, :, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 8, 6, 5), (2, 7, 5, 3)])
def test_pool_is_exact_with_ties_in_both_dtypes(shape, dtype):
    # after a ReLU most windows tie at zero; the index is np.argmax's
    rng = np.random.default_rng(8)
    a = np.maximum(rng.standard_normal(shape), 0).astype(dtype)
    a[0, :2, :2, 0] = 1.5  # a window of four equal maxima
    out, idx = conv.pool_forward(a)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out, loop_pool(a))
    g = rng.standard_normal(out.shape).astype(dtype)
    want_idx, want_back = loop_pool_routes(a, g)
    np.testing.assert_array_equal(idx, want_idx)
    back = conv.pool_backward(g, idx, shape)
    assert back.dtype == dtype
    np.testing.assert_array_equal(back, want_back)
    assert not np.signbit(back[back == 0]).any()  # +0.0 where nothing is sent


def test_pool_with_nan_and_inf_is_what_argmax_and_max_give():
    a = np.zeros((1, 4, 4, 1))
    a[0, 0, 1, 0] = a[0, 1, 0, 0] = np.nan          # window 0: the first NaN is 1
    a[0, 1, 3, 0] = np.nan                         # window 1: its only NaN, 3
    a[0, 2, 2, 0], a[0, 3, 3, 0] = np.inf, np.inf  # window 3: the first inf, 0
    out, idx = conv.pool_forward(a)
    np.testing.assert_array_equal(out[0, :, :, 0], [[np.nan, np.nan], [0.0, np.inf]])
    assert idx[0, :, :, 0].tolist() == [[1, 3], [0, 0]]
    # an inf or NaN gradient goes to its argmax alone; the other pixels get +0.0
    g = np.array([np.inf, np.nan, -0.0, -2.0]).reshape(1, 2, 2, 1)
    back = conv.pool_backward(g, idx, a.shape)
    _, want = loop_pool_routes(a, g)
    np.testing.assert_array_equal(back.view(np.uint64), want.view(np.uint64))  # bit for bit
