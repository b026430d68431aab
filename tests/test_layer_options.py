"""Tests for the layer options: batch norm in a hidden layer, the softmax
output, Adam through a layer, float32, and when a layer hands its output and
input gradient on. References are written here: central finite differences,
hand-written softmax/batch-norm/Adam, hand-computed statistics."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.layers.common import Chance
from pipeline.layers.output import OutputLayer
from tests.numeric import numeric_grad, ref_act
from tests.test_layers import LABELS, N, batch, bce
from tests.kit import hidden_layer

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-8
B, FAN_IN, WIDTH, CLASSES = 6, 4, 3, 3


def ce(z: np.ndarray, labels: np.ndarray) -> float:
    """Batch-mean softmax cross-entropy, written out (inputs are small: no shift)."""
    return float(np.mean(np.log(np.exp(z).sum(axis=1)) - z[np.arange(len(z)), labels]))


def ref_softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def onehot(labels: np.ndarray) -> np.ndarray:
    return np.eye(CLASSES)[labels]


# --- 2. batch norm in a hidden layer --------------------------------------------------------

def ref_bn_hidden(x, w, b, gamma, beta, act):
    z = x @ w + b
    mu = z.mean(axis=0)
    var = ((z - mu) ** 2).mean(axis=0)
    return ref_act(act, gamma * (z - mu) / np.sqrt(var + 1e-5) + beta)


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_batchnorm_backprop_matches_finite_differences(act):
    lr = 0.1
    layer = hidden_layer(1, FAN_IN, WIDTH, mode="backprop", activation=act, lr=lr, sg_lr=0.0,
                        label_dim=0, rng=np.random.default_rng(0), batchnorm=True)
    assert set(layer.weights()) == {"w", "b", "gamma", "beta", "bn_mean", "bn_var"}
    live = layer.weights()
    rng = np.random.default_rng(4)
    live["gamma"][...] = rng.uniform(0.5, 2.0, WIDTH)
    live["beta"][...] = rng.standard_normal(WIDTH)
    live["b"][...] = rng.standard_normal(WIDTH)
    p = {k: live[k].copy() for k in ("w", "b", "gamma", "beta")}
    while True:  # the batch-normed pre-activation must stay off the ReLU kink
        x = 2.0 * rng.standard_normal((B, FAN_IN))
        z = x @ p["w"] + p["b"]
        u = p["gamma"] * (z - z.mean(0)) / np.sqrt(z.var(0) + 1e-5) + p["beta"]
        if np.min(np.abs(u)) > 1e-3:
            break
    dh = rng.standard_normal((B, WIDTH))

    def loss():
        return np.sum(dh * ref_bn_hidden(x, p["w"], p["b"], p["gamma"], p["beta"], act)) / B

    want = {k: numeric_grad(loss, p[k]) for k in p}
    want_dx = B * numeric_grad(loss, x)

    h, dx = layer.forward(0, x, None, need_dx=True)
    assert dx is None
    np.testing.assert_allclose(h, ref_bn_hidden(x, *p.values(), act), rtol=1e-12, atol=1e-14)
    # running statistics after one batch, from mean 0 and var 1, momentum 0.1
    np.testing.assert_allclose(live["bn_mean"], 0.1 * z.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(live["bn_var"], 0.9 + 0.1 * z.var(0, ddof=1), rtol=1e-12)
    assert layer.receive(0, dh)
    [a] = layer.apply_ready(need_dx=True)
    for k in p:
        np.testing.assert_allclose((p[k] - live[k]) / lr, want[k], rtol=RTOL, atol=ATOL,
                                   err_msg=k)
    np.testing.assert_allclose(a.dx, want_dx, rtol=RTOL, atol=ATOL)
    assert np.abs(want_dx).max() > 1e-3

    # evaluation normalises with the running statistics, not the batch's, and tracks nothing
    x2 = rng.standard_normal((B, FAN_IN))
    stats = live["bn_mean"].copy(), live["bn_var"].copy()
    u2 = ((x2 @ live["w"] + live["b"] - stats[0]) / np.sqrt(stats[1] + 1e-5) * live["gamma"]
          + live["beta"])
    np.testing.assert_allclose(layer.forward_eval(x2), ref_act(act, u2), rtol=1e-12,
                               atol=1e-14)
    assert np.array_equal(live["bn_mean"], stats[0]) and np.array_equal(live["bn_var"], stats[1])


# --- 3. and 4. the softmax output, with SGD and with Adam --------------------------------

def test_softmax_output_step_is_finite_difference_gradient_of_ce():
    lr = 0.4
    out = OutputLayer(2, WIDTH, CLASSES, lr=lr, rng=np.random.default_rng(5), softmax=True)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((B, WIDTH))
    labels = rng.integers(0, CLASSES, B)
    w, b = out.w.copy(), out.b.copy()

    def loss():
        return ce(x @ w + b, labels)

    loss0 = loss()
    g_w, g_b, g_x = numeric_grad(loss, w), numeric_grad(loss, b), numeric_grad(loss, x)
    want_correct = int(sum(np.argmax(x[i] @ w + b) == labels[i] for i in range(B)))

    ev_loss, ev_correct = out.evaluate(x, onehot(labels))
    assert np.array_equal(out.w, w) and np.array_equal(out.b, b)
    assert ev_loss == pytest.approx(loss0, rel=1e-12) and ev_correct == want_correct
    dx, got_loss, correct = out.train_step(x, onehot(labels), need_dx=True)
    assert got_loss == pytest.approx(loss0, rel=1e-12) and correct == want_correct
    np.testing.assert_allclose((w - out.w) / lr, g_w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b - out.b) / lr, g_b, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, B * g_x, rtol=RTOL, atol=ATOL)


def test_adam_through_the_output_layer_two_steps_by_hand():
    lr, b1, b2, eps = 0.01, 0.9, 0.999, 1e-8
    out = OutputLayer(2, WIDTH, CLASSES, lr=lr, rng=np.random.default_rng(7),
                      optimizer="adam", softmax=True)
    params = {"w": out.w.copy(), "b": out.b.copy()}
    m = {k: np.zeros_like(v) for k, v in params.items()}
    v = {k: np.zeros_like(v) for k, v in params.items()}
    rng = np.random.default_rng(8)
    for t in (1, 2):
        x = rng.standard_normal((B, WIDTH))
        y = onehot(rng.integers(0, CLASSES, B))
        dz = ref_softmax(x @ params["w"] + params["b"]) - y
        grads = {"w": x.T @ dz / B, "b": dz.mean(axis=0)}
        for k in params:
            m[k] = b1 * m[k] + (1 - b1) * grads[k]
            v[k] = b2 * v[k] + (1 - b2) * grads[k] ** 2
            m_hat, v_hat = m[k] / (1 - b1 ** t), v[k] / (1 - b2 ** t)
            params[k] = params[k] - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.train_step(x, y, need_dx=False)
        np.testing.assert_allclose(out.w, params["w"], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(out.b, params["b"], rtol=1e-12, atol=1e-14)
    assert out.step == 2


# --- 5. float32 end to end ------------------------------------------------------------------

def test_float32_layers_stay_float32():
    f32 = np.float32
    layer = hidden_layer(1, FAN_IN, 5, mode="cdni", activation="relu", lr=0.01, sg_lr=0.01,
                        label_dim=CLASSES, rng=np.random.default_rng(0), dtype=f32,
                        optimizer="adam", sg_hidden=(8,), batchnorm=True)
    out = OutputLayer(2, 5, CLASSES, lr=0.01, rng=np.random.default_rng(1), dtype=f32,
                      optimizer="adam", softmax=True)
    rng = np.random.default_rng(9)
    before = {k: a.copy() for k, a in layer.weights().items()}
    for t in range(4):
        x = rng.standard_normal((B, FAN_IN)).astype(f32)
        y = onehot(rng.integers(0, CLASSES, B)).astype(f32)
        h, dx = layer.forward(t, x, y, need_dx=True)
        assert h.dtype == f32 and dx.dtype == f32
        grad, loss, _ = out.train_step(h, y, need_dx=True)
        assert grad.dtype == f32 and np.isfinite(loss)
        assert layer.receive(t, grad)
        [a] = layer.apply_ready(need_dx=True)
        assert np.isfinite(a.sg_loss)
        assert layer.forward_eval(x).dtype == f32
    for owner in (layer, out):
        for k, a in owner.weights().items():
            assert a.dtype == f32, (owner, k)
    for k, a in layer.weights().items():  # every array took part
        assert not np.array_equal(a, before[k]), k
    for opt in (layer.opt, layer.sg.opt, out.opt):
        for slot in opt.slots.values():
            assert slot.m.dtype == f32 and slot.v.dtype == f32


# --- 6. what a layer hands out, and when ------------------------------------------------

@pytest.mark.parametrize("mode", ["dni", "backprop"])
def test_activations_and_input_gradients_are_handed_out_before_the_update(mode):
    """A step's phases give h first, then dx, while the weights are still the
    ones the forward pass used (a node sends each as it comes); both equal
    what the whole step gives on a twin layer."""
    rng = np.random.default_rng(40)

    def make():
        layer = hidden_layer(2, 5, 4, mode=mode, activation="sigmoid", lr=0.5, sg_lr=0.1,
                             label_dim=3, rng=np.random.default_rng(1))
        if layer.sg is not None:  # a non-zero SG: W moves
            layer.sg.v[...] = np.random.default_rng(41).standard_normal(layer.sg.v.shape)
        return layer

    layer, twin = make(), make()
    w0 = layer.w.copy()
    seen = []
    x, y = rng.standard_normal((6, 5)), np.eye(3)[rng.integers(0, 3, 6)]
    h = layer.begin(0, x, y)
    seen.append(("h", h, layer.w.copy()))
    if mode == "backprop":
        grad = rng.standard_normal((6, 4))
        assert layer.receive(0, grad) and layer.next_due() == 0
        dx = layer.backward_dx(0, need_dx=True)
        seen.append(("dx", dx, layer.w.copy()))
        layer.apply(0, dx=dx)
        want_h, _ = twin.forward(0, x, y, need_dx=True)
        twin.receive(0, grad)
        [applied] = twin.apply_ready(need_dx=True)
        want_dx = applied.dx
    else:
        dx = layer.synthetic_dx(need_dx=True)
        seen.append(("dx", dx, layer.w.copy()))
        layer.end()
        want_h, want_dx = twin.forward(0, x, y, need_dx=True)
    assert [s[0] for s in seen] == ["h", "dx"]
    assert np.array_equal(h, want_h) and np.array_equal(dx, want_dx)
    for _, _, w in seen:
        np.testing.assert_array_equal(w, w0)      # handed out before the update
    assert not np.array_equal(layer.w, w0)        # and the update did happen
    np.testing.assert_array_equal(layer.w, twin.w)


# --- the sigmoid output layer (the addition task) -------------------------------------------------------------------------

def test_output_train_step_is_finite_difference_gradient_of_bce():
    out = OutputLayer(3, WIDTH, LABELS, lr=0.4, rng=np.random.default_rng(8))
    rng = np.random.default_rng(9)
    x = rng.standard_normal((N, WIDTH))
    y = (rng.uniform(size=(N, LABELS)) > 0.5).astype(np.float64)
    w, b = out.w.copy(), out.b.copy()

    def loss():
        return bce(x @ w + b, y)

    loss0 = loss()
    g_w, g_b, g_x = numeric_grad(loss, w), numeric_grad(loss, b), numeric_grad(loss, x)
    p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
    want_correct = sum(all((p[i] > 0.5) == (y[i] == 1)) for i in range(N))

    ev_loss, ev_correct = out.evaluate(x, y)
    np.testing.assert_array_equal(out.w, w)  # evaluation leaves the weights alone
    assert ev_loss == pytest.approx(loss0, rel=1e-12) and ev_correct == want_correct

    dx, got_loss, correct = out.train_step(x, y, need_dx=True)
    assert got_loss == pytest.approx(loss0, rel=1e-12)
    assert correct == want_correct
    np.testing.assert_allclose((w - out.w) / 0.4, g_w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b - out.b) / 0.4, g_b, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, N * g_x, rtol=RTOL, atol=ATOL)
    assert out.train_step(x, y, need_dx=False)[0] is None


def test_output_stats_and_zero_staleness():
    out = OutputLayer(2, WIDTH, LABELS, lr=0.1, rng=np.random.default_rng(0))
    _, y = batch(0)
    x = np.random.default_rng(1).standard_normal((N, WIDTH))
    for _ in range(4):
        out.train_step(x, y, need_dx=True)
    assert out.step == 4 and out.clock == 4
    assert out.stats.as_dict() == {
        "forward_batches": 4, "weight_updates": 4, "skipped_updates": 0, "sg_updates": 0,
        "true_gradients": 4, "dropped_gradients": 0, "lost_gradients": 0,
        "expired_gradients": 0, "staleness_steps": {"mean": 0.0, "max": 0, "count": 4},
        "staleness_hist": {"0": 4}, "staleness_s": {"mean": 0.0, "max": 0.0},
        "sg_quality": None}
    assert set(out.weights()) == {"w", "b"}


def test_output_update_prob_zero_keeps_weights_but_sends_the_gradient():
    out = OutputLayer(2, WIDTH, LABELS, lr=0.1, rng=np.random.default_rng(0),
                      update=Chance(0.0, np.random.default_rng(1)))
    _, y = batch(0)
    x = np.random.default_rng(1).standard_normal((N, WIDTH))
    w, b = out.w.copy(), out.b.copy()
    for _ in range(3):
        dx, _, _ = out.train_step(x, y, need_dx=True)
        p = 1.0 / (1.0 + np.exp(-(x @ w + b)))
        np.testing.assert_allclose(dx, (p - y) @ w.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_array_equal(out.w, w)
    np.testing.assert_array_equal(out.b, b)
    assert (out.step, out.clock, out.stats.weight_updates, out.stats.skipped_updates) == \
        (0, 3, 0, 3)
