"""Convolution and max-pooling as pure numpy functions, with the conventions of ``nn``.

* images are channels-last batches ``(N, H, W, C)``: a convolution's output
  as a matrix ``(N*H*W, K)`` is then a dense layer's output over pixel rows,
  so batch norm per channel is ``batchnorm`` over those rows, unchanged;
* a k x k same-padded convolution with stride 1 is im2col and one matmul:
  every k x k x C window of the padded input is a row of ``cols``
  ``(N*H*W, k*k*C)``, and the weights ``(k, k, C, K)`` are a dense layer's
  ``(k*k*C, K)``;
* the input gradient is one matmul per tap (k*k of them, ``(N*H*W, K)`` by
  ``(K, C)``; with few channels one for all taps, channel-major) and k*k
  shifted adds of whole images, not col2im: col2im's adds move C numbers at
  a time, these move a whole image row;
* as for dense layers, the gradient passed in is per example (``dl_i/dz_i``)
  and the parameter gradients are of the batch-mean loss (divided by N
  examples, not by N*H*W pixels);
* dtype preserving: float32 in gives float32 out.

What each pass costs against plain matmuls, and the forms compared:
``docs/performance.md`` ("Convolution", ``python bench/conv_speed.py``).
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

POOL = 2  # max-pooling window and stride
# conv_forward and conv_input_grad go a chunk of images at a time, so that
# each chunk of cols (or of the input gradient's taps) is read back from the
# cache rather than from memory.
CHUNK_BYTES = 2 << 20
# Below this many input channels the input gradient is one matmul for all
# taps, from this many one matmul per tap (docs/performance.md, "Convolution").
FEW_CHANNELS = 8


def init_conv(rng: np.random.Generator, k: int, c_in: int, c_out: int,
              dtype: np.dtype = np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Weights ``(k, k, c_in, c_out)`` scaled by 1/sqrt(fan-in), as
    ``nn.init_dense`` scales a dense layer's; bias zero."""
    fan_in = k * k * c_in
    w = rng.standard_normal((k, k, c_in, c_out)) / np.sqrt(fan_in)
    return w.astype(dtype), np.zeros(c_out, dtype=dtype)


def _windows(x: np.ndarray, k: int) -> np.ndarray:
    """The strided view ``(N, H, W, k, k, C)`` of every zero-padded k x k window."""
    p = k // 2
    xp = np.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    return sliding_window_view(xp, (k, k), axis=(1, 2)).transpose(0, 1, 2, 4, 5, 3)


def im2col(x: np.ndarray, k: int) -> np.ndarray:
    """``(N, H, W, C)`` -> ``(N*H*W, k*k*C)``: each row the k x k window,
    zero-padded by k // 2, centred on one pixel, in (row, column, channel)
    order (one copy, through a strided view).

    With one channel the copy goes tap by tap into the transposed layout
    (each tap a contiguous shifted image) and the result is its transpose, a
    Fortran-ordered view: a row-major copy would move one number at a time.
    """
    n, h, w, c = x.shape
    if c == 1:
        p = k // 2
        xp = np.pad(x[..., 0], ((0, 0), (p, p), (p, p)))
        taps = np.empty((k, k, n, h, w), dtype=x.dtype)
        for i in range(k):
            for j in range(k):
                taps[i, j] = xp[:, i:i + h, j:j + w]
        return taps.reshape(k * k, n * h * w).T
    return _windows(x, k).reshape(n * h * w, k * k * c)


def col2im(dcols: np.ndarray, shape: tuple[int, int, int, int], k: int) -> np.ndarray:
    """The adjoint of ``im2col``: each row's gradient added back onto the
    pixels its window covered; ``shape`` (N, H, W, C) of the input."""
    n, h, w, c = shape
    p = k // 2
    d = dcols.reshape(n, h, w, k, k, c)
    dxp = np.zeros((n, h + 2 * p, w + 2 * p, c), dtype=dcols.dtype)
    for i in range(k):          # k*k adds of whole (N, H, W, C) blocks
        for j in range(k):
            dxp[:, i:i + h, j:j + w, :] += d[:, :, :, i, j, :]
    return dxp[:, p:p + h, p:p + w, :]


def _add_bias(z: np.ndarray, b: np.ndarray, width: int) -> None:
    """z ``(N*H*W, K)`` += b in place, over rows of ``width`` pixels (W*K
    numbers each) rather than pixel by pixel (K each): longer inner loops."""
    rows = z.reshape(-1, width * b.shape[0])
    np.add(rows, np.tile(b, width), out=rows)


