"""The convolutional layer and its SG module, checked against independent
references: loop-written convolution, batch norm and pooling for the
forward pass, central finite differences for every gradient."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.layers.common import Chance, LayerSpec, mode_of
from pipeline.layers.conv import WEIGHT_RATE, ConvLayer, ConvSG
from tests.numeric import numeric_grad
from tests.test_conv import loop_conv


def conv_layer(mode: str = "backprop", norm: str = "batch", shape=(6, 6, 2), channels=3,
               kernel=3, dtype=np.float64, optimizer="sgd", lr=1.0, seed=0) -> ConvLayer:
    spec = LayerSpec(activation="relu", norm=norm, dtype=np.dtype(dtype), optimizer=optimizer,
                     lr=lr)
    rng = np.random.default_rng(seed)
    return ConvLayer(1, shape, channels, kernel, spec=spec, mode=mode_of(mode, sg_lr=lr),
                     label_dim=4, rng=rng, update=Chance(1.0, rng))


def loops_forward(x, w, b, gamma, beta, batchnorm: bool, eps=1e-5):
    """Convolution, batch norm over (N, H, W), ReLU and 2x2 max-pool, every
    step a plain loop or sum: the reference the layer is checked against."""
    n, hh, ww, _ = x.shape
    out = w.shape[3]
    z = loop_conv(x, w, b)
    if batchnorm:
        for o in range(out):
            m = z[..., o].mean()
            v = ((z[..., o] - m) ** 2).mean()
            z[..., o] = gamma[o] * (z[..., o] - m) / np.sqrt(v + eps) + beta[o]
    a = np.maximum(z, 0)
    h = np.zeros((n, hh // 2, ww // 2, out))
    for r in range(hh // 2):
        for s in range(ww // 2):
            h[:, r, s, :] = a[:, 2 * r:2 * r + 2, 2 * s:2 * s + 2, :].max(axis=(1, 2))
    return h


@pytest.mark.parametrize("norm", ["batch", ""])
def test_forward_is_the_loop_written_conv_norm_relu_pool(norm):
    layer = conv_layer(norm=norm, shape=(7, 6, 2))   # an odd height: the last row is dropped
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 6, 2))
    if norm:
        layer.norm[0][...] = rng.uniform(0.5, 1.5, 3)
        layer.norm[1][...] = rng.standard_normal(3) * 0.1
    gamma, beta = (layer.norm[:2] if norm else (None, None))
    h = layer.begin(0, x.reshape(3, -1), None)     # the source's rows are taken as images
    assert h.shape == (3, 3, 3, 3)
    want = loops_forward(x, layer.w, layer.b, gamma, beta, bool(norm))
    np.testing.assert_allclose(h, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("norm", ["batch", ""])
def test_true_gradient_step_matches_finite_differences(norm):
    """Backprop mode, SGD at lr 1: the update is minus the gradient of the
    batch-mean loss L = mean_i <h_i, R_i>, and the dx sent up is the
    per-example gradient N * dL/dx (batch norm couples the examples)."""
    layer = conv_layer(norm=norm)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 6, 6, 2))
    r = rng.standard_normal((3, 3, 3, 3))
    n = x.shape[0]
    probe = conv_layer(norm=norm)   # the same weights, for the loss alone

    def loss():
        h, _ = probe._forward(x, train=True, track=False)
        return float(np.sum(h * r) / n)

    params = probe._trainable()
    want = {name: numeric_grad(loss, a) for name, a in params.items()}
    want_dx = numeric_grad(loss, x) * n
    before = {name: a.copy() for name, a in layer._trainable().items()}
    layer.begin(0, x, None)
    layer.receive(0, r)
    dx = layer.backward_dx(0, need_dx=True)
    layer.apply(0, dx=dx)
    for name, a in layer._trainable().items():
        np.testing.assert_allclose(before[name] - a, want[name], rtol=1e-6, atol=1e-8,
                                   err_msg=name)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-6, atol=1e-8)


def test_sg_module_learns_by_the_gradient_of_its_regression_loss():
    """SGD at lr 1: each table steps by minus its gradient of the loss
    0.5 * mean_i ||pred_i - target_i||^2, the convolution's weights by
    WEIGHT_RATE times theirs."""
    rng = np.random.default_rng(3)
    sg = ConvSG((3, 4, 2), labels=4, dtype=np.float64, optimizer="sgd", lr=1.0)
    for a in sg.params().values():
        a[...] = rng.standard_normal(a.shape) * 0.3
    h = rng.standard_normal((5, 3, 4, 2))
    y = np.eye(4)[rng.integers(0, 4, 5)]
    target = rng.standard_normal((5, 3, 4, 2))
    inp = sg.inputs(h, y)

    def loss():
        pred, _ = sg.predict(inp)
        return float(0.5 * np.sum((pred - target) ** 2) / 5)

    want = {name: numeric_grad(loss, a) for name, a in sg.params().items()}
    before = {name: a.copy() for name, a in sg.params().items()}
    expected_loss = loss()
    pred, acts = sg.predict(inp)
    assert sg.train(acts, pred, target) == pytest.approx(expected_loss, rel=1e-12)
    rate = {"sg_v": WEIGHT_RATE}
    for name, a in sg.params().items():
        np.testing.assert_allclose(before[name] - a, rate.get(name, 1.0) * want[name],
                                   rtol=1e-6, atol=1e-9, err_msg=name)
    assert sg.version == 1


def test_sg_module_starts_at_zero_and_reads_the_label_planes():
    sg = ConvSG((2, 2, 3), labels=4, dtype=np.float32, optimizer="adam", lr=1e-3)
    h = np.ones((2, 2, 2, 3), np.float32)
    y = np.eye(4, dtype=np.float32)[[2, 0]]
    inp = sg.inputs(h, y)
    assert inp.shape == (2, 2, 2, 7) and inp.dtype == np.float32
    assert np.array_equal(inp[..., 3:], np.broadcast_to(y[:, None, None, :], (2, 2, 2, 4)))
    pred, _ = sg.predict(inp)
    assert not pred.any()                        # zero-initialised, as the paper's modules
    sg.maps[2] = np.arange(12)                   # label 2's map alone
    pred, _ = sg.predict(inp)
    assert np.array_equal(pred[0].ravel(), np.arange(12, dtype=np.float32))
    assert not pred[1].any()
    unconditioned = ConvSG((2, 2, 3), labels=0, dtype=np.float32, optimizer="sgd", lr=0.1)
    assert unconditioned.inputs(h, None) is h and "sg_l" not in unconditioned.params()


@pytest.mark.parametrize("mode", ["cdni", "dni"])
def test_a_synthetic_step_updates_with_the_modules_prediction(mode):
    """DNI: with a module that predicts R for every example (its position
    bias), the layer's step is the true-gradient step for dh = R."""
    layer = conv_layer(mode=mode)
    true = conv_layer(mode="backprop")
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 6, 6, 2))
    r = rng.standard_normal((3, 3, 3))
    layer.sg.c[...] = r
    y = np.eye(4)[[0, 1, 2]]
    h, dx = layer.forward(0, x, y, need_dx=True)
    true.begin(0, x, None)
    true.receive(0, np.broadcast_to(r, h.shape).copy())
    want_dx = true.backward_dx(0, need_dx=True)
    true.apply(0, dx=want_dx)
    np.testing.assert_allclose(dx, want_dx, rtol=1e-12, atol=1e-13)
    for name, a in true._trainable().items():
        np.testing.assert_allclose(layer._trainable()[name], a, rtol=1e-12, atol=1e-13)


