"""Tests for pipeline.layers, what happens when a true gradient comes back:
SG training, the clock-based staleness and due-gradient rules against exact
tables, drop, lose and expire, and the update chance."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MODES
from pipeline.layers.common import Chance
from pipeline.math import nn
from tests.numeric import numeric_grad
from tests.test_layers import (ATOL, BACKPROP_MODES, RTOL, SG_MODES, WIDTH, N, Script, batch,
                               deliver, grad_of, hidden, run_events, staleness_of)

pytestmark = pytest.mark.timeout(60)


# --- SG training ------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", SG_MODES)
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
    [a] = deliver(layer, 0, target)
    assert a.dx is None  # DNI sent its gradient upstream at forward time
    assert a.sg_loss == pytest.approx(want_loss, rel=1e-12)
    np.testing.assert_allclose((v - layer.v) / 0.05, g_v, rtol=RTOL, atol=ATOL)
    np.testing.assert_allclose((c - layer.c) / 0.05, g_c, rtol=RTOL, atol=ATOL)
    v[...], c[...] = layer.v, layer.c
    assert sg_loss() < want_loss  # the same input now predicts closer to the target

    # Replaying the batch through the layer: the SG loss it reports strictly drops.
    losses = [a.sg_loss]
    for t in range(1, 6):
        layer.forward(t, x, y, need_dx=False)
        [a] = deliver(layer, t, target)
        losses.append(a.sg_loss)
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert layer.stats.sg_updates == layer.sg_version == 6


@pytest.mark.parametrize("mode", SG_MODES)
def test_true_gradient_in_dni_mode_trains_only_the_sg_module(mode):
    layer = hidden(mode)
    x, y = batch(22)
    layer.forward(0, x, y, need_dx=True)
    w, v = layer.w.copy(), layer.v.copy()
    target = np.random.default_rng(23).standard_normal((N, WIDTH))
    [a] = deliver(layer, 0, target)
    assert a.dx is None
    # zero module: the loss is that of a zero prediction, its cosine undefined,
    # its relative error exactly 1
    assert a.sg_loss == pytest.approx(0.5 * np.sum(target ** 2) / N, rel=1e-12)
    assert a.cosine is None and a.rel_err == 1.0
    np.testing.assert_array_equal(layer.w, w)  # the true gradient trains only the SG module
    assert not np.array_equal(layer.v, v)
    assert layer.step == 1  # the forward's own (zero) update, nothing more


def _fresh_prediction_checks(mode, order, monkeypatch, refresh=True):
    """Run ``order`` (("F"|"G", batch)); at every G check the loss against a
    prediction computed here from the module at arrival time (with
    ``refresh``; else the one made at forward time), the quality figures
    against the prediction used at forward time, and count how often the
    layer called sg_predict while applying the gradient."""
    layer = hidden(mode, lr=0.05, sg_lr=0.1, sg_refresh=refresh)
    rng = np.random.default_rng(30)
    layer.v[...] = 0.1 * rng.standard_normal(layer.v.shape)
    sg_ins, targets, forward_pred = {}, {}, {}
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
            fresh = sg_ins[t] @ layer.v + layer.c if refresh else forward_pred[t]
            want = float(np.mean(0.5 * np.sum((fresh - targets[t]) ** 2, axis=1)))
            want_v = layer.v - 0.1 * sg_ins[t].T @ (fresh - targets[t]) / N
            stale_changed = not np.allclose(fresh, forward_pred[t], rtol=1e-12, atol=0)
            used, true = forward_pred[t].ravel(), targets[t].ravel()
            want_cos = used @ true / np.sqrt((used @ used) * (true @ true))
            want_rel = np.sqrt(np.sum((used - true) ** 2) / np.sum(true ** 2))
            calls.clear()
            [a] = deliver(layer, t, targets[t])
            assert a.batch == t
            assert a.sg_loss == pytest.approx(want, rel=1e-12)
            assert a.cosine == pytest.approx(want_cos, rel=1e-12)
            assert a.rel_err == pytest.approx(want_rel, rel=1e-12)
            np.testing.assert_allclose(layer.v, want_v, rtol=1e-12, atol=1e-15)
            recomputes.append((len(calls), stale_changed))
    return recomputes


@pytest.mark.parametrize("mode", SG_MODES)
def test_sg_prediction_reused_when_module_unchanged(mode, monkeypatch):
    rec = _fresh_prediction_checks(mode, [("F", 0), ("G", 0), ("F", 1), ("G", 1)], monkeypatch)
    # the module did not change between each forward and its gradient
    assert rec == [(0, False), (0, False)]


@pytest.mark.parametrize("mode", SG_MODES)
def test_sg_prediction_recomputed_when_module_changed(mode, monkeypatch):
    order = [("F", 0), ("F", 1), ("F", 2), ("G", 0), ("G", 1), ("F", 3), ("G", 3), ("G", 2)]
    rec = _fresh_prediction_checks(mode, order, monkeypatch)
    # versions: F0-F2 use 0; G0 sees 0 (reuse) -> 1; G1 sees 1 != 0 (recompute) -> 2;
    # F3 uses 2; G3 sees 2 (reuse) -> 3; G2 sees 3 != 0 (recompute)
    assert rec == [(0, False), (1, True), (0, False), (1, True)]


@pytest.mark.parametrize("mode", SG_MODES)
def test_sg_module_learns_from_its_own_prediction_without_refresh(mode, monkeypatch):
    order = [("F", 0), ("F", 1), ("F", 2), ("G", 0), ("G", 1), ("F", 3), ("G", 3), ("G", 2)]
    rec = _fresh_prediction_checks(mode, order, monkeypatch, refresh=False)
    # never recomputed: each update regresses the forward pass's prediction
    assert rec == [(0, False)] * 4


# --- staleness, due gradients: exact tables -----------------------------------------------------

# grad_delay 0: a gradient is applied as it arrives; staleness counts the layer's
# forwards since the batch's own, in every mode (in backprop modes this is no longer
# the count of weight updates: "F0 F1 G0 G1" was [0, 1] then, it is [1, 0] now).
STALENESS = [
    ("F0 F1 F2 F3 G0 G1 G2 G3", [3, 2, 1, 0]),
    ("F0 G0 F1 G1 F2 G2", [0, 0, 0]),
    ("F0 F1 G0 F2 G1 G2", [1, 1, 0]),
    ("F0 F1 G0 F2 G1 G2 F3 G3", [1, 1, 0, 0]),
    ("F0 F1 F2 G2 G0 G1", [0, 2, 1]),
    ("F0 F1 F2 G2 G1 G0", [0, 1, 2]),
    ("F0 F1 G1 F2 F3 G0 G3 G2", [0, 3, 0, 1]),
    ("F0 F1 G0 G1", [1, 0]),
    ("F0 F1 F2 G0 G1 G2", [2, 1, 0]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("order, want", STALENESS)
def test_staleness_table_without_delay(mode, order, want):
    layer = hidden(mode)
    assert staleness_of(layer, order) == want
    assert layer.stats.as_dict()["staleness_steps"] == \
        {"mean": sum(want) / len(want), "max": max(want), "count": len(want)}
    hist = {}
    for s in want:
        hist[str(s)] = hist.get(str(s), 0) + 1
    assert layer.stats.as_dict()["staleness_hist"] == dict(sorted(hist.items()))


@pytest.mark.parametrize("mode", MODES)
def test_weight_updates_differ_by_mode_but_staleness_does_not(mode):
    layer = hidden(mode)
    assert staleness_of(layer, "F0 F1 F2 G0 G1") == [2, 1]
    # DNI: one update per forward; backprop modes: one per true gradient
    assert layer.step == layer.stats.weight_updates == (3 if mode in SG_MODES else 2)
    assert layer.clock == 3


# grad_delay 2: batch t (forwarded at clock t+1) is due from clock t+3, i.e. after
# the forward of t+2; arrived gradients are applied oldest batch first, stopping at
# the first one not yet due. -> (batch, staleness) in application order.
DELAY_2 = [
    ("F0 G0 F1 F2 F3", [(0, 2)]),                             # early: waits until due
    ("F0 F1 F2 G0 G1 G2 F3 F4", [(0, 2), (1, 2), (2, 2)]),    # each when its clock comes
    ("F0 F1 G1 G0 F2 F3", [(0, 2), (1, 2)]),                  # arrival order does not matter
    ("F0 G0 F1 G1 F2 F3 F4", [(0, 2), (1, 2)]),
    ("F0 F1 F2 F3 G0 G1", [(0, 3), (1, 2)]),                  # late: as soon as it comes
    ("F0 F1 F2 F3 F4 G1 G0", [(1, 3), (0, 4)]),               # due: not held for an older one
    ("F0 F1 F2 G0 F3 G1 F4 G2", [(0, 2), (1, 2), (2, 2)]),    # lockstep: exactly 2
]
DELAY_1 = [
    ("F0 G0 F1 G1 F2", [(0, 1), (1, 1)]),
    ("F0 F1 G1 G0 F2", [(0, 1), (1, 1)]),
    ("F0 F1 F2 G2 G1 G0 F3", [(1, 1), (0, 2), (2, 1)]),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("delay, order, want", [(2, o, w) for o, w in DELAY_2]
                         + [(1, o, w) for o, w in DELAY_1])
def test_due_gradient_table(mode, delay, order, want):
    layer = hidden(mode, grad_delay=delay)
    assert run_events(layer, order) == want
    applied = {b for b, _ in want}
    delivered = {int(ev[1:]) for ev in order.split() if ev[0] == "G"}
    forwarded = {int(ev[1:]) for ev in order.split() if ev[0] == "F"}
    assert set(layer.arrived) == delivered - applied  # arrived, not yet due
    assert set(layer.pending) == forwarded - applied
    assert layer.stats.true_gradients == len(want)
    assert layer.stats.as_dict()["staleness_hist"] == {
        str(s): [x for _, x in want].count(s) for s in sorted({x for _, x in want})}


@pytest.mark.parametrize("mode", MODES)
def test_arrived_gradient_is_not_outstanding_even_before_it_is_applied(mode):
    layer = hidden(mode, grad_delay=1)
    for t in range(3):
        layer.forward(t, *batch(t), need_dx=True)
    assert layer.due_outstanding() == 2  # batches 0 and 1; batch 2 is not due yet
    assert layer.receive(1, grad_of(1))
    assert layer.due_outstanding() == 1
    assert layer.receive(0, grad_of(0))
    assert layer.due_outstanding() == 0
    assert [a.batch for a in layer.apply_ready(True)] == [0, 1]


@pytest.mark.parametrize("mode", SG_MODES)
def test_early_gradient_changes_nothing_until_due(mode):
    layer = hidden(mode, grad_delay=2)
    x, y = batch(0)
    layer.forward(0, x, y, need_dx=True)
    v = layer.v.copy()
    assert layer.receive(0, grad_of(0)) and layer.apply_ready(True) == []
    layer.forward(1, *batch(1), need_dx=True)
    assert layer.apply_ready(True) == []
    np.testing.assert_array_equal(layer.v, v)
    layer.forward(2, *batch(2), need_dx=True)
    [a] = layer.apply_ready(True)
    assert (a.batch, a.staleness) == (0, 2) and not np.array_equal(layer.v, v)


# Lockstep with grad_delay 2: due_outstanding after each event. A layer may take
# its next batch only at 0, which is what makes every staleness exactly 2.
DUE_TRACE = [
    ("F0 F1 F2 G0 F3 G1 F4 G2", [0, 0, 1, 0, 1, 0, 1, 0]),
    ("F0 F1 G0 G1 F2 F3 F4", [0, 0, 0, 0, 0, 0, 1]),         # arrived early: never outstanding
    ("F0 F1 F2 F3 F4", [0, 0, 1, 2, 3]),
    ("F0 F1 F2 F3 G1 G0", [0, 0, 1, 2, 1, 0]),
    ("F0 F1 F2 F3 L0 G1", [0, 0, 1, 2, 1, 0]),                # a lost batch is not awaited
]


@pytest.mark.parametrize("mode, order, want", [
    (mode, order, want) for mode in MODES for order, want in DUE_TRACE
    if mode in BACKPROP_MODES or "L" not in order])  # only backprop modes lose gradients
def test_due_outstanding_trace(mode, order, want):
    layer = hidden(mode, grad_delay=2)
    trace = []
    for ev in order.split():
        run_events(layer, ev)
        trace.append(layer.due_outstanding())
    assert trace == want


# --- drop, lose, expire ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_dropped_gradient_is_gone_and_later_batches_still_apply(mode):
    layer = hidden(mode, drop=Script([False, True, False]))
    for t in range(3):
        layer.forward(t, *batch(t), need_dx=True)
    w, v = layer.w.copy(), None if layer.v is None else layer.v.copy()
    assert layer.receive(0, grad_of(0)) is True
    assert layer.receive(1, grad_of(1)) is False
    assert 1 not in layer.pending and 1 not in layer.arrived
    # the drop alone changes nothing
    np.testing.assert_array_equal(layer.w, w)
    if v is not None:
        np.testing.assert_array_equal(layer.v, v)
    assert layer.receive(2, grad_of(2)) is True
    assert [(a.batch, a.staleness) for a in layer.apply_ready(True)] == [(0, 2), (2, 0)]
    st = layer.stats.as_dict()
    assert (st["dropped_gradients"], st["true_gradients"], st["lost_gradients"]) == (1, 2, 0)
    assert not layer.pending and not layer.arrived


@pytest.mark.parametrize("mode", MODES)
def test_dropped_gradient_does_not_hold_back_a_delayed_layer(mode):
    layer = hidden(mode, grad_delay=2, drop=Script([True, False]))
    for t in range(3):
        layer.forward(t, *batch(t), need_dx=True)
    assert layer.due_outstanding() == 1
    assert layer.receive(0, grad_of(0)) is False
    assert layer.due_outstanding() == 0 and layer.apply_ready(True) == []
    assert layer.receive(1, grad_of(1)) is True and layer.apply_ready(True) == []  # not due
    layer.forward(3, *batch(3), need_dx=True)
    assert [(a.batch, a.staleness) for a in layer.apply_ready(True)] == [(1, 2)]


@pytest.mark.parametrize("p, want", [(1.0, [False, False, False]), (0.0, [True, True, True])])
def test_drop_chance_extremes(p, want):
    layer = hidden("dni", drop=Chance(p, np.random.default_rng(0)))
    got = []
    for t in range(3):
        layer.forward(t, *batch(t), need_dx=True)
        got.append(layer.receive(t, grad_of(t)))
    assert got == want
    assert layer.stats.dropped_gradients == want.count(False)


def test_drop_chance_draws_from_its_stream():
    twin = np.random.default_rng(5)
    want = [not (twin.random() < 0.5) for _ in range(20)]
    layer = hidden("async-backprop", drop=Chance(0.5, np.random.default_rng(5)))
    got = []
    for t in range(20):
        layer.forward(t, *batch(t), need_dx=True)
        got.append(layer.receive(t, grad_of(t)))
        layer.apply_ready(True)
    assert got == want and 0 < want.count(False) < 20
    assert layer.stats.dropped_gradients == want.count(False)
    assert layer.stats.true_gradients == want.count(True)


@pytest.mark.parametrize("mode", BACKPROP_MODES)
def test_lose_evicts_a_batch_whose_gradient_will_not_come(mode):
    layer = hidden(mode)
    for t in range(3):
        layer.forward(t, *batch(t), need_dx=True)
    assert layer.due_outstanding() == 3
    layer.lose(1)
    assert sorted(layer.pending) == [0, 2] and layer.due_outstanding() == 2
    assert staleness_of(layer, "G2 G0") == [0, 2]
    st = layer.stats.as_dict()
    assert (st["lost_gradients"], st["dropped_gradients"], st["true_gradients"]) == (1, 0, 2)
    assert layer.step == 2


@pytest.mark.parametrize("mode", MODES)
def test_expire_evicts_everything_still_pending(mode):
    layer = hidden(mode, grad_delay=2)
    assert run_events(layer, "F0 F1 F2 G1 G2") == []  # nothing due: batch 0 never came
    w, v = layer.w.copy(), None if layer.v is None else layer.v.copy()
    assert layer.expire() == 3
    assert not layer.pending and not layer.arrived and layer.due_outstanding() == 0
    assert layer.apply_ready(True) == []
    np.testing.assert_array_equal(layer.w, w)
    if v is not None:
        np.testing.assert_array_equal(layer.v, v)
    st = layer.stats.as_dict()
    assert (st["expired_gradients"], st["true_gradients"]) == (3, 0)
    assert layer.expire() == 0 and layer.stats.expired_gradients == 3
