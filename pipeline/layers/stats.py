"""Per-epoch accumulators that turn a stream of batches into metric events.

An event's ``epoch`` counts from 1, as the user does: the N-th epoch is
epoch N, its event written once N epochs are done (a batch's epoch index
from 0, ``batch // batches_per_epoch``, stays inside)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class EpochStats:
    loss_sum: float = 0.0     # sum over batches of batch-mean loss * batch size
    correct: int = 0
    examples: int = 0
    batches: int = 0
    last_elapsed: float = 0.0  # when the previous epoch ended, for throughput

    def add(self, batch_loss: float, correct: int, n: int) -> None:
        self.loss_sum += batch_loss * n
        self.correct += correct
        self.examples += n
        self.batches += 1

    def take(self) -> tuple[float, float, int]:
        """(mean loss, accuracy, batches) so far, and start afresh."""
        n = max(self.examples, 1)
        out = (self.loss_sum / n, self.correct / n, self.batches)
        self.loss_sum, self.correct, self.examples, self.batches = 0.0, 0, 0, 0
        return out

    def epoch_event(self, role: str, epoch: int, elapsed: float) -> dict:
        """The output layer's ``epoch`` (counted from 1): mean training loss and
        exact-match rate over the batches as they were trained (weights moving)."""
        loss, acc, batches = self.take()
        span, self.last_elapsed = elapsed - self.last_elapsed, elapsed
        return {"event": "epoch", "role": role, "epoch": epoch, "loss": loss,
                "accuracy": acc, "batches": batches, "elapsed_s": elapsed,
                "batches_per_s": batches / span if span > 0 else None}


@dataclass
class Applied:
    """One true gradient, as a layer applied it (or used it to train its SG module)."""
    batch: int
    dx: object                     # np.ndarray for upstream (backprop modes) or None
    staleness: int                 # layer steps between the batch's forward and now
    staleness_s: float | None      # seconds between the two (None: not known)
    sg_loss: float | None = None   # SG module's loss on this batch (DNI modes)
    cosine: float | None = None    # cosine(synthetic gradient used, true gradient)
    rel_err: float | None = None   # |synthetic - true| / |true|
    act_norm: float | None = None  # RMS of the per-example L2 norm of the layer's output h


@dataclass
class InputApplied:
    """One true input, as the predictor regressed onto it."""
    batch: int
    staleness: int          # forward staleness: layer steps between the guess and now
    loss: float             # the regression's loss (at the refreshed prediction)
    cosine: float | None    # cosine(synthetic input used, true input)
    rel_err: float | None   # |synthetic - true| / |true|


def _norm(a: np.ndarray) -> float:
    return float(np.sqrt(np.sum(a * a)))


def sg_quality(pred: np.ndarray, true: np.ndarray) -> tuple[float | None, float | None]:
    """Cosine similarity and relative L2 error of a synthetic gradient (or
    input) against the true one (None where a norm is zero and the figure
    is undefined)."""
    np_, nt = _norm(pred), _norm(true)
    cosine = float(np.sum(pred * true)) / (np_ * nt) if np_ > 0 and nt > 0 else None
    rel = _norm(pred - true) / nt if nt > 0 else None
    return cosine, rel


class Reservoir:
    """At most ``size`` samples of a stream, uniformly drawn (algorithm R), so
    a long run's percentiles cost constant memory."""

    def __init__(self, size: int = 4096, seed: int = 0):
        self.values = np.empty(size)
        self.seen = 0
        self.total = 0.0
        self._rng = np.random.default_rng(seed)

    def add(self, value: float) -> None:
        self.total += value
        size = len(self.values)
        if self.seen < size:
            self.values[self.seen] = value
        else:
            j = int(self._rng.integers(0, self.seen + 1))
            if j < size:
                self.values[j] = value
        self.seen += 1

    def describe(self) -> dict | None:
        if not self.seen:
            return None
        kept = self.values[:min(self.seen, len(self.values))]
        p10, p50, p90 = np.percentile(kept, [10, 50, 90])
        return {"mean": self.total / self.seen, "p10": float(p10), "p50": float(p50),
                "p90": float(p90), "count": self.seen}


class _Mean:
    __slots__ = ("total", "count", "max")

    def __init__(self) -> None:
        self.total, self.count, self.max = 0.0, 0, None

    def add(self, v: float | None) -> None:
        if v is None:
            return
        self.total += v
        self.count += 1
        self.max = v if self.max is None else max(self.max, v)

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