def test_float32_in_float32_out():
    layer = conv_layer(mode="cdni", dtype=np.float32, optimizer="adam", lr=1e-3)
    x = np.random.default_rng(5).standard_normal((2, 72)).astype(np.float32)
    h, dx = layer.forward(0, x, np.eye(4, dtype=np.float32)[[1, 3]], need_dx=True)
    assert h.dtype == dx.dtype == np.float32 and dx.shape == x.shape
    assert all(a.dtype == np.float32 for a in layer.weights().values())


def test_layer_norm_is_refused():
    with pytest.raises(ValueError, match="per channel"):
        conv_layer(norm="layer")


def test_the_memory_estimate_counts_the_im2col_rows():
    """A convolutional layer's estimate grows with the kernel's area (its
    im2col rows), a dense layer's of the same widths does not."""
    from pipeline import limits
    from pipeline.config import Config
    base = dict(dataset="mnist", data_dir="d", features=784, classes=10, examples=1000,
                image=(28, 28, 1), layers=3, hidden=(), batch_size=256, mode="cdni")
    small = limits._layer_bytes(Config(**base, conv=(16, 32), kernel=1), 2)
    large = limits._layer_bytes(Config(**base, conv=(16, 32), kernel=9), 2)
    rows = 256 * 14 * 14 * 16 * (81 - 1) * 4       # the extra im2col numbers of one step
    assert large - small >= rows
