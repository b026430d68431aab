"""Tests for pipeline.schedule: the admission rule and the epoch arithmetic against exact tables."""
from __future__ import annotations

import pytest

from pipeline.config import MODES, Config
from pipeline.schedule import ends_epoch, epoch_of, may_take_batch

pytestmark = pytest.mark.timeout(30)

# (pending, max_inflight) -> may a *locked* layer take a batch? (backprop, or any mode under --lockstep)
LOCKED = {
    (0, 1): True, (1, 1): False,
    (0, 8): True, (1, 8): False, (7, 8): False, (8, 8): False, (9, 8): False,
    (0, 2): True, (1, 2): False, (2, 2): False,
}
# ... and a free-running DNI layer: up to max_inflight batches in flight.
FREE = {
    (0, 1): True, (1, 1): False,
    (0, 8): True, (1, 8): True, (7, 8): True, (8, 8): False, (9, 8): False,
    (0, 2): True, (1, 2): True, (2, 2): False,
}

TABLE = []
for (pending, max_inflight), locked in LOCKED.items():
    for mode in MODES:
        for lockstep in (False, True):
            free_running = mode != "backprop" and not lockstep
            want = FREE[(pending, max_inflight)] if free_running else locked
            TABLE.append((mode, lockstep, pending, max_inflight, want))


def test_table_covers_every_mode():
    assert set(MODES) == {"backprop", "dni", "cdni"}
    assert len(TABLE) == len(LOCKED) * len(MODES) * 2


@pytest.mark.parametrize("mode, lockstep, pending, max_inflight, want", TABLE)
def test_may_take_batch(mode, lockstep, pending, max_inflight, want):
    assert may_take_batch(mode=mode, lockstep=lockstep, pending=pending,
                          max_inflight=max_inflight) is want


@pytest.mark.parametrize("mode", ["dni", "cdni"])
def test_free_running_dni_admits_exactly_max_inflight_batches(mode):
    # Forward only, no gradient returns: how many batches does the layer take?
    for max_inflight in (1, 2, 8):
        pending = 0
        while may_take_batch(mode=mode, lockstep=False, pending=pending, max_inflight=max_inflight):
            pending += 1
            assert pending <= 100
        assert pending == max_inflight


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
