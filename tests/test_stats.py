"""Tests for pipeline.layers.stats (and sg_quality, the figures it aggregates): exact
tables for the per-epoch events and the whole-run counters, the reservoir's bounds."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.layers.stats import (Applied, EpochStats, InputApplied, InputEpoch, InputStats,
                                   LayerEpoch, LayerStats, Reservoir, Staleness, sg_quality)

pytestmark = pytest.mark.timeout(30)


# --- Reservoir ------------------------------------------------------------------------------

def test_empty_reservoir_describes_nothing():
    assert Reservoir(size=4).describe() is None


@pytest.mark.parametrize("size", [11, 12, 4096])  # at and below capacity
def test_reservoir_below_capacity_is_exact(size):
    r = Reservoir(size=size)
    for v in [7, 3, 11, 1, 5, 9, 2, 10, 4, 8, 6]:  # 1..11, shuffled
        r.add(float(v))
    # numpy's linear percentiles of 1..11: positions 1, 5 and 9 of the sorted list
    assert r.describe() == {"mean": 6.0, "p10": 2.0, "p50": 6.0, "p90": 10.0, "count": 11}


def test_reservoir_percentiles_interpolate():
    r = Reservoir(size=8)
    for v in (1.0, 3.0, 2.0, 4.0):
        r.add(v)
    d = r.describe()
    # sorted [1, 2, 3, 4]: positions 0.3, 1.5, 2.7
    assert d["p10"] == pytest.approx(1.3) and d["p50"] == pytest.approx(2.5)
    assert d["p90"] == pytest.approx(3.7) and d["mean"] == 2.5 and d["count"] == 4


def test_reservoir_past_capacity_keeps_bounded_memory_and_exact_mean():
    r = Reservoir(size=100, seed=3)
    nbytes = r.values.nbytes
    n = 20_000
    for v in range(n):
        r.add(float(v))
    assert r.values.nbytes == nbytes and len(r.values) == 100
    d = r.describe()
    assert d["count"] == n
    assert d["mean"] == (n - 1) / 2  # over every value seen, not the sample
    kept = r.values
    assert len(set(kept)) == 100 and kept.min() >= 0 and kept.max() < n  # samples of the stream
    assert kept.max() > 100  # not just the first 100: later values replaced some
    # a uniform sample of 0..n-1: its median lies well inside the range
    assert 0.25 * n < d["p50"] < 0.75 * n
    assert d["p10"] < d["p50"] < d["p90"]


def test_reservoir_is_reproducible_from_its_seed():
    def kept(seed):
        r = Reservoir(size=10, seed=seed)
        for v in range(1000):
            r.add(float(v))
        return r.values.copy()

    np.testing.assert_array_equal(kept(1), kept(1))
    assert not np.array_equal(kept(1), kept(2))


# --- LayerStats -------------------------------------------------------------------------------

APPLIED = [
    Applied(0, None, 2, 0.5, sg_loss=1.0, cosine=None, rel_err=1.0, act_norm=2.0),
    Applied(1, None, 0, 0.25, sg_loss=3.0, cosine=0.5, rel_err=0.5, act_norm=4.0),
    Applied(2, None, 2, 1.0, sg_loss=2.0, cosine=-0.5, rel_err=0.25, act_norm=1.0),
    Applied(3, None, 5, 0.25, sg_loss=4.0, cosine=1.0, rel_err=0.0, act_norm=9.0),
]


def test_layer_stats_as_dict_exact_table():
    st = LayerStats(seed=1)
    st.forward_batches, st.weight_updates, st.skipped_updates, st.sg_updates = 7, 5, 2, 4
    st.dropped_gradients, st.lost_gradients, st.expired_gradients = 1, 0, 2
    for a in APPLIED:
        st.record(a)
    d = st.as_dict()
    quality = d.pop("sg_quality")
    assert d == {
        "forward_batches": 7, "weight_updates": 5, "skipped_updates": 2, "sg_updates": 4,
        "true_gradients": 4, "dropped_gradients": 1, "lost_gradients": 0,
        "expired_gradients": 2, "staleness_steps": {"mean": 2.25, "max": 5, "count": 4},
        "staleness_hist": {"0": 1, "2": 2, "5": 1}, "staleness_s": {"mean": 0.5, "max": 1.0}}
    assert list(d["staleness_hist"]) == ["0", "2", "5"]  # ordered by staleness
    assert set(quality) == {"sg_loss", "cosine", "rel_err"}
    # sg_loss [1, 3, 2, 4]; cosine [0.5, -0.5, 1] (the undefined one left out);
    # rel_err [1, 0.5, 0.25, 0]
    want = {"sg_loss": (2.5, 1.3, 2.5, 3.7, 4), "cosine": (1 / 3, -0.3, 0.5, 0.9, 3),
            "rel_err": (0.4375, 0.075, 0.375, 0.85, 4)}
    for name, (mean, p10, p50, p90, count) in want.items():
        q = quality[name]
        assert q["count"] == count, name
        assert [q["mean"], q["p10"], q["p50"], q["p90"]] == \
            pytest.approx([mean, p10, p50, p90], rel=1e-12, abs=1e-15), name


def test_staleness_hist_keys_sort_numerically():
    st = LayerStats()
    for s in (10, 2, 2, 0, 10, 10):
        st.record(Applied(0, None, s, 0.0))
    assert list(st.as_dict()["staleness_hist"].items()) == [("0", 1), ("2", 2), ("10", 3)]


def test_layer_stats_without_sg_figures_has_no_quality():
    st = LayerStats()
    for s in (1, 3):
        st.record(Applied(s, object(), s, 0.5))  # a backprop layer's gradients
    d = st.as_dict()
    assert d["sg_quality"] is None
    assert d["staleness_steps"] == {"mean": 2.0, "max": 3, "count": 2}
    assert d["true_gradients"] == 2


def test_empty_layer_stats():
    d = LayerStats().as_dict()
    assert d["staleness_steps"] == {"mean": 0.0, "max": 0, "count": 0}
    assert d["staleness_hist"] == {} and d["staleness_s"] == {"mean": 0.0, "max": 0.0}
    assert d["sg_quality"] is None and d["true_gradients"] == 0


def test_staleness_running_figures():
    s = Staleness()
    assert s.as_dict() == {"mean": 0.0, "max": 0, "count": 0}
    for v in (3, 0, 1, 4):
        s.add(v)
    assert s.as_dict() == {"mean": 2.0, "max": 4, "count": 4}


# --- LayerEpoch -------------------------------------------------------------------------------

def test_layer_epoch_event_exact_and_resets():
    # Batches 0..3 are epoch 3 when an epoch has one batch... use 4 per epoch:
    # APPLIED's batches 0..3 all fall in the first epoch, "epoch": 1 (counted
    # from 1); batch 4 opens epoch 2.
    ep = LayerEpoch("layer2", batches_per_epoch=4)
    assert [ep.add(a, 12.5) for a in APPLIED] == [None] * 4
    e = ep.add(Applied(4, None, 1, 2.0), 12.5)  # a later epoch closes epoch 1
    assert e == pytest.approx({
        "event": "layer", "role": "layer2", "epoch": 1, "gradients": 4,
        "staleness_steps_mean": 2.25, "staleness_steps_max": 5,
        "staleness_s_mean": 0.5, "staleness_s_max": 1.0,
        "sg_loss": 2.5, "sg_cosine": 1 / 3, "sg_rel_err": 0.4375, "act_norm": 4.0,
        "elapsed_s": 12.5})
    assert e["staleness_steps_max"] == 5 and type(e["staleness_steps_max"]) is int
    # the next epoch starts from nothing, and flush closes it
    assert ep.flush(13.0) == {
        "event": "layer", "role": "layer2", "epoch": 2, "gradients": 1,
        "staleness_steps_mean": 1.0, "staleness_steps_max": 1,
        "staleness_s_mean": 2.0, "staleness_s_max": 2.0,
        "sg_loss": None, "sg_cosine": None, "sg_rel_err": None, "act_norm": None,
        "elapsed_s": 13.0}
    assert ep.flush(14.0) is None  # nothing since


def test_layer_epoch_skipped_epoch_gets_no_event():
    # Every gradient of epoch 2 was lost: epoch 1 closes when epoch 3 begins.
    ep = LayerEpoch("layer1", batches_per_epoch=2)
    assert ep.add(Applied(0, None, 0, 0.0), 1.0) is None
    e = ep.add(Applied(4, None, 0, 0.0), 2.0)
    assert (e["epoch"], e["gradients"]) == (1, 1)
    assert ep.flush(3.0)["epoch"] == 3


def test_layer_epoch_flush_with_no_gradients():
    assert LayerEpoch("layer1", 10).flush(1.0) is None


# --- EpochStats -------------------------------------------------------------------------------

def test_epoch_stats_event_weights_losses_by_batch_size():
    st = EpochStats()
    st.add(2.0, 3, 10)
    st.add(1.0, 5, 5)   # a short last batch
    e = st.epoch_event("output", 1, 4.0)
    assert e == {"event": "epoch", "role": "output", "epoch": 1, "loss": 25 / 15,
                 "accuracy": 8 / 15, "batches": 2, "elapsed_s": 4.0, "batches_per_s": 0.5}
    st.add(3.0, 1, 2)
    e = st.epoch_event("output", 2, 5.0)
    assert (e["loss"], e["accuracy"], e["batches"], e["batches_per_s"]) == (3.0, 0.5, 1, 1.0)


# --- sg_quality ---------------------------------------------------------------------------------

def test_sg_quality_hand_computed():
    pred = np.array([[1.0, 2.0], [3.0, 4.0]])
    true = np.array([[2.0, 0.0], [0.0, 1.0]])
    cosine, rel = sg_quality(pred, true)
    # <pred, true> = 2 + 4 = 6; |pred|^2 = 30; |true|^2 = 5; |pred - true|^2 = 1 + 4 + 9 + 9
    assert cosine == pytest.approx(6 / math.sqrt(150), rel=1e-15)
    assert rel == pytest.approx(math.sqrt(23 / 5), rel=1e-15)


@pytest.mark.parametrize("pred, true, want", [
    ([[1.0, -2.0]], [[1.0, -2.0]], (1.0, 0.0)),
    ([[1.0, -2.0]], [[-1.0, 2.0]], (-1.0, 2.0)),
    ([[2.0, -4.0]], [[1.0, -2.0]], (1.0, 1.0)),
    ([[1.0, 0.0]], [[0.0, 3.0]], (0.0, math.sqrt(10) / 3)),
    ([[0.0, 0.0]], [[0.0, 3.0]], (None, 1.0)),       # zero prediction: cosine undefined
    ([[1.0, 2.0]], [[0.0, 0.0]], (None, None)),      # zero target: both undefined
    ([[0.0, 0.0]], [[0.0, 0.0]], (None, None)),
])
def test_sg_quality_cases(pred, true, want):
    cosine, rel = sg_quality(np.array(pred), np.array(true))
    for got, exp in zip((cosine, rel), want):
        if exp is None:
            assert got is None
        else:
            assert got == pytest.approx(exp, rel=1e-15, abs=1e-15)
    assert cosine is None or type(cosine) is float
    assert rel is None or type(rel) is float


# --- --unlock forward: true inputs -------------------------------------------------------

INPUTS = [InputApplied(0, 2, 1.0, None, 1.0), InputApplied(1, 2, 3.0, 0.5, 0.5),
          InputApplied(2, 1, 2.0, -0.5, 0.25), InputApplied(3, 0, 4.0, 1.0, 0.0)]


def test_input_stats_exact_table_and_its_checkpoint_state():
    st = LayerStats(seed=1)
    assert "si_quality" not in st.as_dict()          # a locked layer says nothing of inputs
    st.inputs = InputStats(seed=1)
    for a in INPUTS:
        st.inputs.record(a)
    st.inputs.expired_inputs = 1
    d = st.as_dict()
    quality = d.pop("si_quality")
    assert {k: d[k] for k in ("true_inputs", "expired_inputs", "input_staleness_steps",
                              "input_staleness_hist")} == {
        "true_inputs": 4, "expired_inputs": 1,
        "input_staleness_steps": {"mean": 1.25, "max": 2, "count": 4},
        "input_staleness_hist": {"0": 1, "1": 1, "2": 2}}
    # the same figures as the SG table above: loss [1, 3, 2, 4], cosine [0.5, -0.5, 1]
    want = {"si_loss": (2.5, 4), "cosine": (1 / 3, 3), "rel_err": (0.4375, 4)}
    for name, (mean, count) in want.items():
        assert quality[name]["mean"] == pytest.approx(mean, rel=1e-12)
        assert quality[name]["count"] == count
    back = LayerStats(seed=1)
    back.inputs = InputStats(seed=1)
    back.load_state(st.state())
    assert back.inputs.as_dict()["input_staleness_steps"] == d["input_staleness_steps"]
    assert (back.inputs.true_inputs, back.inputs.expired_inputs) == (4, 1)


def test_input_epoch_means_and_nothing_without_an_input():
    e = InputEpoch()
    assert e.take() == {}
    for a in INPUTS:
        e.add(a)
    assert e.take() == pytest.approx({"si_loss": 2.5, "si_cosine": 1 / 3, "si_rel_err": 0.4375,
                                      "input_staleness_mean": 1.25})
    assert e.take() == {}
