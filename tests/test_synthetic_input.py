"""Tests for pipeline.synthetic_input: the synthetic-input model's regression
against finite differences, its zero start, the refresh rule, the quality
figures against a hand computation; HiddenLayer.begin_true against finite
differences; and a small completely unlocked network in numpy alone."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import nn
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.output import OutputLayer
from pipeline.layers.input_model import InputPredictor, SIModule
from tests.kit import (synthetic_forward, synthetic_output_step, true_input_arrives,
                       true_output_input)
from tests.numeric import numeric_grad, ref_act
from tests.kit import hidden_layer

pytestmark = pytest.mark.timeout(30)

RTOL = 1e-6
ATOL = 1e-9
D0, LABELS, D_PREV, WIDTH, N = 4, 3, 5, 6, 7


def data(seed: int, rows: int = N):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, D0))
    y = (rng.uniform(size=(rows, LABELS)) > 0.5).astype(np.float64)
    return x, y


def predictor(conditioned: bool = True, lr: float = 0.1, **kw) -> InputPredictor:
    return InputPredictor(D0, LABELS, D_PREV, conditioned=conditioned, lr=lr, **kw)


def randomise(si: InputPredictor, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for a in si.model.params().values():
        a[...] = rng.standard_normal(a.shape)


class CountingPredict:
    """Wraps a model's predict and counts the calls."""

    def __init__(self, model: SIModule):
        self.calls, self.inner = 0, model.predict
        model.predict = self

    def __call__(self, inp):
        self.calls += 1
        return self.inner(inp)


# --- the model ----------------------------------------------------------------------