class LayerEpoch:
    """A hidden layer's applied gradients, grouped by the epoch of their
    batch -> one ``layer`` event per epoch, its ``epoch`` counted from 1
    (``self.epoch``: the open epoch's index from 0). An epoch is closed when a
    gradient of a later epoch is applied, or at the end (``flush``): its last
    batch's gradient may never come (dropped, or expired under a delay)."""

    def __init__(self, role: str, batches_per_epoch: int) -> None:
        self.role = role
        self.per_epoch = batches_per_epoch
        self.epoch: int | None = None
        self._reset()

    def _reset(self) -> None:
        self.steps, self.seconds = _Mean(), _Mean()
        self.sg_loss, self.cosine, self.rel_err = _Mean(), _Mean(), _Mean()
        self.act_norm = _Mean()
        self.inputs = InputEpoch()

    def add_input(self, a) -> None:
        """An unlocked layer's true input (``synthetic_input.InputApplied``):
        its figures go with the open epoch's event."""
        self.inputs.add(a)

    def add(self, a: Applied, elapsed: float) -> dict | None:
        """Count ``a``; returns the event of the epoch this closes, if any."""
        epoch = a.batch // self.per_epoch
        closed = self.flush(elapsed) if self.epoch is not None and epoch != self.epoch else None
        self.epoch = epoch
        self.steps.add(a.staleness)
        self.seconds.add(a.staleness_s)
        self.sg_loss.add(a.sg_loss)
        self.cosine.add(a.cosine)
        self.rel_err.add(a.rel_err)
        self.act_norm.add(a.act_norm)
        return closed

    def flush(self, elapsed: float) -> dict | None:
        """The open epoch's event (None if nothing was applied since)."""
        if self.epoch is None or not self.steps.count:
            return None
        e = {"event": "layer", "role": self.role, "epoch": self.epoch + 1,
             "gradients": self.steps.count,
             "staleness_steps_mean": self.steps.mean, "staleness_steps_max": self.steps.max,
             "staleness_s_mean": self.seconds.mean, "staleness_s_max": self.seconds.max,
             "sg_loss": self.sg_loss.mean, "sg_cosine": self.cosine.mean,
             "sg_rel_err": self.rel_err.mean, "act_norm": self.act_norm.mean,
             "elapsed_s": elapsed, **self.inputs.take()}
        self._reset()
        return e


class InputEpoch:
    """An unlocked layer's true inputs over one epoch: the mean quality of
    the synthetic inputs used and the mean forward staleness, for its event."""

    def __init__(self) -> None:
        self.loss, self.cosine, self.rel_err, self.steps = _Mean(), _Mean(), _Mean(), _Mean()

    def add(self, a) -> None:
        for mean, value in ((self.loss, a.loss), (self.cosine, a.cosine),
                            (self.rel_err, a.rel_err), (self.steps, a.staleness)):
            mean.add(value)

    def take(self) -> dict:
        """The figures so far (nothing without a true input), and start afresh."""
        if not self.steps.count:
            return {}
        out = {"si_loss": self.loss.mean, "si_cosine": self.cosine.mean,
               "si_rel_err": self.rel_err.mean, "input_staleness_mean": self.steps.mean}
        self.__init__()
        return out


@dataclass
class Staleness:
    """Running count, sum and max of staleness in layer steps."""
    count: int = 0
    total: int = 0
    max: int = 0

    def add(self, steps: int) -> None:
        self.count += 1
        self.total += steps
        self.max = max(self.max, steps)

    def as_dict(self) -> dict:
        mean = self.total / self.count if self.count else 0.0
        return {"mean": mean, "max": self.max, "count": self.count}


