"""Tests for pipeline.schedule: the admission rule and the epoch arithmetic against exact tables,
and the admission rule driving a real layer."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import MODES, Config
from pipeline.nodes import HiddenLayer
from pipeline.schedule import ends_epoch, epoch_of, may_take_batch

pytestmark = pytest.mark.timeout(30)

# (pending, due_outstanding, max_inflight, grad_delay) -> may the layer take a batch?
#   locked backprop:   only with nothing pending (the gradient of t before t+1);
#   --lockstep:        only with no due gradient outstanding;
#   free-running:      while pending < grad_delay + max_inflight.
# Rows are states a layer can be in: due <= pending - grad_delay, and with no
# delay every pending batch is due (an arrived one is applied at once).
ADMIT = {
    # pending, due, inflight, delay: backprop, lockstep, free
    (0, 0, 1, 0): (True, True, True),
    (1, 1, 1, 0): (False, False, False),
    (0, 0, 8, 0): (True, True, True),
    (1, 1, 8, 0): (False, False, True),
    (7, 7, 8, 0): (False, False, True),
    (8, 8, 8, 0): (False, False, False),
    (9, 9, 8, 0): (False, False, False),
    (1, 0, 1, 1): (False, True, True),
    (2, 0, 1, 1): (False, True, False),    # lockstep may run past max_inflight + delay:
    (2, 1, 1, 1): (False, False, False),   # nothing due is outstanding there
    (2, 0, 2, 3): (False, True, True),
    (3, 0, 2, 3): (False, True, True),
    (4, 1, 2, 3): (False, False, True),
    (5, 0, 2, 3): (False, True, False),
    (5, 2, 2, 3): (False, False, False),
    (9, 2, 8, 3): (False, False, True),
    (10, 0, 8, 3): (False, True, True),
    (11, 0, 8, 3): (False, True, False),
}

TABLE = []
for (pending, due, max_inflight, delay), (bp, lock, free) in ADMIT.items():
    for mode in MODES:
        for lockstep in (False, True):
            want = bp if mode == "backprop" else lock if lockstep else free
            TABLE.append((mode, lockstep, pending, due, max_inflight, delay, want))


def test_table_covers_every_mode():
    assert set(MODES) == {"backprop", "async-backprop", "dni", "cdni"}
    assert len(TABLE) == len(ADMIT) * len(MODES) * 2


@pytest.mark.parametrize("mode, lockstep, pending, due, max_inflight, delay, want", TABLE)
def test_may_take_batch(mode, lockstep, pending, due, max_inflight, delay, want):
    assert may_take_batch(mode=mode, lockstep=lockstep, pending=pending, due_outstanding=due,
                          max_inflight=max_inflight, grad_delay=delay) is want


def _layer(mode: str, delay: int) -> HiddenLayer:
    return HiddenLayer(1, 3, 4, mode=mode, activation="sigmoid", lr=0.1, sg_lr=0.01,
                       label_dim=2, rng=np.random.default_rng(0), grad_delay=delay)


def _may_take(layer: HiddenLayer, lockstep: bool, max_inflight: int) -> bool:
    return may_take_batch(mode=layer.mode, lockstep=lockstep, pending=len(layer.pending),
                          due_outstanding=layer.due_outstanding(),
                          max_inflight=max_inflight, grad_delay=layer.grad_delay)


X, Y = np.ones((2, 3)), np.zeros((2, 2))


@pytest.mark.parametrize("mode", ["dni", "cdni", "async-backprop"])
@pytest.mark.parametrize("delay", [0, 1, 3])
def test_free_running_admits_exactly_delay_plus_max_inflight(mode, delay):
    # Forward only, no gradient returns: how many batches does a layer take?
    for max_inflight in (1, 2, 8):
        layer = _layer(mode, delay)
        while _may_take(layer, False, max_inflight):
            layer.forward(layer.clock, X, Y, need_dx=True)
            assert layer.clock <= 100
        assert layer.clock == delay + max_inflight


@pytest.mark.parametrize("mode, delay, lockstep", [
    ("backprop", 0, False), ("backprop", 0, True), ("dni", 0, True), ("dni", 2, True),
    ("cdni", 3, True), ("async-backprop", 0, True), ("async-backprop", 2, True)])
def test_locked_layer_without_gradients_admits_delay_plus_one(mode, delay, lockstep):
    layer = _layer(mode, delay)
    while _may_take(layer, lockstep, max_inflight=8):
        layer.forward(layer.clock, X, Y, need_dx=True)
        assert layer.clock <= 100
    assert layer.clock == delay + 1  # the first batch falls due, and has not come
    assert layer.due_outstanding() == 1


@pytest.mark.parametrize("mode, delay", [("backprop", 0), ("dni", 0), ("dni", 1), ("cdni", 2),
                                         ("async-backprop", 0), ("async-backprop", 3)])
def test_lockstep_applies_every_gradient_exactly_delay_steps_late(mode, delay):
    # A driver that takes a batch whenever the rule allows and otherwise
    # delivers the oldest due gradient, until every due gradient is in (as a
    # worker ends): every staleness is exactly the delay.
    layer = _layer(mode, delay)
    staleness, batches = [], 12
    while layer.clock < batches or layer.due_outstanding():
        if layer.clock < batches and _may_take(layer, lockstep=True, max_inflight=8):
            layer.forward(layer.clock, X, Y, need_dx=True)
        else:
            oldest = min(b for b in layer.pending if b not in layer.arrived)
            assert layer.receive(oldest, np.full((2, 4), 0.01))
        staleness += [a.staleness for a in layer.apply_ready(need_dx=True)]
    assert staleness == [delay] * (batches - delay)
    assert len(layer.pending) == delay  # the last ``delay`` batches are not due yet


# batch -> (epoch, ends its epoch?) for a few epoch lengths
EPOCHS = {
    1: {0: (0, True), 1: (1, True), 2: (2, True), 7: (7, True)},
    3: {0: (0, False), 1: (0, False), 2: (0, True), 3: (1, False), 4: (1, False),
        5: (1, True), 6: (2, False), 8: (2, True), 9: (3, False)},
    10: {0: (0, False), 9: (0, True), 10: (1, False), 19: (1, True), 20: (2, False),
         7999: (799, True), 7998: (799, False)},
}
EPOCH_TABLE = [(bpe, batch, ep, end) for bpe, rows in EPOCHS.items()
               for batch, (ep, end) in rows.items()]


@pytest.mark.parametrize("bpe, batch, epoch, ends", EPOCH_TABLE)
def test_epoch_of_and_ends_epoch(bpe, batch, epoch, ends):
    assert epoch_of(batch, bpe) == epoch
    assert ends_epoch(batch, bpe) is ends


@pytest.mark.parametrize("examples, batch_size, epochs, bpe",
                         [(100, 10, 800, 10), (25, 10, 3, 3), (7, 7, 2, 1), (1, 4, 5, 1),
                          (30, 7, 4, 5)])
def test_every_epoch_ends_exactly_once_over_a_run(examples, batch_size, epochs, bpe):
    cfg = Config(examples=examples, batch_size=batch_size, epochs=epochs)
    assert cfg.batches_per_epoch == bpe
    assert cfg.total_batches == epochs * bpe
    ends = [t for t in range(cfg.total_batches) if ends_epoch(t, bpe)]
    assert ends == [(e + 1) * bpe - 1 for e in range(epochs)]
    assert [epoch_of(t, bpe) for t in range(cfg.total_batches)] == \
        [e for e in range(epochs) for _ in range(bpe)]