@pytest.mark.parametrize("conditioned", [False, True])
def test_model_starts_at_zero_and_predicts_zero(conditioned):
    si = predictor(conditioned)
    assert list(si.model.params()) == ["si_u", "si_b"]
    assert si.model.u.shape == (D0 + (LABELS if conditioned else 0), D_PREV)
    assert not si.model.u.any() and not si.model.b.any()
    x, y = data(0)
    assert not si.guess(0, x, y, clock=1).any()
    assert si.model.version == 0


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("conditioned", [False, True])
def test_regression_step_is_the_finite_difference_gradient_of_the_squared_error(
        conditioned, optimizer):
    lr = 0.05
    si = predictor(conditioned, lr=lr, optimizer=optimizer)
    randomise(si, 1)
    x, y = data(2)
    target = np.random.default_rng(3).standard_normal((N, D_PREV))
    inp = np.hstack([x, y]) if conditioned else x   # written here, not by nn.sg_input
    u, b = si.model.u.copy(), si.model.b.copy()

    def loss():
        return 0.5 * np.sum((inp @ u + b - target) ** 2) / N

    g_u, g_b = numeric_grad(loss, u), numeric_grad(loss, b)
    si.guess(0, x, y, clock=1)
    a = si.learn(0, target, clock=1)
    assert a.loss == pytest.approx(loss(), rel=1e-12)
    assert si.model.version == 1
    if optimizer == "sgd":
        np.testing.assert_allclose((u - si.model.u) / lr, g_u, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose((b - si.model.b) / lr, g_b, rtol=RTOL, atol=ATOL)
    else:  # Adam's first step is lr * sign(g), up to its epsilon
        np.testing.assert_allclose((u - si.model.u) / lr, np.sign(g_u), rtol=1e-5)
        np.testing.assert_allclose((b - si.model.b) / lr, np.sign(g_b), rtol=1e-5)


def test_one_regression_step_reduces_the_error_on_its_batch():
    si = predictor(lr=0.1)
    randomise(si, 4)
    x, y = data(5)
    target = np.random.default_rng(6).standard_normal((N, D_PREV))
    before = si.guess(0, x, y, clock=1)
    si.learn(0, target, clock=1)
    after = si.guess(1, x, y, clock=2)
    assert np.sum((after - target) ** 2) < 0.9 * np.sum((before - target) ** 2)


def test_step_scale_multiplies_the_step():
    x, y = data(7)
    target = np.random.default_rng(8).standard_normal((N, D_PREV))
    moves = []
    for scale in (1.0, 2.5):
        si = predictor(lr=0.1)
        randomise(si, 9)
        u0 = si.model.u.copy()
        si.guess(0, x, y, clock=1)
        si.learn(0, target, clock=1, scale=scale)
        moves.append(si.model.u - u0)
    np.testing.assert_allclose(moves[1], 2.5 * moves[0], rtol=1e-12)


# --- the refresh rule --------------------------------------------------------------

@pytest.mark.parametrize("refresh", [True, False])
def test_prediction_is_recomputed_exactly_when_the_model_changed_since_the_guess(refresh):
    lr = 0.1
    si = predictor(lr=lr, refresh=refresh)
    randomise(si, 10)
    spy = CountingPredict(si.model)
    (x0, y0), (x1, y1) = data(11), data(12)
    t0, t1 = (np.random.default_rng(s).standard_normal((N, D_PREV)) for s in (13, 14))
    si.guess(0, x0, y0, clock=1)
    g1 = si.guess(1, x1, y1, clock=2).copy()
    assert spy.calls == 2

    si.learn(0, t0, clock=2)                        # version 0, as at the guess: no recompute
    assert spy.calls == 2 and si.model.version == 1
    u1, b1 = si.model.u.copy(), si.model.b.copy()
    a1 = si.learn(1, t1, clock=4)                   # the model moved since batch 1's guess
    assert spy.calls == (3 if refresh else 2)
    inp1 = np.hstack([x1, y1])
    used = inp1 @ u1 + b1 if refresh else g1        # the prediction the step regresses
    loss, du, db = nn.sg_grads(inp1, used, t1)
    np.testing.assert_allclose(si.model.u, u1 - lr * du, rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(si.model.b, b1 - lr * db, rtol=1e-13, atol=1e-15)
    assert a1.loss == pytest.approx(loss, rel=1e-13)
    assert not np.allclose(inp1 @ u1 + b1, g1)      # the refresh made a difference
    # quality is always of the synthetic input that was used, and the forward
    # staleness counts the layer's steps from the guess to the true input
    assert a1.staleness == 2 and a1.batch == 1
    norm = np.linalg.norm
    assert a1.cosine == pytest.approx(np.sum(g1 * t1) / (norm(g1) * norm(t1)), rel=1e-12)
    assert a1.rel_err == pytest.approx(norm(g1 - t1) / norm(t1), rel=1e-12)
    assert not si.pending

    si.guess(2, x0, y0, clock=5)                    # made by the current model
    si.learn(2, t0, clock=5)
    assert spy.calls == (3 if refresh else 2) + 1   # the guess only


def test_expire_counts_the_guesses_whose_true_input_never_came():
    si = predictor()
    for t in range(3):
        si.guess(t, *data(t), clock=t + 1)
    si.learn(1, np.zeros((N, D_PREV)), clock=3)
    assert si.expire() == 2 and not si.pending


# --- quality figures ------------------------------------------------------------------

def test_quality_figures_against_a_hand_computation():
    si = InputPredictor(2, 0, 2, conditioned=False)
    si.model.u[...] = np.eye(2)
    x = np.eye(2)                                    # so the guess is [[1, 0], [0, 1]]
    true = np.array([[1.0, 1.0], [0.0, 1.0]])
    si.guess(0, x, None, clock=1)
    a = si.learn(0, true, clock=1)
    # <pred, true> = 2, |pred| = sqrt 2, |true| = sqrt 3, |pred - true| = 1
    assert a.cosine == pytest.approx(2 / np.sqrt(6), rel=1e-15)
    assert a.rel_err == pytest.approx(1 / np.sqrt(3), rel=1e-15)
    assert a.staleness == 0
    # the zero start: no cosine (a zero vector has no direction), the whole error
    z = InputPredictor(2, 0, 2, conditioned=False)
    z.guess(0, x, None, clock=1)
    a = z.learn(0, true, clock=1)
    assert a.cosine is None and a.rel_err == 1.0


# --- the layer's two steps ------------------------------------------------------------

def assert_second_step(layer, w, b, step, lr, g_w, g_b, second_step: bool) -> None:
    """With the second step, ``layer`` (weights ``w``, ``b`` and ``step``
    before it) moved by exactly -lr times the finite-difference gradients
    (``g_w``, ``g_b``) and counted one step; without it, nothing moved."""
    if second_step:
        np.testing.assert_allclose((w - layer.w) / lr, g_w, rtol=RTOL, atol=ATOL)
        np.testing.assert_allclose((b - layer.b) / lr, g_b, rtol=RTOL, atol=ATOL)
        assert layer.step == step + 1
    else:
        np.testing.assert_array_equal(layer.w, w)
        np.testing.assert_array_equal(layer.b, b)
        assert layer.step == step


def layer(mode: str = "cdni", act: str = "sigmoid", lr: float = 0.25, **kw) -> HiddenLayer:
    hl = hidden_layer(2, D_PREV, WIDTH, mode=mode, activation=act, lr=lr, sg_lr=0.05,
                     label_dim=LABELS, rng=np.random.default_rng(20), **kw)
    if hl.sg is not None:
        rng = np.random.default_rng(21)
        hl.v[...] = rng.standard_normal(hl.v.shape)
        hl.c[...] = rng.standard_normal(hl.c.shape)
    return hl


def true_h(seed: int, hl: HiddenLayer) -> np.ndarray:
    """A true input (N, D_PREV), off the ReLU kink of ``hl``."""
    rng = np.random.default_rng(seed)
    while True:
        h = rng.standard_normal((N, D_PREV))
        if np.min(np.abs(h @ hl.w + hl.b)) > 1e-3:
            return h


def test_synthetic_forward_with_the_zero_start_moves_only_the_bias():
    hl, si = layer(), predictor()
    w0, b0 = hl.w.copy(), hl.b.copy()
    x, y = data(22)
    h = synthetic_forward(hl, si, 0, x, y)
    np.testing.assert_array_equal(h, np.tile(nn.sigmoid(b0), (N, 1)))  # f(0 W + b)
    np.testing.assert_array_equal(hl.w, w0)          # x_hat = 0: no weight gradient
    assert not np.array_equal(hl.b, b0)              # the SG step still moves the bias
    assert hl.clock == 1 and hl.step == 1 and si.pending[0].clock == 1


@pytest.mark.parametrize("second_step", [False, True])
@pytest.mark.parametrize("act", ["sigmoid", "relu"])
@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_forward_true_sends_the_finite_difference_dx_and_steps_by_option(mode, act,
                                                                         second_step):
    # With the SG prediction g at the true h fixed, dx and the second step are
    # those of the surrogate mean_i <g_i, f(x_i W + b)> at the true input.
    lr = 0.25
    hl, si = layer(mode, act, lr), predictor()
    x, y = data(23)
    synthetic_forward(hl, si, 0, x, y)
    clock, step = hl.clock, hl.step
    h_prev = true_h(24, hl)
    w, b = hl.w.copy(), hl.b.copy()
    h0 = ref_act(act, h_prev @ w + b)
    g = (np.hstack([h0, y]) if mode == "cdni" else h0) @ hl.v + hl.c

    def surrogate():
        return float(np.sum(g * ref_act(act, h_prev @ w + b)) / N)

    g_w, g_b, g_x = (numeric_grad(surrogate, a) for a in (w, b, h_prev))
    # The layer's phases, as its node runs them: h, then dx, each out before
    # the weights move (the node sends each at once), then the step's end.
    hl.si = si
    h = hl.begin_true(0, h_prev, y)
    dx = hl.synthetic_dx(need_dx=True)
    np.testing.assert_array_equal(hl.w, w)
    np.testing.assert_array_equal(hl.b, b)
    a = hl.end_true(second_step)
    np.testing.assert_allclose(h, h0, rtol=1e-14, atol=1e-15)
    np.testing.assert_allclose(dx, N * g_x, rtol=RTOL, atol=ATOL)
    assert_second_step(hl, w, b, step, lr, g_w, g_b, second_step)
    assert hl.clock == clock                         # a step, not a forward batch
    assert a.batch == 0 and a.staleness == 0 and si.model.version == 1
    p = hl.pending[0]
    np.testing.assert_allclose(p.sg_pred, g, rtol=1e-13)
    assert p.sg_version == hl.sg_version


def test_the_true_gradient_trains_the_sg_module_at_the_true_activation():
    hl, si = layer("cdni", "sigmoid"), predictor()
    x, y = data(25)
    synthetic_forward(hl, si, 0, x, y)
    h_prev = true_h(26, hl)
    _, h, _ = true_input_arrives(hl, si, 0, h_prev, y, need_dx=False)
    sg_in = np.hstack([h, y])
    v0, c0 = hl.v.copy(), hl.c.copy()
    target = np.random.default_rng(27).standard_normal((N, WIDTH))
    assert hl.receive(0, target)
    [a] = hl.apply_ready(need_dx=False)
    _, dv, dc = nn.sg_grads(sg_in, sg_in @ v0 + c0, target)
    np.testing.assert_allclose(hl.v, v0 - 0.05 * dv, rtol=1e-13)
    np.testing.assert_allclose(hl.c, c0 - 0.05 * dc, rtol=1e-13)
    pred = sg_in @ v0 + c0
    assert a.cosine == pytest.approx(
        np.sum(pred * target) / (np.linalg.norm(pred) * np.linalg.norm(target)), rel=1e-12)


def test_forward_true_refuses_a_layer_without_sg_module():
    hl = layer(mode="backprop")
    _, y = data(28)
    hl.forward(0, np.zeros((N, D_PREV)), y, need_dx=False)
    with pytest.raises(ValueError, match="--unlock forward"):
        hl.begin_true(0, np.ones((N, D_PREV)), y)


# --- the output layer's two steps ----------------------------------------------------

def ref_loss(softmax: bool, z: np.ndarray, y: np.ndarray) -> float:
    """The batch-mean loss written here: softmax cross-entropy with one-hot
    y, or the binary cross-entropy of sigmoid outputs summed over bits."""
    if softmax:
        z = z - z.max(axis=1, keepdims=True)
        logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-(y * logp).sum() / len(z))
    p = ref_act("sigmoid", z)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).sum() / len(z))


