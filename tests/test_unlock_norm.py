"""An unlocked layer (--unlock) with batch or layer normalisation, against
references written here: finite differences of the layer's true-input step
with the true batch's normalisation, and the running statistics of batch norm
by hand (they track true batches only, never a synthetic one)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import batchnorm as bn
from pipeline.layers.input_model import InputPredictor
from tests.kit import synthetic_forward, true_input_arrives
from tests.numeric import numeric_grad, ref_act
from tests.test_layernorm import B, FAN_IN, LABELS, normed_layer, off_the_kink, ref_ln

pytestmark = pytest.mark.timeout(60)

RTOL = 1e-6
ATOL = 1e-9
D0 = 3


def ref_bn(z, gamma, beta):
    """Batch norm with the batch's own statistics, written here."""
    return gamma * (z - z.mean(0)) / np.sqrt(z.var(0) + bn.EPS) + beta


REF = {"layernorm": ref_ln, "batchnorm": ref_bn}


def unlocked(norm: str, lr: float, seed: int):
    hl = normed_layer("cdni", "relu", lr, seed=seed, norm=norm)
    si = InputPredictor(D0, LABELS, FAN_IN, conditioned=True, lr=0.1)
    hl.si = si
    rng = np.random.default_rng(seed + 2)
    x0 = rng.standard_normal((B, D0))
    y = np.eye(LABELS)[rng.integers(0, LABELS, B)]
    return hl, si, x0, y, rng


@pytest.mark.parametrize("second_step", [False, True])
@pytest.mark.parametrize("norm", ["layernorm", "batchnorm"])
def test_true_input_step_is_the_finite_difference_gradient_with_normalisation(norm,
                                                                            second_step):
    # With the SG prediction g at the true h fixed, dx and the second step are
    # those of the surrogate mean_i <g_i, f(N(x_i W + b))> at the true input,
    # N with the true batch's statistics for batch norm.
    lr = 0.25
    hl, si, x0, y, rng = unlocked(norm, lr, seed=10)
    synthetic_forward(hl, si, 0, x0, y)
    step = hl.step
    p = {k: hl.weights()[k].copy() for k in ("w", "b", "gamma", "beta")}
    ref = REF[norm]
    h_prev = off_the_kink(rng, hl, lambda z: ref(z, p["gamma"], p["beta"]))

    def f(x_):
        return ref_act("relu", ref(x_ @ p["w"] + p["b"], p["gamma"], p["beta"]))

    g = np.hstack([f(h_prev), y]) @ hl.v + hl.c
    assert np.abs(g).min() > 1e-3  # the SG module was randomised: g tests something

    def surrogate():
        return float(np.sum(g * f(h_prev)) / B)

    want = {k: numeric_grad(surrogate, p[k]) for k in p}
    want_dx = B * numeric_grad(surrogate, h_prev)
    _, h, dx = true_input_arrives(hl, si, 0, h_prev, y, need_dx=True, second_step=second_step)
    np.testing.assert_allclose(h, f(h_prev), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(dx, want_dx, rtol=RTOL, atol=B * 10 * ATOL)  # B times a FD
    for k in p:
        moved = (p[k] - hl.weights()[k]) / lr
        if second_step:
            np.testing.assert_allclose(moved, want[k], rtol=RTOL, atol=ATOL, err_msg=k)
        else:
            np.testing.assert_array_equal(moved, 0.0)
    assert hl.step == step + second_step


def test_batch_norm_tracks_the_true_batches_only():
    hl, si, x0, y, rng = unlocked("batchnorm", 0.1, seed=20)
    live = hl.weights()
    mean0, var0 = live["bn_mean"].copy(), live["bn_var"].copy()
    synthetic_forward(hl, si, 0, x0, y)
    synthetic_forward(hl, si, 1, rng.standard_normal((B, D0)), y)
    np.testing.assert_array_equal(live["bn_mean"], mean0)  # synthetic batches: untouched
    np.testing.assert_array_equal(live["bn_var"], var0)
    h_prev = rng.standard_normal((B, FAN_IN))
    z = h_prev @ hl.w + hl.b  # the weights as they are when the true input comes
    true_input_arrives(hl, si, 0, h_prev, y, need_dx=False)
    np.testing.assert_allclose(live["bn_mean"], 0.9 * mean0 + 0.1 * z.mean(0), rtol=1e-12,
                               atol=1e-15)
    np.testing.assert_allclose(live["bn_var"], 0.9 * var0 + 0.1 * z.var(0, ddof=1),
                               rtol=1e-12)
