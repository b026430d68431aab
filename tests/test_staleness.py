"""Tests for pipeline.math.staleness: each rule on an exact table worked out by hand."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.math import staleness

pytestmark = pytest.mark.timeout(10)


def test_running_staleness_on_an_exact_table():
    # tau_bar <- tau_bar + 0.1 * (tau - tau_bar), from 0
    taus = [0, 0, 10, 10, 0]
    want = [0.0, 0.0, 1.0, 1.9, 1.71]
    got, tau_bar = [], 0.0
    for tau in taus:
        tau_bar = staleness.track(tau_bar, tau)
        got.append(tau_bar)
    assert got == pytest.approx(want, abs=1e-12)
    assert got[:2] == [0.0, 0.0]  # exactly zero while nothing is stale
    # a constant staleness K is approached as K * (1 - 0.9^n)
    tau_bar = 0.0
    for _ in range(20):
        tau_bar = staleness.track(tau_bar, 8)
    assert tau_bar == pytest.approx(8 * (1 - 0.9 ** 20), rel=1e-12)


@pytest.mark.parametrize("tau, boost, want", [
    (0, 0.0, 1.0), (8, 0.0, 1.0), (0, 2.0, 1.0), (1, 0.5, 1.5), (8, 0.5, 5.0), (16, 1.0, 17.0)])
def test_sg_step_scale_table(tau, boost, want):
    assert staleness.sg_step_scale(tau, boost) == want


@pytest.mark.parametrize("tau, damping, want", [
    (0, 0.0, 1.0), (8, 0.0, 1.0), (0, 3.0, 1.0), (1, 1.0, 0.5), (3, 1.0, 0.25),
    (8, 0.25, 1 / 3), (2.5, 0.4, 0.5)])
def test_layer_step_scale_table(tau, damping, want):
    assert staleness.layer_step_scale(tau, damping) == pytest.approx(want, rel=1e-15)


def test_off_means_exactly_one():
    """At 0 the factor is exactly 1.0, so a step times it is the same bits."""
    lr = np.float32(1e-3) * 1.7
    for tau in (0, 1, 5.5, 16):
        assert staleness.sg_step_scale(tau, 0.0) == 1.0
        assert staleness.layer_step_scale(tau, 0.0) == 1.0
        assert lr * staleness.layer_step_scale(tau, 0.0) == lr


def test_drift_is_an_exponential_average_of_updates_in_place():
    d = np.zeros(2)
    same = staleness.drift(d, np.array([1.0, -2.0]))
    assert same is d
    np.testing.assert_allclose(d, [0.1, -0.2], rtol=1e-15)
    staleness.drift(d, np.array([1.0, -2.0]))
    np.testing.assert_allclose(d, [0.19, -0.38], rtol=1e-15)
    staleness.drift(d, np.array([0.0, 0.0]))
    np.testing.assert_allclose(d, [0.171, -0.342], rtol=1e-14)


def test_lookahead_extrapolates_along_the_drift():
    p, d = np.array([1.0, 2.0]), np.array([0.5, -0.25])
    np.testing.assert_array_equal(staleness.lookahead(p, d, 4.0), [3.0, 1.0])
    np.testing.assert_array_equal(staleness.lookahead(p, d, 0.0), p)
    np.testing.assert_array_equal(p, [1.0, 2.0])  # a new array; the parameter stays


def test_delay_compensation_is_dc_asgd_first_order_term():
    # g + lambda * g * g * (now - then), element by element
    g = np.array([2.0, -1.0, 0.0])
    now, then = np.array([1.0, 1.0, 5.0]), np.array([0.5, 3.0, 1.0])
    np.testing.assert_array_equal(staleness.compensate(g, now, then, 0.5),
                                  [2.0 + 0.5 * 4 * 0.5, -1.0 + 0.5 * 1 * -2.0, 0.0])
    np.testing.assert_array_equal(staleness.compensate(g, now, then, 0.0), g)
    np.testing.assert_array_equal(staleness.compensate(g, now, now, 3.0), g)