def output_layer(softmax: bool, lr: float = 0.25) -> OutputLayer:
    return OutputLayer(3, D_PREV, LABELS, lr=lr, rng=np.random.default_rng(40),
                       softmax=softmax)


def labels(softmax: bool, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if softmax:
        return np.eye(LABELS)[rng.integers(0, LABELS, N)]
    return (rng.uniform(size=(N, LABELS)) > 0.5).astype(np.float64)


@pytest.mark.parametrize("second_step", [False, True])
@pytest.mark.parametrize("softmax", [False, True])
def test_output_forward_true_is_the_finite_difference_loss_gradient(softmax, second_step):
    lr = 0.25
    out, si = output_layer(softmax, lr), predictor(conditioned=False)
    x, _ = data(41)
    y = labels(softmax, 42)
    synthetic_output_step(out, si, 0, x, y)
    clock, step = out.clock, out.step
    h_prev = np.random.default_rng(43).standard_normal((N, D_PREV))
    w, b = out.w.copy(), out.b.copy()

    def loss():
        return ref_loss(softmax, h_prev @ w + b, y)

    want = loss()
    g_w, g_b, g_x = (numeric_grad(loss, a) for a in (w, b, h_prev))
    z = h_prev @ w + b
    hits = (z.argmax(1) == y.argmax(1)).sum() if softmax else \
        np.all((z > 0) == (y > 0.5), axis=1).sum()
    a, dx, got, correct = true_output_input(out, si, 0, h_prev, y, need_dx=True,
                                            second_step=second_step)
    assert got == pytest.approx(want, rel=1e-12) and correct == hits
    np.testing.assert_allclose(dx, N * g_x, rtol=RTOL, atol=ATOL)  # per example
    assert_second_step(out, w, b, step, lr, g_w, g_b, second_step)
    assert out.clock == clock and a.batch == 0 and a.staleness == 0
    assert si.model.version == 1 and not si.pending


def test_output_synthetic_step_with_the_zero_start_moves_only_the_bias():
    out, si = output_layer(softmax=True), predictor(conditioned=False)
    w0, b0 = out.w.copy(), out.b.copy()
    x, _ = data(44)
    y = labels(True, 45)
    loss = synthetic_output_step(out, si, 0, x, y)
    assert loss == pytest.approx(ref_loss(True, np.tile(b0, (N, 1)), y), rel=1e-12)
    np.testing.assert_array_equal(out.w, w0)
    # the bias steps on the loss at x_hat = 0: the mean of softmax(b) - y
    p = np.exp(b0) / np.exp(b0).sum()
    np.testing.assert_allclose(out.b, b0 - 0.25 * (p - y.mean(0)), rtol=1e-12)
    assert out.clock == 1 and si.pending[0].clock == 1


def test_a_layer_owns_its_synthetic_input_model_among_its_weights():
    hl, out = layer(), output_layer(softmax=False)
    assert "si_u" not in hl.weights() and "si_u" not in out.weights()
    hl.si, out.si = predictor(), predictor()
    for L in (hl, out):
        assert L.weights()["si_u"] is L.si.model.u and L.weights()["si_b"] is L.si.model.b


# --- a completely unlocked network, in numpy alone -------------------------------------

@pytest.mark.parametrize("second_step", [False, True])
def test_unlocked_network_learns_and_its_synthetic_input_fits_the_linear_map(second_step):
    """x -> layer 1 (ReLU, kept in its linear region: x >= 0, W1, b1 > 0) ->
    layer 2 (completely unlocked, its true input one batch late) -> sigmoid
    outputs regressing soft targets. Layer 1 is affine in x, so the linear
    synthetic input can fit it to near zero error, while layer 1 trains."""
    rng = np.random.default_rng(30)
    d0, d1, d2, dout, n, steps = 4, 5, 5, 3, 16, 600
    teacher = rng.standard_normal((d0, dout))
    l1 = hidden_layer(1, d0, d1, mode="dni", activation="relu", lr=0.005, sg_lr=0.05,
                     label_dim=dout, rng=np.random.default_rng(31))
    l1.w[...] = np.abs(l1.w)
    l1.b[...] = 0.5
    l2 = hidden_layer(2, d1, d2, mode="cdni", activation="sigmoid", lr=0.3, sg_lr=0.05,
                     label_dim=dout, rng=np.random.default_rng(32))
    out = OutputLayer(3, d2, dout, lr=0.3, rng=np.random.default_rng(33))
    si = InputPredictor(d0, dout, d1, conditioned=False, lr=0.5)

    def task(rows):
        x = rng.uniform(size=(rows, d0))
        return x, nn.sigmoid(3.0 * (x - 0.5) @ teacher)

    x_test, y_test = task(256)

    def test_loss():
        return out.evaluate(l2.forward_eval(l1.forward_eval(x_test)), y_test)[0]

    start = test_loss()
    late = None          # (batch, x, y, h1) of the batch whose true input is in flight
    rel, losses = [], []
    for t in range(steps):
        x, y = task(n)
        assert np.min(x @ l1.w + l1.b) > 0, "layer 1 left its linear region"
        h1, _ = l1.forward(t, x, y, need_dx=False)
        synthetic_forward(l2, si, t, x, y)
        if late is not None:
            b, _, yb, h1b = late
            a, h2, dx = true_input_arrives(l2, si, b, h1b, yb, need_dx=True,
                                           second_step=second_step)
            assert a.staleness == 1
            rel.append(a.rel_err)
            dz, loss, _ = out.train_step(h2, yb, need_dx=True)
            losses.append(loss)
            assert l2.receive(b, dz) and len(l2.apply_ready(need_dx=False)) == 1
            assert l1.receive(b, dx) and len(l1.apply_ready(need_dx=False)) == 1
        late = (t, x, y, h1)
    assert np.mean(rel[-50:]) < 1e-3 < rel[0]
    assert np.mean(losses[-50:]) < np.mean(losses[:50])
    assert test_loss() < start
    assert si.expire() == 1 and l2.clock == steps and l2.stats.sg_updates == steps - 1
