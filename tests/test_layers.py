"""Tests for pipeline.layers: layer updates against finite differences, the
output layer, counters and timing (what happens when a true gradient comes
back is in test_layers_inflight.py)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MODES
from pipeline.layers.common import Chance
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.output import OutputLayer
from pipeline.layers.stats import Applied
from tests.numeric import numeric_grad, ref_act
from tests.kit import hidden_layer

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9
FAN_IN, WIDTH, LABELS, N = 4, 5, 3, 6
BACKPROP_MODES = ("backprop", "async-backprop")
SG_MODES = ("dni", "cdni")


def bce(logits: np.ndarray, y: np.ndarray) -> float:
    """Batch mean of the per-example summed BCE of sigmoid(logits)."""
    return float(np.mean(np.sum(np.logaddexp(0.0, logits) - y * logits, axis=1)))


def hidden(mode: str, act: str = "sigmoid", lr: float = 0.1, sg_lr: float = 0.05,
           seed: int = 0, **kw) -> HiddenLayer:
    return hidden_layer(1, FAN_IN, WIDTH, mode=mode, activation=act, lr=lr, sg_lr=sg_lr,
                       label_dim=LABELS, rng=np.random.default_rng(seed), **kw)


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


def grad_of(t: int) -> np.ndarray:
    """The true gradient the tests deliver for batch t (N, WIDTH)."""
    return np.random.default_rng(1000 + t).standard_normal((N, WIDTH)) * 1e-3


def deliver(layer: HiddenLayer, t: int, grad: np.ndarray, need_dx: bool = True
            ) -> list[Applied]:
    """A gradient arrives and the layer settles, as a worker does."""
    assert layer.receive(t, grad)
    return layer.apply_ready(need_dx)


class Script:
    """A stand-in for a Chance that answers from a fixed list (and fails past its end)."""

    def __init__(self, answers: list[bool]):
        self.answers = list(answers)

    def __call__(self) -> bool:
        return self.answers.pop(0)


def run_events(layer: HiddenLayer, order: str) -> list[tuple[int, int]]:
    """Events like "F0 F1 G0 L1": F forwards a batch, G delivers its true gradient,
    L announces it lost; after each the layer applies what is ready, as a worker
    does. Returns (batch, staleness) of each gradient applied, in application order."""
    got = []
    for ev in order.split():
        kind, t = ev[0], int(ev[1:])
        if kind == "F":
            x, y = batch(t)
            layer.forward(t, x, y, need_dx=True)
        elif kind == "G":
            layer.receive(t, grad_of(t))
        else:
            layer.lose(t)
        for a in layer.apply_ready(need_dx=True):
            assert (a.dx is not None) == (not layer.uses_sg)
            got.append((a.batch, a.staleness))
    return got


def staleness_of(layer: HiddenLayer, order: str) -> list[int]:
    return [s for _, s in run_events(layer, order)]


# --- backprop modes ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", BACKPROP_MODES)
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
def test_backprop_update_is_finite_difference_gradient_of_network_loss(act, mode):
    layer = hidden(mode, act, lr=0.3)
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
    assert layer.receive(0, grad)
    np.testing.assert_array_equal(layer.w, w1)  # arriving is not applying
    [a] = layer.apply_ready(need_dx=True)
    assert (a.batch, a.staleness, a.sg_loss, a.cosine, a.rel_err) == (0, 0, None, None, None)

    np.testing.assert_allclose((w1 - layer.w) / 0.3, g_w1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b1 - layer.b) / 0.3, g_b1, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((w2 - out.w) / 0.2, g_w2, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((b2 - out.b) / 0.2, g_b2, rtol=RTOL, atol=ATOL)
    # per-example gradient: dl_i/dx_i = N * dL/dx_i
    np.testing.assert_allclose(a.dx, N * g_x, rtol=RTOL, atol=ATOL)
    assert layer.step == 1 and layer.clock == 1 and not layer.pending and not layer.arrived


@pytest.mark.parametrize("mode", BACKPROP_MODES)
def test_backprop_backward_without_dx_still_updates(mode):
    layer = hidden(mode)
    x, _ = batch(3)
    w0 = layer.w.copy()
    layer.forward(0, x, None, need_dx=False)
    [a] = deliver(layer, 0, np.random.default_rng(4).standard_normal((N, WIDTH)), need_dx=False)
    assert a.dx is None
    assert not np.array_equal(layer.w, w0)


@pytest.mark.parametrize("mode", BACKPROP_MODES)
def test_backprop_layer_has_no_sg_module(mode):
    layer = hidden(mode)
    assert layer.v is None and layer.c is None and not layer.uses_sg
    assert set(layer.weights()) == {"w", "b"}


@pytest.mark.parametrize("mode", BACKPROP_MODES)
def test_stale_backward_uses_the_cached_batch_and_the_current_weights(mode):
    # F0 F1 G0 G1: the gradient of batch 1 is applied after batch 0's update.
    # Written out: z_t = x_t W0 + b0 (both forwards before any update);
    # dz_t = g_t * h_t (1 - h_t); W1 = W0 - lr x_0^T dz_0 / N;
    # dx_1 = dz_1 W1^T (the weights as they are now), W2 = W1 - lr x_1^T dz_1 / N.
    lr = 0.7
    layer = hidden(mode, lr=lr)
    w0, b0 = layer.w.copy(), layer.b.copy()
    (x0, _), (x1, _) = batch(50), batch(51)
    g0, g1 = (np.random.default_rng(s).standard_normal((N, WIDTH)) for s in (52, 53))
    layer.forward(0, x0, None, need_dx=True)
    layer.forward(1, x1, None, need_dx=True)
    h0, h1 = ref_act("sigmoid", x0 @ w0 + b0), ref_act("sigmoid", x1 @ w0 + b0)
    dz0, dz1 = g0 * h0 * (1 - h0), g1 * h1 * (1 - h1)
    w1, b1 = w0 - lr * x0.T @ dz0 / N, b0 - lr * dz0.sum(0) / N
    w2, b2 = w1 - lr * x1.T @ dz1 / N, b1 - lr * dz1.sum(0) / N

    [a0] = deliver(layer, 0, g0)
    np.testing.assert_allclose(a0.dx, dz0 @ w0.T, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(layer.w, w1, rtol=1e-12, atol=1e-15)
    [a1] = deliver(layer, 1, g1)
    np.testing.assert_allclose(a1.dx, dz1 @ w1.T, rtol=1e-12, atol=1e-15)
    assert not np.allclose(a1.dx, dz1 @ w0.T, rtol=1e-6, atol=0)  # not the forward-time W
    np.testing.assert_allclose(layer.w, w2, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(layer.b, b2, rtol=1e-12, atol=1e-15)
    assert (a0.staleness, a1.staleness) == (1, 0)  # counted in forwards, not updates
    assert layer.step == 2 and layer.clock == 2


# --- DNI / cDNI forward ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", SG_MODES)
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
    assert layer.stats.forward_batches == 1 and layer.clock == 1
    assert set(layer.weights()) == {"w", "b", "sg_v", "sg_c"}


@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("mode", SG_MODES)
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
    assert layer.step == 1 and layer.stats.weight_updates == 1


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


# --- update chance ----------------------------------------------------------------------------

@pytest.mark.parametrize("p", [0.0, 1.0])
def test_certain_chance_draws_nothing(p):
    rng = np.random.default_rng(3)
    state = rng.bit_generator.state
    chance = Chance(p, rng)
    assert [chance() for _ in range(10)] == [p == 1.0] * 10
    assert rng.bit_generator.state == state


def test_chance_draws_one_number_per_call():
    twin = np.random.default_rng(11)
    want = [twin.random() < 0.5 for _ in range(50)]
    chance = Chance(0.5, np.random.default_rng(11))
    assert [chance() for _ in range(50)] == want
    assert 10 < sum(want) < 40


@pytest.mark.parametrize("mode", SG_MODES)
def test_update_prob_zero_dni_weights_frozen_but_sg_module_learns(mode):
    layer = hidden(mode, update=Chance(0.0, np.random.default_rng(0)))
    layer.v[...] = np.random.default_rng(1).standard_normal(layer.v.shape)  # nonzero SG
    w, b, v, c = layer.w.copy(), layer.b.copy(), layer.v.copy(), layer.c.copy()
    dxs = []
    for t in range(4):
        _, dx = layer.forward(t, *batch(t), need_dx=True)
        dxs.append(dx)
        deliver(layer, t, grad_of(t))
    np.testing.assert_array_equal(layer.w, w)
    np.testing.assert_array_equal(layer.b, b)
    assert not np.array_equal(layer.v, v) and not np.array_equal(layer.c, c)
    assert all(np.abs(dx).max() > 0 for dx in dxs)  # upstream still gets its gradient
    st = layer.stats
    assert (layer.step, st.weight_updates, st.skipped_updates, st.sg_updates) == (0, 0, 4, 4)


@pytest.mark.parametrize("mode", BACKPROP_MODES)
def test_update_prob_zero_backprop_weights_frozen_dx_from_initial_weights(mode):
    layer = hidden(mode, update=Chance(0.0, np.random.default_rng(0)))
    w, b = layer.w.copy(), layer.b.copy()
    for t in range(3):
        x, _ = batch(t)
        layer.forward(t, x, None, need_dx=True)
        g = grad_of(t)
        [a] = deliver(layer, t, g)
        h = ref_act("sigmoid", x @ w + b)
        np.testing.assert_allclose(a.dx, (g * h * (1 - h)) @ w.T, rtol=1e-12, atol=1e-18)
    np.testing.assert_array_equal(layer.w, w)
    np.testing.assert_array_equal(layer.b, b)
    st = layer.stats
    assert (layer.step, st.weight_updates, st.skipped_updates, st.true_gradients) == (0, 0, 3, 3)


@pytest.mark.parametrize("mode", MODES)
def test_update_chance_decides_each_weight_update(mode):
    twin = np.random.default_rng(21)
    draws = [twin.random() < 0.5 for _ in range(12)]
    layer = hidden(mode, update=Chance(0.5, np.random.default_rng(21)))
    if layer.uses_sg:
        layer.v[...] = np.random.default_rng(1).standard_normal(layer.v.shape)
    changed = []
    for t in range(12):
        w = layer.w.copy()
        layer.forward(t, *batch(t), need_dx=True)
        deliver(layer, t, grad_of(t))
        changed.append(not np.array_equal(layer.w, w))
    assert changed == draws  # one draw per weight update: per forward (DNI), per gradient
    assert layer.step == layer.stats.weight_updates == sum(draws)
    assert layer.stats.skipped_updates == 12 - sum(draws)
    if layer.uses_sg:
        assert layer.stats.sg_updates == 12  # SG updates are not subject to the chance


def test_staleness_seconds_measured_from_forward_to_application():
    """The time comes in as an argument: the layer reads no clock."""
    layer = hidden("dni", grad_delay=1)
    layer.forward(0, *batch(0), need_dx=True, now=100.0)
    layer.forward(1, *batch(1), need_dx=True, now=100.5)
    assert layer.receive(0, grad_of(0)) and layer.receive(1, grad_of(1))
    [a0] = layer.apply_ready(True, now=101.0)
    layer.forward(2, *batch(2), need_dx=True, now=103.0)
    [a1] = layer.apply_ready(True, now=103.0)
    assert (a0.staleness_s, a1.staleness_s) == (1.0, 2.5)
    assert layer.stats.as_dict()["staleness_s"] == {"mean": 1.75, "max": 2.5}


@pytest.mark.parametrize("mode, sg_updates", [("dni", 2), ("cdni", 2), ("backprop", 0),
                                              ("async-backprop", 0)])
def test_counters(mode, sg_updates):
    layer = hidden(mode)
    run_events(layer, "F0 F1 G0 F2 G1")
    st = layer.stats.as_dict()
    assert (st["forward_batches"], st["true_gradients"], st["sg_updates"]) == (3, 2, sg_updates)
    assert layer.sg_version == sg_updates
    assert sorted(layer.pending) == [2]
    assert layer.step == (3 if mode in SG_MODES else 2)
    assert (st["sg_quality"] is None) == (mode not in SG_MODES)


def test_forward_eval_changes_nothing():
    layer = hidden("cdni")
    layer.v[...] = 1.0
    x, _ = batch(40)
    w = layer.w.copy()
    h = layer.forward_eval(x)
    np.testing.assert_allclose(h, ref_act("sigmoid", x @ w + layer.b), rtol=1e-14)
    np.testing.assert_array_equal(layer.w, w)
    assert layer.stats.forward_batches == 0 and not layer.pending and layer.step == 0
    assert layer.clock == 0


@pytest.mark.parametrize("mode", MODES)
def test_applied_gradient_carries_the_mean_activation_norm_of_its_batch(mode):
    layer = hidden(mode)
    x, y = batch(3)
    h, _ = layer.forward(0, x, y, need_dx=True)
    want = np.sqrt(np.mean([np.sum(row * row) for row in h]))  # per example, then the RMS
    [a] = deliver(layer, 0, grad_of(0))
    assert a.act_norm == pytest.approx(want, rel=1e-14)
