"""Watches how well each layer's synthetic gradients track the true ones,
epoch by epoch, and says so when staleness has broken them.

It reads the ``layer`` events every run emits (the mean cosine and relative
error of the synthetic gradients a layer used, against the true gradients
that came back, and the staleness those came back with) and keeps, per
layer, the figures ``summary.json`` and the closing table report. Pure: no
I/O, no clock.

The figures are judged over windows of at least ``WINDOW`` gradients (one
epoch of MNIST at batch 256; twenty epochs of the addition task, whose
ten-batch epochs are too noisy alone). A window *collapses* when the
layer's synthetic gradients no longer pointed along the true ones (mean
cosine below ``COSINE_LIMIT``) and were more than three times the true
gradient's size away from it (relative error above ``REL_ERR_LIMIT``): a
step on them did harm. It warns only where the run's feedback was stale
(some layer's gradients ``MIN_STALENESS`` steps or more on average so far;
not necessarily the collapsing layer's own, since a module may collapse
with little staleness of its own while the layer below runs ahead): a
collapse with nothing stale is not this watch's to explain.

Neither figure alone will do, and the limits were set on the MNIST study
(docs/staleness-mnist.md, which counts how the warning fared on every run).
Healthy runs reach a relative error of 2.3 with a cosine of 0.4 (a module
late in a run, its true gradients shrunk into noise: free-running at batch
64), or a cosine of 0.06 at an error of 2.3 (the first epoch of a 6-layer
net's first module at K = 16, still learning: 97.4 % at the end), or hover
at a cosine of 0 and an error of 2 for the whole run (plain DNI's first
module, which never tracked). The runs that staleness wrecked (3 layers
without batch norm at K = 8) show windows of cosine 0.02 to 0.35 at errors
of 3.5 to 40 from the first epoch on. A slow loss to delay with no collapse
(plain DNI at K = 16, 3 points) is not flagged.
"""
from __future__ import annotations

from dataclasses import dataclass, field

WINDOW = 200
REL_ERR_LIMIT = 3.0
COSINE_LIMIT = 0.3
MIN_STALENESS = 0.5


def collapsed(cosine: float, rel_err: float | None, staleness: float) -> bool:
    """Did a window with this mean cosine and relative error lose the true
    gradient to staleness, in a run whose layers were up to ``staleness``
    steps stale?"""
    return (rel_err is not None and rel_err > REL_ERR_LIMIT and cosine < COSINE_LIMIT
            and staleness >= MIN_STALENESS)


def advice(cfg) -> str:
    """What to try, given what the run already uses."""
    tries = []
    if not cfg.batchnorm:
        tries.append("--batchnorm" + (" in place of --layernorm" if cfg.layernorm else ""))
    if not cfg.sg_lookahead:
        tries.append("--sg-lookahead 1")
    if not cfg.lockstep and cfg.max_inflight > 1:
        tries.append(f"a smaller --max-inflight (now {cfg.max_inflight})")
    if cfg.grad_delay:
        tries.append(f"a smaller --grad-delay (now {cfg.grad_delay})")
    if not tries:
        return "see docs/staleness.md"
    return "try " + ", ".join(tries[:-1]) + (" or " if len(tries) > 1 else "") + tries[-1] \
        + " (docs/staleness.md)"


def _growth(t: "Tracking") -> str:
    """A note of how far the activations grew, where they grew threefold or more."""
    if not t.first_act_norm or t.last_act_norm is None:
        return ""
    factor = t.last_act_norm / t.first_act_norm
    return f"; its activations grew {factor:.0f}-fold since the first epoch" if factor >= 3 else ""


@dataclass
class _Window:
    """Gradient-weighted sums of the epochs since the last judgement."""
    gradients: int = 0
    cosine: float = 0.0
    rel_err: float = 0.0
    rel_gradients: int = 0
    stale: float = 0.0

    def add(self, n: int, cosine: float, rel_err: float | None, stale: float) -> None:
        self.gradients += n
        self.cosine += n * cosine
        self.stale += n * stale
        if rel_err is not None:
            self.rel_err += n * rel_err
            self.rel_gradients += n

    def means(self) -> tuple[float, float | None, float]:
        rel = self.rel_err / self.rel_gradients if self.rel_gradients else None
        return self.cosine / self.gradients, rel, self.stale / self.gradients


@dataclass
class Tracking:
    """One layer's SG quality over the run: the first and last epoch's mean
    cosine, the best window's, and the first window that collapsed."""
    first_cosine: float | None = None
    last_cosine: float | None = None
    last_rel_err: float | None = None
    first_act_norm: float | None = None   # mean per-example |h| in the first and last epoch
    last_act_norm: float | None = None
    best_cosine: float | None = None      # over windows of >= WINDOW gradients
    # Epochs counted from 1, as the progress line and the events count them.
    best_epoch: int | None = None         # the last epoch of that window
    staleness_mean: float | None = None   # steps stale, mean over the gradients
    collapsed_epoch: int | None = None    # the last epoch of the first window that collapsed
    gradients: int = 0
    _stale_sum: float = field(default=0.0, repr=False)
    _window: _Window = field(default_factory=_Window, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class SGWatch:
    def __init__(self, cfg):
        self.cfg = cfg
        self.layers: dict[str, Tracking] = {}
        self.warnings: list[str] = []

    def add(self, event: dict) -> str | None:
        """Take one event; returns a warning the first time a layer's
        synthetic gradients collapse (and keeps it in ``warnings``)."""
        cosine = event.get("sg_cosine")
        if event.get("event") != "layer" or cosine is None:
            return None
        role, epoch, rel = event["role"], event["epoch"], event.get("sg_rel_err")
        n = int(event.get("gradients") or 0)
        stale = event.get("staleness_steps_mean") or 0.0
        t = self.layers.setdefault(role, Tracking())
        if t.first_cosine is None:
            t.first_cosine = cosine
        t.last_cosine, t.last_rel_err = cosine, rel
        norm = event.get("act_norm")
        if t.first_act_norm is None:
            t.first_act_norm = norm
        t.last_act_norm = norm
        t.gradients += n
        t._stale_sum += n * stale
        t.staleness_mean = t._stale_sum / t.gradients if t.gradients else None
        t._window.add(n, cosine, rel, stale)
        if t._window.gradients < WINDOW:
            return None
        w_cos, w_rel, w_stale = t._window.means()
        t._window = _Window()
        warning = None
        stalest = max(L.staleness_mean or 0.0 for L in self.layers.values())
        if t.collapsed_epoch is None and collapsed(w_cos, w_rel, stalest):
            t.collapsed_epoch = epoch
            warning = (f"warning: {role}'s synthetic gradients stopped tracking the true ones "
                       f"by epoch {epoch} (relative error {w_rel:.2f}, cosine {w_cos:.2f}"
                       + (f" against {t.best_cosine:.2f} at best" if t.best_cosine is not None
                          else "")
                       + f"; {w_stale:.1f} steps stale itself, the stalest layer {stalest:.1f}"
                       + _growth(t) + "): staleness is hurting this run; "
                       + advice(self.cfg))
            self.warnings.append(warning)
        if t.best_cosine is None or w_cos > t.best_cosine:
            t.best_cosine, t.best_epoch = w_cos, epoch
        return warning

    def tracking(self) -> dict[str, dict]:
        return {role: t.as_dict() for role, t in self.layers.items()}
