"""Tests for pipeline.nodes.schedule: every rule against exact tables (the rules
driving real nodes are tested in test_driver)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.config import MODES, Config
from pipeline.math.staleness import due_outstanding, is_due
from pipeline.nodes.schedule import (Reads, barrier_passes, checkpoint_due, ends_epoch,
                                     epoch_of, finished, input_owed, input_stop, input_stream,
                                     may_read, may_take_batch, stream, unlocked_reads)

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


@pytest.mark.parametrize("mode, lockstep, pending, due, max_inflight, delay, want", TABLE)
def test_may_take_batch(mode, lockstep, pending, due, max_inflight, delay, want):
    assert may_take_batch(mode=mode, lockstep=lockstep, pending=pending, due_outstanding=due,
                          max_inflight=max_inflight, grad_delay=delay) is want


# (clock, batch clock, delay) -> due?
DUE = [(5, 5, 0, True), (5, 5, 1, False), (6, 5, 1, True), (7, 5, 3, False), (8, 5, 3, True),
       (20, 5, 3, True)]


@pytest.mark.parametrize("clock, batch_clock, delay, want", DUE)
def test_is_due(clock, batch_clock, delay, want):
    assert is_due(clock, batch_clock, delay) is want


def test_due_outstanding_counts_due_batches_not_arrived():
    # batch -> the clock right after its forward pass; the layer's clock is 10
    pending = {b: SimpleNamespace(clock=c) for b, c in {3: 4, 4: 5, 5: 6, 6: 7, 7: 8}.items()}
    assert due_outstanding(10, pending, set(), 0) == 5
    assert due_outstanding(10, pending, {3, 5}, 0) == 3
    assert due_outstanding(10, pending, set(), 3) == 4      # batches 3 to 6 (clocks 4 to 7)
    assert due_outstanding(10, pending, {4}, 3) == 3
    assert due_outstanding(10, pending, set(), 7) == 0
    assert due_outstanding(10, {}, set(), 0) == 0


@pytest.mark.parametrize("ended, barrier, take, want", [
    (False, False, True, True), (False, False, False, False), (True, False, True, False),
    (False, True, True, False), (True, True, True, False)])
def test_may_read(ended, barrier, take, want):
    assert may_read(stream_ended=ended, at_barrier=barrier, take=take) is want


@pytest.mark.parametrize("uses_sg, due, awaited, want", [
    (True, 0, 0, True), (True, 0, 2, False),     # DNI: every gradient in, due or not
    (True, 1, 1, False),
    (False, 0, 0, True), (False, 0, 2, True),    # backprop: the due ones only
    (False, 1, 1, False)])
def test_barrier_passes(uses_sg, due, awaited, want):
    assert barrier_passes(uses_sg=uses_sg, due_outstanding=due, awaited=awaited) is want


@pytest.mark.parametrize("ended, due, want", [(False, 0, False), (True, 1, False),
                                              (True, 0, True)])
def test_finished(ended, due, want):
    assert finished(stream_ended=ended, due_outstanding=due) is want


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


def test_the_data_stream_in_order_exact_table():
    from pipeline.nodes.schedule import Turn, stream
    c = SimpleNamespace(start_epoch=1, epochs=3, examples=5, batch_size=2, batches_per_epoch=3,
                        test_examples=3, checkpoint_every=1)
    assert list(stream(c)) == [
        Turn("act", 3, None, 2), Turn("act", 4, None, 2), Turn("act", 5, None, 1),
        Turn("eval", 0, 1, 2), Turn("eval", 1, 1, 1), Turn("checkpoint", 5, 1, 0),
        Turn("act", 6, None, 2), Turn("act", 7, None, 2), Turn("act", 8, None, 1),
        Turn("eval", 0, 2, 2), Turn("eval", 1, 2, 1),  # no barrier after the last epoch
        Turn("eval", 0, None, 2), Turn("eval", 1, None, 2), Turn("eval", 2, None, 1),
        Turn("eof", 9, None, 0)]


# --- --unlock forward ---------------------------------------------------------------

# (chain_kind, head_guessed, owed, inputs_left, take_batch, blocked, guesses)
#   -> (lockstep: (input, act), free-running with input_delay 1, max_inflight 2: (input, act))
READS = {
    # the chain's next true input was not guessed yet: a synthetic step first
    ("act", False, False, True, True, False, 0): ((True, False), (True, False)),
    # guessed, not owed yet (input_delay steps have not passed): more synthetic steps
    ("act", True, False, True, True, False, 1): ((True, False), (True, False)),
    # owed: lockstep takes the true input first; free-running may do either
    ("act", True, True, True, True, False, 3): ((False, True), (False, True)),
    ("act", True, True, True, True, False, 1): ((False, True), (True, True)),
    # the gradient rule holds new batches back: only the chain, when owed
    ("act", True, False, True, False, False, 1): ((False, False), (False, False)),
    ("act", True, True, True, False, False, 1): ((False, True), (False, True)),
    # no synthetic step may come before the barrier or the end: the true
    # inputs held are owed at once
    ("act", True, True, False, True, False, 1): ((False, True), (False, True)),
    ("act", False, False, False, True, False, 0): ((False, False), (False, False)),
    # evaluation batches, a barrier, the end: taken as they come, before
    # the next synthetic step under lockstep
    ("eval", False, False, True, True, False, 0): ((False, True), (True, True)),
    ("checkpoint", False, False, False, True, False, 0): ((False, True), (False, True)),
    ("eof", False, False, False, True, False, 0): ((False, True), (False, True)),
    # at a checkpoint barrier, waiting for its gradients: no synthetic step
    ("act", False, False, True, True, True, 0): ((False, False), (False, False)),
    # the chain has ended
    (None, False, False, False, True, False, 0): ((False, False), (False, False)),
    # free-running: input_delay + max_inflight = 3 guesses at most
    ("act", True, False, True, True, False, 2): ((True, False), (True, False)),
    ("act", True, False, True, True, False, 3): ((True, False), (False, False)),
}


@pytest.mark.parametrize("state, want", READS.items(), ids=[str(k) for k in READS])
def test_unlocked_reads_exact_table(state, want):
    kind, guessed, owed, left, take, blocked, guesses = state
    for lockstep, expected in zip((True, False), want):
        got = unlocked_reads(lockstep=lockstep, chain_kind=kind, head_guessed=guessed,
                             owed=owed, inputs_left=left, take_batch=take, blocked=blocked,
                             guesses=guesses, input_delay=1, max_inflight=2)
        assert got == Reads(*expected), (lockstep, got)


@pytest.mark.parametrize("clock, oldest, delay, left, want", [
    (5, None, 0, True, False), (5, None, 0, False, False),   # nothing waits
    (5, 5, 0, True, True), (5, 5, 1, True, False), (6, 5, 1, True, True),
    (7, 5, 3, True, False), (8, 5, 3, True, True), (9, 5, 3, True, True),
    (5, 5, 3, False, True),                                   # the barrier: owed at once
])
def test_input_owed(clock, oldest, delay, left, want):
    assert input_owed(clock=clock, oldest_guess_clock=oldest, input_delay=delay,
                      inputs_left=left) is want


# 3 batches per epoch (examples 7, batch 3), 5 epochs; batch -> input_stop
INPUT_STOP = {
    0: [14] * 15,                                            # no checkpoints: the run's end
    1: [2] * 3 + [5] * 3 + [8] * 3 + [11] * 3 + [14] * 3,    # after every epoch but the last
    2: [5] * 6 + [11] * 6 + [14] * 3,                        # after epochs 1 and 3
    4: [11] * 12 + [14] * 3,                                 # after epoch 3
    5: [14] * 15,                                            # never: the last epoch has none
}


@pytest.mark.parametrize("every, stops", INPUT_STOP.items())
def test_input_stop_exact_table(every, stops):
    cfg = Config(examples=7, batch_size=3, epochs=5, checkpoint_every=every)
    assert [input_stop(b, cfg) for b in range(15)] == stops
    # and against the barriers of the data stream itself
    barriers = [t.batch for t in stream(cfg) if t.kind == "checkpoint"] + [14]
    assert stops == [min(s for s in barriers if s >= b) for b in range(15)]
    assert all(checkpoint_due(b // 3, cfg) for b in set(stops) - {14})


def test_input_stream_is_the_training_batches_of_the_stream():
    cfg = Config(examples=5, batch_size=2, epochs=2, checkpoint_every=1, start_epoch=1)
    assert [tuple(t) for t in input_stream(cfg)] == [
        ("input", 3, None, 2), ("input", 4, None, 2), ("input", 5, None, 1)]
