"""Tests for pipeline.nodes: layer updates against finite differences, SG training, staleness tables, counters."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import nn
from tests.numeric import EPS, numeric_grad, ref_act
from pipeline.nodes import HiddenLayer, OutputLayer
from pipeline.stats import Staleness

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9
FAN_IN, WIDTH, LABELS, N = 4, 5, 3, 6


def bce(logits: np.ndarray, y: np.ndarray) -> float:
    """Batch mean of the per-example summed BCE of sigmoid(logits)."""
    return float(np.mean(np.sum(np.logaddexp(0.0, logits) - y * logits, axis=1)))


def hidden(mode: str, act: str = "sigmoid", lr: float = 0.1, sg_lr: float = 0.05,
           seed: int = 0) -> HiddenLayer:
    return HiddenLayer(1, FAN_IN, WIDTH, mode=mode, activation=act, lr=lr, sg_lr=sg_lr,
                       label_dim=LABELS, rng=np.random.default_rng(seed))


def batch(seed: int, layer: HiddenLayer | None = None):
    """x (N, FAN_IN), binary y (N, LABELS); for relu, x is drawn again until no
    pre-activation of ``layer`` sits near the kink (finite differences need it)."""
    rng = np.random.default_rng(seed)
    while True:
        x = rng.standard_normal((N, FAN_IN))
        if layer is None or np.min(np.abs(x @ layer.w + layer.b)) > 1e-3:
            break
    y = (rng.uniform(size=(N, LABELS)) > 0.5).astype(np.float64)
    return x, y


# --- backprop mode ----------------------------------------------------------------------

@pytest.mark.parametrize("act", ["sigmoid", "relu"])
def test_backprop_update_is_finite_difference_gradient_of_network_loss(act):
    layer = hidden("backprop", act, lr=0.3)
    out = OutputLayer(2, WIDTH, LABELS, lr=0.2, rng=np.random.default_rng(1))
    x, y = batch(2, layer)
    w1, b1, w2, b2 = layer.w.copy(), layer.b.copy(), out.w.copy(), out.b.copy()

    def net_loss():
        return bce(ref_act(act, x @ w1 + b1) @ w2 + b2, y)

    loss0 = net_loss()
    g_w1, g_b1 = numeric_grad(net_loss, w1), numeric_grad(net_loss, b1)
    g_w2, g_b2 = numeric_grad(net_loss, w2), numeric_grad(net_loss, b2)
    g_x = numeric_grad(net_loss, x)

    h, dx = layer.forward(0, x, None, need_dx=True)
    assert dx is None  # backprop: the upstream gradient waits for the true one
    np.testing.assert_allclose(h, ref_act(act, x @ w1 + b1), rtol=1e-14, atol=1e-15)
    np.testing.assert_array_equal(layer.w, w1)  # no update before the gradient
    grad, loss, _ = out.train_step(h, y, need_dx=True)
    assert loss == pytest.approx(loss0, rel=1e-12)
    dx, sg_loss = layer.receive_gradient(0, grad, need_dx=True)
    assert sg_loss is None

    np.testing.assert_allclose((w1 - layer.w) / 0.3, g_w1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b1 - layer.b) / 0.3, g_b1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((w2 - out.w) / 0.2, g_w2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b2 - out.b) / 0.2, g_b2, rtol=RTOL, atol=ATOL)
    # per-example gradient: dl_i/dx_i = N * dL/dx_i
    np.testing.assert_allclose(dx, N * g_x, rtol=RTOL, atol=ATOL)
    assert layer.step == 1 and not layer.pending


def test_backprop_backward_without_dx_still_updates():
    layer = hidden("backprop")
    x, _ = batch(3)
    w0 = layer.w.copy()
    layer.forward(0, x, None, need_dx=False)
    dh = np.random.default_rng(4).standard_normal((N, WIDTH))
    assert layer.backward(0, dh, need_dx=False) is None
    assert not np.array_equal(layer.w, w0)


def test_backprop_layer_has_no_sg_module():
    layer = hidden("backprop")
    assert layer.v is None and layer.c is None and not layer.uses_sg
    assert set(layer.weights()) == {"w", "b"}


# --- output layer -------------------------------------------------------------------------

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


def test_output_counters_and_zero_staleness():
    out = OutputLayer(2, WIDTH, LABELS, lr=0.1, rng=np.random.default_rng(0))
    _, y = batch(0)
    x = np.random.default_rng(1).standard_normal((N, WIDTH))
    for _ in range(4):
        out.train_step(x, y, need_dx=True)
    assert out.step == 4
    assert out.counters.as_dict() == {
        "forward_batches": 4, "sg_updates": 0, "true_gradients": 4,
        "staleness_steps": {"mean": 0.0, "max": 0, "count": 4}}
    assert set(out.weights()) == {"w", "b"}


# --- DNI / cDNI forward ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_first_dni_forward_with_zero_sg_leaves_weights_and_sends_zero(mode):
    layer = hidden(mode)
    x, y = batch(5)
    w0, b0 = layer.w.copy(), layer.b.copy()
    want_sg_rows = WIDTH + (LABELS if mode == "cdni" else 0)
    assert layer.v.shape == (want_sg_rows, WIDTH) and layer.c.shape == (WIDTH,)
    assert not layer.v.any() and not layer.c.any()
    h, dx = layer.forward(0, x, y, need_dx=True)
    np.testing.assert_allclose(h, ref_act("sigmoid", x @ w0 + b0), rtol=1e-14)
    np.testing.assert_array_equal(layer.w, w0)
    np.testing.assert_array_equal(layer.b, b0)
    assert dx.shape == x.shape
    np.testing.assert_array_equal(dx, 0.0)
    assert layer.counters.forward_batches == 1
    assert set(layer.weights()) == {"w", "b", "sg_v", "sg_c"}


@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_dni_forward_update_is_finite_difference_of_synthetic_loss(mode, act):
    # With the SG prediction g fixed, the layer descends L(W, b) = mean_i <g_i, f(x_i W + b)>,
    # and sends dl_i/dx_i of the same surrogate upstream.
    layer = hidden(mode, act, lr=0.25)
    rng = np.random.default_rng(6)
    layer.v[...] = rng.standard_normal(layer.v.shape)
    layer.c[...] = rng.standard_normal(layer.c.shape)
    x, y = batch(7, layer)
    w, b = layer.w.copy(), layer.b.copy()
    h0 = ref_act(act, x @ w + b)
    sg_in = np.hstack([h0, y]) if mode == "cdni" else h0
    g = sg_in @ layer.v + layer.c  # the synthetic gradient, written here

    def surrogate():
        return float(np.sum(g * ref_act(act, x @ w + b)) / N)

    g_w, g_b, g_x = numeric_grad(surrogate, w), numeric_grad(surrogate, b), numeric_grad(surrogate, x)
    _, dx = layer.forward(0, x, y, need_dx=True)
    np.testing.assert_allclose((w - layer.w) / 0.25, g_w, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b - layer.b) / 0.25, g_b, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose(dx, N * g_x, rtol=RTOL, atol=ATOL)
    assert layer.step == 1


def test_dni_ignores_labels_and_cdni_uses_them():
    rng = np.random.default_rng(12)
    x, y = batch(13)
    flipped = 1.0 - y
    for mode, should_differ in (("dni", False), ("cdni", True)):
        a, b = hidden(mode), hidden(mode)  # same seed: same W
        a.v[...] = rng.standard_normal(a.v.shape)
        b.v[...] = a.v
        _, dx_a = a.forward(0, x, y, need_dx=True)
        _, dx_b = b.forward(0, x, flipped, need_dx=True)
        assert (not np.array_equal(dx_a, dx_b)) == should_differ, mode


# --- SG training ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_train_sg_regresses_towards_target(mode):
    layer = hidden(mode, lr=1e-3, sg_lr=0.05)
    rng = np.random.default_rng(20)
    layer.v[...] = 0.1 * rng.standard_normal(layer.v.shape)
    x, y = batch(21)
    target = rng.standard_normal((N, WIDTH))
    h, _ = layer.forward(0, x, y, need_dx=False)
    sg_in = np.hstack([h, y]) if mode == "cdni" else h
    v, c = layer.v.copy(), layer.c.copy()

    def sg_loss():
        return float(np.mean(0.5 * np.sum((sg_in @ v + c - target) ** 2, axis=1)))

    want_loss = sg_loss()
    g_v, g_c = numeric_grad(sg_loss, v), numeric_grad(sg_loss, c)
    got_loss = layer.train_sg(0, target)
    assert got_loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose((v - layer.v) / 0.05, g_v, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((c - layer.c) / 0.05, g_c, rtol=RTOL, atol=ATOL)
    v[...], c[...] = layer.v, layer.c
    assert sg_loss() < want_loss  # the same input now predicts closer to the target

    # Replaying the batch through the layer: the SG loss it reports strictly drops.
    losses = [got_loss]
    for t in range(1, 6):
        layer.forward(t, x, y, need_dx=False)
        losses.append(layer.train_sg(t, target))
    assert all(b < a for a, b in zip(losses, losses[1:])), losses


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_receive_gradient_in_dni_mode_trains_the_sg_module(mode):
    layer = hidden(mode)
    x, y = batch(22)
    layer.forward(0, x, y, need_dx=True)
    w, v = layer.w.copy(), layer.v.copy()
    target = np.random.default_rng(23).standard_normal((N, WIDTH))
    dx, loss = layer.receive_gradient(0, target, need_dx=True)
    assert dx is None  # DNI sent its gradient upstream at forward time
    # zero module: the loss is that of a zero prediction
    assert loss == pytest.approx(0.5 * np.sum(target ** 2) / N, rel=1e-12)
    np.testing.assert_array_equal(layer.w, w)  # the true gradient trains only the SG module
    assert not np.array_equal(layer.v, v)


def _fresh_prediction_checks(mode, order, monkeypatch):
    """Run ``order`` (("F"|"G", batch)); at every G check the loss against a
    prediction computed here from the module at arrival time, and count how
    often the layer called sg_predict inside train_sg."""
    layer = hidden(mode, lr=0.05, sg_lr=0.1)
    rng = np.random.default_rng(30)
    layer.v[...] = 0.1 * rng.standard_normal(layer.v.shape)
    inputs, sg_ins, targets, forward_pred = {}, {}, {}, {}
    calls = []
    real_predict = nn.sg_predict
    monkeypatch.setattr(nn, "sg_predict", lambda *a: calls.append(1) or real_predict(*a))
    recomputes = []
    for kind, t in order:
        if kind == "F":
            x, y = batch(100 + t)
            h, _ = layer.forward(t, x, y, need_dx=True)
            sg_ins[t] = np.hstack([h, y]) if mode == "cdni" else h
            forward_pred[t] = sg_ins[t] @ layer.v + layer.c
            targets[t] = rng.standard_normal((N, WIDTH))
        else:
            fresh = sg_ins[t] @ layer.v + layer.c
            want = float(np.mean(0.5 * np.sum((fresh - targets[t]) ** 2, axis=1)))
            want_v = layer.v - 0.1 * sg_ins[t].T @ (fresh - targets[t]) / N
            stale_changed = not np.allclose(fresh, forward_pred[t], rtol=1e-12, atol=0)
            calls.clear()
            got = layer.train_sg(t, targets[t])
            assert got == pytest.approx(want, rel=1e-12)
            np.testing.assert_allclose(layer.v, want_v, rtol=1e-12, atol=1e-15)
            recomputes.append((len(calls), stale_changed))
    return recomputes


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_sg_prediction_reused_when_module_unchanged(mode, monkeypatch):
    rec = _fresh_prediction_checks(mode, [("F", 0), ("G", 0), ("F", 1), ("G", 1)], monkeypatch)
    # the module did not change between each forward and its gradient
    assert rec == [(0, False), (0, False)]


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_sg_prediction_recomputed_when_module_changed(mode, monkeypatch):
    order = [("F", 0), ("F", 1), ("F", 2), ("G", 0), ("G", 1), ("F", 3), ("G", 3), ("G", 2)]
    rec = _fresh_prediction_checks(mode, order, monkeypatch)
    # versions: F0-F2 use 0; G0 sees 0 (reuse) -> 1; G1 sees 1 != 0 (recompute) -> 2;
    # F3 uses 2; G3 sees 2 (reuse) -> 3; G2 sees 3 != 0 (recompute)
    assert rec == [(0, False), (1, True), (0, False), (1, True)]


# --- staleness and counters -------------------------------------------------------------------

def run_events(layer: HiddenLayer, order: str) -> list[int]:
    """Events like "F0 F1 G0"; returns the staleness of each gradient, in arrival order."""
    got = []
    for ev in order.split():
        kind, t = ev[0], int(ev[1:])
        if kind == "F":
            x, y = batch(t)
            layer.forward(t, x, y, need_dx=True)
        else:
            before = layer.counters.staleness.total
            grad = np.random.default_rng(t).standard_normal((N, WIDTH)) * 1e-3
            layer.receive_gradient(t, grad, need_dx=True)
            got.append(layer.counters.staleness.total - before)
    return got


# DNI: each forward is an update step; a gradient counts the forwards since its own.
DNI_STALENESS = [
    ("F0 F1 F2 F3 G0 G1 G2 G3", [3, 2, 1, 0]),
    ("F0 G0 F1 G1 F2 G2", [0, 0, 0]),
    ("F0 F1 G0 F2 G1 G2 F3 G3", [1, 1, 0, 0]),
    ("F0 F1 F2 G2 G0 G1", [0, 2, 1]),
    ("F0 F1 G1 F2 F3 G0 G3 G2", [0, 3, 0, 1]),
]
# backprop: each true gradient is an update step; forwards are not.
BACKPROP_STALENESS = [
    ("F0 G0 F1 G1 F2 G2", [0, 0, 0]),
    ("F0 F1 G0 G1", [0, 1]),
    ("F0 F1 F2 G0 G1 G2", [0, 1, 2]),
    ("F0 F1 F2 G2 G1 G0", [0, 1, 2]),
    ("F0 F1 G0 F2 G2 G1", [0, 0, 2]),
]


@pytest.mark.parametrize("mode", ["dni", "cdni"])
@pytest.mark.parametrize("order, want", DNI_STALENESS)
def test_dni_staleness_table(mode, order, want):
    layer = hidden(mode)
    assert run_events(layer, order) == want
    d = layer.counters.staleness.as_dict()
    assert d == {"mean": sum(want) / len(want), "max": max(want), "count": len(want)}


@pytest.mark.parametrize("order, want", BACKPROP_STALENESS)
def test_backprop_staleness_table(order, want):
    layer = hidden("backprop")
    assert run_events(layer, order) == want
    assert layer.counters.staleness.as_dict()["max"] == max(want)


def test_staleness_example_mean_and_max():
    layer = hidden("dni")
    run_events(layer, "F0 F1 F2 F3 G0 G1 G2 G3")
    assert layer.counters.staleness.as_dict() == {"mean": 1.5, "max": 3, "count": 4}


def test_empty_staleness():
    assert Staleness().as_dict() == {"mean": 0.0, "max": 0, "count": 0}


@pytest.mark.parametrize("mode, sg_updates", [("dni", 2), ("cdni", 2), ("backprop", 0)])
def test_counters(mode, sg_updates):
    layer = hidden(mode)
    run_events(layer, "F0 F1 G0 F2 G1")
    assert layer.counters.as_dict()["forward_batches"] == 3
    assert layer.counters.as_dict()["true_gradients"] == 2
    assert layer.counters.as_dict()["sg_updates"] == sg_updates
    assert layer.sg_version == sg_updates
    assert sorted(layer.pending) == [2]
    assert layer.step == (3 if mode != "backprop" else 2)


def test_forward_eval_changes_nothing():
    layer = hidden("cdni")
    layer.v[...] = 1.0
    x, _ = batch(40)
    w = layer.w.copy()
    h = layer.forward_eval(x)
    np.testing.assert_allclose(h, ref_act("sigmoid", x @ w + layer.b), rtol=1e-14)
    np.testing.assert_array_equal(layer.w, w)
    assert layer.counters.forward_batches == 0 and not layer.pending and layer.step == 0