class LayerStats:
    """Whole-run counters of one layer, for summary.json."""

    def __init__(self, seed: int = 0) -> None:
        self.forward_batches = 0
        self.weight_updates = 0
        self.skipped_updates = 0     # updates not applied (--update-prob)
        self.sg_updates = 0
        self.true_gradients = 0      # gradients applied (or used to train the SG module)
        self.dropped_gradients = 0   # lost on the way here (--drop-prob)
        self.lost_gradients = 0      # never came: dropped further downstream
        self.expired_gradients = 0   # not yet due when training ended (--grad-delay)
        self.staleness_hist: dict[int, int] = {}
        self.steps = Staleness()
        self.seconds = _Mean()
        self.sg_loss = Reservoir(seed=seed)
        self.cosine = Reservoir(seed=seed + 1)
        self.rel_err = Reservoir(seed=seed + 2)
        self.inputs: InputStats | None = None  # --unlock forward: its true inputs

    def record(self, a: Applied) -> None:
        self.true_gradients += 1
        _count(self.staleness_hist, self.steps, a.staleness)
        self.seconds.add(a.staleness_s)
        for reservoir, value in ((self.sg_loss, a.sg_loss), (self.cosine, a.cosine),
                                 (self.rel_err, a.rel_err)):
            if value is not None:
                reservoir.add(value)

    COUNTERS = ("forward_batches", "weight_updates", "skipped_updates", "sg_updates",
                "true_gradients", "dropped_gradients", "lost_gradients", "expired_gradients")

    def state(self) -> dict:
        """What a checkpoint keeps: the counters and the staleness histogram
        (the SG-quality samples start afresh after a resume)."""
        out = {**{k: getattr(self, k) for k in self.COUNTERS},
               "staleness_hist": {str(k): v for k, v in self.staleness_hist.items()}}
        if self.inputs is not None:
            out["inputs"] = self.inputs.state()
        return out

    def load_state(self, state: dict) -> None:
        for k in self.COUNTERS:
            setattr(self, k, int(state[k]))
        self.staleness_hist, self.steps = _recount(state["staleness_hist"])
        if self.inputs is not None and "inputs" in state:
            self.inputs.load_state(state["inputs"])

    def as_dict(self) -> dict:
        quality = _quality(self.sg_loss, self.cosine, self.rel_err, "sg_loss")
        return {"forward_batches": self.forward_batches, "weight_updates": self.weight_updates,
                "skipped_updates": self.skipped_updates, "sg_updates": self.sg_updates,
                "true_gradients": self.true_gradients,
                "dropped_gradients": self.dropped_gradients,
                "lost_gradients": self.lost_gradients,
                "expired_gradients": self.expired_gradients,
                "staleness_steps": self.steps.as_dict(),
                "staleness_hist": {str(k): v for k, v in sorted(self.staleness_hist.items())},
                "staleness_s": {"mean": self.seconds.mean or 0.0, "max": self.seconds.max or 0.0},
                "sg_quality": quality, **(self.inputs.as_dict() if self.inputs else {})}


def _count(hist: dict[int, int], steps: Staleness, value: int) -> None:
    hist[value] = hist.get(value, 0) + 1
    steps.add(value)


def _recount(saved: dict) -> tuple[dict[int, int], Staleness]:
    """A histogram read back from a checkpoint, and its running figures."""
    hist, steps = {int(k): int(v) for k, v in saved.items()}, Staleness()
    for value, n in hist.items():
        steps.count += n
        steps.total += value * n
        steps.max = max(steps.max, value)
    return hist, steps


def _quality(loss: Reservoir, cosine: Reservoir, rel_err: Reservoir, name: str) -> dict | None:
    if not loss.seen:
        return None
    return {name: loss.describe(), "cosine": cosine.describe(), "rel_err": rel_err.describe()}


class InputStats:
    """An unlocked layer's true inputs (``--unlock forward``), as its
    synthetic-input model regressed onto them: how many, how many steps
    after the synthetic step each came (the forward staleness), and how
    close the synthetic input used was to the true one."""

    def __init__(self, seed: int = 0) -> None:
        self.true_inputs = 0
        self.expired_inputs = 0   # guesses whose true input never came (a run cut short)
        self.hist: dict[int, int] = {}
        self.steps = Staleness()
        self.si_loss = Reservoir(seed=seed + 3)
        self.cosine = Reservoir(seed=seed + 4)
        self.rel_err = Reservoir(seed=seed + 5)

    def record(self, a) -> None:
        """``a``: a ``synthetic_input.InputApplied``."""
        self.true_inputs += 1
        _count(self.hist, self.steps, a.staleness)
        for reservoir, value in ((self.si_loss, a.loss), (self.cosine, a.cosine),
                                 (self.rel_err, a.rel_err)):
            if value is not None:
                reservoir.add(value)

    def state(self) -> dict:
        return {"true_inputs": self.true_inputs, "expired_inputs": self.expired_inputs,
                "hist": {str(k): v for k, v in self.hist.items()}}

    def load_state(self, state: dict) -> None:
        self.true_inputs, self.expired_inputs = (int(state["true_inputs"]),
                                                 int(state["expired_inputs"]))
        self.hist, self.steps = _recount(state["hist"])

    def as_dict(self) -> dict:
        return {"true_inputs": self.true_inputs, "expired_inputs": self.expired_inputs,
                "input_staleness_steps": self.steps.as_dict(),
                "input_staleness_hist": {str(k): v for k, v in sorted(self.hist.items())},
                "si_quality": _quality(self.si_loss, self.cosine, self.rel_err, "si_loss")}
