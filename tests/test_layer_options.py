"""Tests for the layer options: the SG module (linear and ReLU-hidden), batch norm
in a hidden layer, the softmax output, Adam through a layer, float32, and
checkpoints with optimiser state. References are written here: central finite
differences, hand-written softmax/batch-norm/Adam, hand-computed statistics."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline import nn
from pipeline.checkpoint import layer_state, load_layer_state
from pipeline.layers import HiddenLayer, OutputLayer
from pipeline.synthetic import SGModule
from tests.numeric import numeric_grad, ref_act

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


# --- 1. the synthetic-gradient module -------------------------------------------------------

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


# --- 2. batch norm in a hidden layer --------------------------------------------------------

def ref_bn_hidden(x, w, b, gamma, beta, act):
    z = x @ w + b
    mu = z.mean(axis=0)
    var = ((z - mu) ** 2).mean(axis=0)
    return ref_act(act, gamma * (z - mu) / np.sqrt(var + 1e-5) + beta)


@pytest.mark.parametrize("act", ["relu", "sigmoid"])
def test_batchnorm_backprop_matches_finite_differences(act):
    lr = 0.1
    layer = HiddenLayer(1, FAN_IN, WIDTH, mode="backprop", activation=act, lr=lr, sg_lr=0.0,
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
    layer = HiddenLayer(1, FAN_IN, 5, mode="cdni", activation="relu", lr=0.01, sg_lr=0.01,
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


# --- 6. checkpoints carry the optimiser state --------------------------------------------

def make_layers():
    hid = HiddenLayer(1, FAN_IN, 5, mode="cdni", activation="relu", lr=0.01, sg_lr=0.01,
                      label_dim=CLASSES, rng=np.random.default_rng(0), optimizer="adam",
                      sg_hidden=(6,), batchnorm=True)
    out = OutputLayer(2, 5, CLASSES, lr=0.01, rng=np.random.default_rng(1),
                      optimizer="adam", softmax=True)
    return hid, out


def drive(hid, out, seed, steps, start):
    rng = np.random.default_rng(seed)
    for t in range(start, start + steps):
        x = rng.standard_normal((B, FAN_IN))
        y = onehot(rng.integers(0, CLASSES, B))
        h, _ = hid.forward(t, x, y, need_dx=True)
        grad, _, _ = out.train_step(h, y, need_dx=True)
        assert hid.receive(t, grad)
        hid.apply_ready(need_dx=True)


def test_checkpoint_round_trip_restores_adam_state():
    a_hid, a_out = make_layers()
    drive(a_hid, a_out, seed=10, steps=4, start=0)
    states = [layer_state(a_hid), layer_state(a_out)]
    assert any(k.startswith("sg_opt.") for k in states[0][1])

    b_hid, b_out = make_layers()
    for layer, (meta, arrays) in zip((b_hid, b_out), states):
        load_layer_state(layer, meta, arrays)
    c_hid, c_out = make_layers()  # the plain weights only: fresh Adam moments and counts
    for layer, (_, arrays) in zip((c_hid, c_out), states):
        for k, value in arrays.items():
            if "." not in k:
                layer.weights()[k][...] = value
    for hid, out in ((a_hid, a_out), (b_hid, b_out), (c_hid, c_out)):
        drive(hid, out, seed=11, steps=3, start=4)

    differs = False
    for a, b, c in ((a_hid, b_hid, c_hid), (a_out, b_out, c_out)):
        assert set(a.weights()) == set(b.weights())
        for k in a.weights():
            assert np.array_equal(a.weights()[k], b.weights()[k]), k
            differs |= not np.array_equal(a.weights()[k], c.weights()[k])
        assert (b.clock, b.step) == (a.clock, a.step)
    assert b_hid.sg_version == a_hid.sg_version
    assert differs, "without the Adam state the runs should part"


def make_remedied(mode: str, **kw):
    remedies = (dict(sg_boost=0.5, lr_staleness=0.5, sg_lookahead=1.0) if mode == "cdni"
                else dict(lr_staleness=0.5, delay_comp=0.5))
    hid = HiddenLayer(1, FAN_IN, 5, mode=mode, activation="relu", lr=0.05, sg_lr=0.02,
                      label_dim=CLASSES, rng=np.random.default_rng(0), optimizer="sgd",
                      momentum=0.9, **{**remedies, **kw})
    out = OutputLayer(2, 5, CLASSES, lr=0.05, rng=np.random.default_rng(1), optimizer="sgd",
                      softmax=True, momentum=0.9)
    return hid, out


def drive_late(hid, out, seed, steps, start, late=2):
    """Each true gradient reaches the layer ``late`` steps after its batch;
    the ones still out arrive at the end, so nothing is pending after."""
    rng = np.random.default_rng(seed)
    held = []
    for t in range(start, start + steps):
        x = rng.standard_normal((B, FAN_IN))
        y = onehot(rng.integers(0, CLASSES, B))
        h, _ = hid.forward(t, x, y, need_dx=True)
        grad, _, _ = out.train_step(h, y, need_dx=True)
        held.append((t, grad))
        if len(held) > late:
            b, g = held.pop(0)
            assert hid.receive(b, g)
            hid.apply_ready(need_dx=True)
    for b, g in held:
        assert hid.receive(b, g)
        hid.apply_ready(need_dx=True)
    assert not hid.pending


@pytest.mark.parametrize("mode", ["cdni", "async-backprop"])
def test_checkpoint_round_trip_carries_the_staleness_remedies_state(mode):
    """The running staleness, the SG module's drift and the momentum buffers
    come back from a checkpoint: the restored layer goes on exactly as the
    original; one given the weights alone parts from it."""
    a_hid, a_out = make_remedied(mode)
    drive_late(a_hid, a_out, seed=20, steps=6, start=0)
    assert a_hid.tau_bar > 0
    states = [layer_state(a_hid), layer_state(a_out)]
    assert any(k.startswith("opt.") and k.endswith(".buf") for k in states[0][1])
    if mode == "cdni":
        assert any(k.startswith("sg_drift.") for k in states[0][1])
    b_hid, b_out = make_remedied(mode)
    for layer, (meta, arrays) in zip((b_hid, b_out), states):
        load_layer_state(layer, meta, arrays)
    assert b_hid.tau_bar == a_hid.tau_bar
    c_hid, c_out = make_remedied(mode)
    for layer, (_, arrays) in zip((c_hid, c_out), states):
        for k, value in arrays.items():
            if "." not in k:
                layer.weights()[k][...] = value
    for hid, out in ((a_hid, a_out), (b_hid, b_out), (c_hid, c_out)):
        drive_late(hid, out, seed=21, steps=4, start=6)
    for k in a_hid.weights():
        assert np.array_equal(a_hid.weights()[k], b_hid.weights()[k]), k
    assert any(not np.array_equal(a_hid.weights()[k], c_hid.weights()[k])
               for k in a_hid.weights())


@pytest.mark.parametrize("mode", ["dni", "backprop"])
def test_activations_and_input_gradients_are_handed_out_before_the_update(mode):
    """send_h gets h before anything else, send_dx gets dx while the weights
    are still the ones the forward pass used; both equal what is returned."""
    rng = np.random.default_rng(40)
    layer = HiddenLayer(2, 5, 4, mode=mode, activation="sigmoid", lr=0.5, sg_lr=0.1,
                        label_dim=3, rng=np.random.default_rng(1))
    if layer.sg is not None:
        layer.sg.v[...] = rng.standard_normal(layer.sg.v.shape)  # a non-zero SG: W moves
    w0 = layer.w.copy()
    seen = []
    x, y = rng.standard_normal((6, 5)), np.eye(3)[rng.integers(0, 3, 6)]
    h, dx = layer.forward(0, x, y, need_dx=True,
                          send_h=lambda a: seen.append(("h", a, layer.w.copy())),
                          send_dx=lambda a: seen.append(("dx", a, layer.w.copy())))
    if mode == "backprop":
        assert [s[0] for s in seen] == ["h"] and dx is None
        layer.receive(0, rng.standard_normal((6, 4)))
        [applied] = layer.apply_ready(need_dx=True,
                                      send_dx=lambda b, a: seen.append(("dx", a, layer.w.copy())))
        dx = applied.dx
    assert [s[0] for s in seen] == ["h", "dx"]
    assert seen[0][1] is h
    assert np.array_equal(seen[1][1], dx)
    for _, _, w in seen:
        np.testing.assert_array_equal(w, w0)      # handed out before the update
    assert not np.array_equal(layer.w, w0)        # and the update did happen


@pytest.mark.parametrize("mode", ["backprop", "async-backprop"])
def test_checkpoint_round_trip_of_a_layer_without_sg_module(mode):
    """A backprop layer has no SG module: its checkpoint loads all the same."""
    def make():
        return HiddenLayer(1, 4, 3, mode=mode, activation="relu", lr=0.1, sg_lr=0.1,
                           label_dim=2, rng=np.random.default_rng(0), optimizer="adam")
    rng = np.random.default_rng(2)
    a, b = make(), make()
    a.forward(0, rng.standard_normal((5, 4)), None, need_dx=False)
    a.receive(0, rng.standard_normal((5, 3)))
    a.apply_ready(need_dx=False)
    load_layer_state(b, *layer_state(a))
    for name, value in a.weights().items():
        assert np.array_equal(b.weights()[name], value), name
    assert (b.clock, b.step, b.sg_version) == (a.clock, a.step, 0)