def conv_forward(x: np.ndarray, w: np.ndarray, b: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """z = conv(x, w) + b, same padding, stride 1: ``(N, H, W, C)`` with
    ``w (k, k, C, K)`` -> (z as rows ``(N*H*W, K)``, cols for the backward pass)."""
    n, h, wd, _ = x.shape
    k, _, c, out = w.shape
    wm = w.reshape(k * k * c, out)
    if c == 1:
        cols = im2col(x, k)
        z = cols @ wm
        _add_bias(z, b, wd)
        return z, cols
    win = _windows(x, k)
    cols = np.empty(win.shape, dtype=x.dtype)
    z = np.empty((n * h * wd, out), dtype=np.result_type(x.dtype, w.dtype))
    step = max(1, CHUNK_BYTES // (h * wd * k * k * c * cols.itemsize or 1))  # images
    for s in range(0, n, step):
        e = min(n, s + step)
        cols[s:e] = win[s:e]
        zs = z[s * h * wd:e * h * wd]
        np.matmul(cols[s:e].reshape(-1, k * k * c), wm, out=zs)
        _add_bias(zs, b, wd)
    return z, cols.reshape(n * h * wd, k * k * c)


def conv_weight_grads(cols: np.ndarray, dz: np.ndarray, examples: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(dW as ``(k*k*C, K)``, db) of the batch-mean loss from per-example
    ``dz`` rows ``(N*H*W, K)``; reshape dW to the weights' shape."""
    dw = cols.T @ dz
    dw /= examples
    # A sum over many short rows: numpy's sum over axis 0 runs one inner loop
    # of K numbers per row; as a matrix-vector product it is one BLAS pass.
    db = np.ones(dz.shape[0], dtype=dz.dtype) @ dz
    db /= examples
    return dw, db


def _add_taps(dxp: np.ndarray, taps: np.ndarray, axis: int) -> None:
    """dxp += each tap's block ``taps[i, j]`` shifted by (i, j) along dxp's
    padded height and width, which are its axes ``axis`` and ``axis + 1``."""
    k, h, w = taps.shape[0], taps.shape[2 + axis], taps.shape[3 + axis]
    for i in range(k):
        for j in range(k):
            dxp[(slice(None),) * axis + (slice(i, i + h), slice(j, j + w))] += taps[i, j]


def conv_input_grad(dz: np.ndarray, w: np.ndarray, shape: tuple[int, int, int, int]
                    ) -> np.ndarray:
    """Per-example dx ``(N, H, W, C)`` from dz rows ``(N*H*W, K)``, with the
    weights ``w`` as they are (before any update)."""
    n, h, wd, c = shape
    k, _, _, out = w.shape
    p = k // 2
    # taps[i, j]: what every output pixel (r, s) sends through tap (i, j) to
    # input pixel (r + i - p, s + j - p). With few channels, one matmul gives
    # them channel-major, (k, k, C, N, H, W): a matmul per tap with C columns
    # would run at a matrix-vector product's speed, reading dz once per tap.
    few = c < FEW_CHANNELS
    dxp = np.zeros((c, n, h + 2 * p, wd + 2 * p) if few else (n, h + 2 * p, wd + 2 * p, c),
                   dtype=np.result_type(dz.dtype, w.dtype))
    wm = w.reshape(k * k * c, out) if few else w.reshape(k * k, c, out).transpose(0, 2, 1)
    step = max(1, CHUNK_BYTES // (h * wd * k * k * c * dxp.itemsize or 1))  # images
    for s in range(0, n, step):
        e = min(n, s + step)
        d = dz[s * h * wd:e * h * wd]
        if few:
            _add_taps(dxp[:, s:e], (wm @ d.T).reshape(k, k, c, e - s, h, wd), 2)
        else:
            _add_taps(dxp[s:e], np.matmul(d, wm).reshape(k, k, e - s, h, wd, c), 1)
    if not few:
        return dxp[:, p:p + h, p:p + wd]
    dx = dxp[:, :, p:p + h, p:p + wd].transpose(1, 2, 3, 0)
    return dx if c == 1 else np.ascontiguousarray(dx)  # channels last again


def pooled(h: int, w: int) -> tuple[int, int]:
    """The size after a 2 x 2 max-pool of stride 2 (a last odd row or column is dropped)."""
    return h // POOL, w // POOL


def _quadrants(a: np.ndarray) -> list[np.ndarray]:
    """The four strided views ``(N, H//2, W//2, K)`` of each 2 x 2 window's
    top left, top right, bottom left, bottom right (row-major: 0..3)."""
    ho, wo = pooled(a.shape[1], a.shape[2])
    return [a[:, r:POOL * ho:POOL, s:POOL * wo:POOL] for r in range(POOL) for s in range(POOL)]


def pool_forward(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """2 x 2 max-pool, stride 2, of ``(N, H, W, K)``: (out ``(N, H//2, W//2, K)``,
    the argmax of each window in 0..3 as uint8, row-major; the first of tied
    maxima, and in a window holding NaN the first NaN, as ``np.argmax``)."""
    q = _quadrants(a)
    out = np.maximum(q[0], q[1])
    np.maximum(out, q[2], out=out)
    np.maximum(out, q[3], out=out)
    # The first quadrant equal to the max: 0 if q0 is, else 1 + (0 if q1 is,
    # else 1 + (0 if q2 is, else 1)).
    idx = (q[2] != out).astype(np.uint8)
    idx += 1
    idx *= q[1] != out
    idx += 1
    idx *= q[0] != out
    nan = np.isnan(out)
    if nan.any():  # NaN equals nothing: set those windows' index as argmax does
        for i in (3, 2, 1, 0):
            idx[nan & np.isnan(q[i])] = i
    return out, idx


def pool_backward(g: np.ndarray, idx: np.ndarray, shape: tuple[int, int, int, int]
                  ) -> np.ndarray:
    """The gradient at the pool's input ``shape`` (N, H, W, K): each window's
    gradient to its argmax, zero elsewhere (and on a dropped odd edge)."""
    h, w = shape[1], shape[2]
    out = np.zeros(shape, dtype=g.dtype) if h % POOL or w % POOL else np.empty(shape, g.dtype)
    # Selected as bit patterns, times 1 or 0 in integers: exactly g or +0.0
    # (a float product would turn an inf or NaN of g into NaN where it is not sent).
    bits = np.dtype(f"u{g.dtype.itemsize}")
    g_bits = g.view(bits)
    for i, quadrant in enumerate(_quadrants(out.view(bits))):
        np.multiply(g_bits, idx == i, out=quadrant)
    return out
