"""What a layer is made of besides its arrays, shared by the hidden and the
output layer: what every layer of a run computes with (``LayerSpec``), a
hidden layer's mode as a strategy object (``Synthetic``, ``TrueGradients``),
what it keeps of a batch in flight (``Pending``), its chances to update and
to lose a gradient (``Chance``), and its optimiser step (``descend``)."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class LayerSpec:
    """How a weight layer computes and steps: what every layer of a run shares."""
    activation: str = "sigmoid"
    norm: str = ""                     # "", "batch" or "layer": after x W + b
    dtype: np.dtype = np.dtype(np.float64)
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.0
    lr_staleness: float = 0.0          # --lr-staleness: lr / (1 + B*tau)
    grad_delay: int = 0                # --grad-delay: true gradients due K steps late


@dataclass(frozen=True)
class Synthetic:
    """dni and cdni: the layer steps at once on its SG module's prediction;
    a true gradient, when it comes, trains the module."""
    conditioned: bool                  # cdni: the module also sees the labels
    lr: float = 0.03
    hidden: tuple[int, ...] = ()       # the module's hidden ReLU widths
    refresh: bool = True               # --sg-refresh
    boost: float = 0.0                 # --sg-boost
    lookahead: float = 0.0             # --sg-lookahead

    uses_sg = True


@dataclass(frozen=True)
class TrueGradients:
    """backprop and async-backprop: the layer steps only on true gradients,
    computed from what its forward pass cached."""
    delay_comp: float = 0.0            # --delay-comp (async-backprop)

    uses_sg = False


Mode = Synthetic | TrueGradients


def mode_of(name: str, sg_lr: float = 0.03, sg_hidden: tuple[int, ...] = (),
            sg_refresh: bool = True, sg_boost: float = 0.0, sg_lookahead: float = 0.0,
            delay_comp: float = 0.0) -> Mode:
    """The strategy of a ``--mode`` name, with the options that mode reads."""
    if name in ("dni", "cdni"):
        return Synthetic(conditioned=name == "cdni", lr=sg_lr, hidden=tuple(sg_hidden),
                         refresh=sg_refresh, boost=sg_boost, lookahead=sg_lookahead)
    if name in ("backprop", "async-backprop"):
        return TrueGradients(delay_comp=delay_comp)
    raise ValueError(f"unknown mode {name!r}")


@dataclass
class Pending:
    """What a hidden layer keeps for a batch until its true gradient is applied."""
    clock: int                       # the layer's clock right after this batch's forward
    sent_at: float | None            # time of the forward pass (the caller's clock); None:
                                     # restored from a checkpoint
    act_norm: float = 0.0            # RMS over the batch of the per-example L2 norm of h
    x: np.ndarray | None = None      # backprop modes: input, for the weight gradient
    h: np.ndarray | None = None      # backprop modes: output, for f'(z)
    norm: tuple | None = None        # backprop modes with --batchnorm: the batch statistics
    sg_in: np.ndarray | None = None  # DNI: SG module input
    sg_pred: np.ndarray | None = None  # DNI: the synthetic gradient used
    sg_acts: list | None = None      # DNI: the SG module's layer inputs for that prediction
    sg_version: int = 0              # SG module version that made sg_pred; -1: the
                                     # extrapolated module made it (--sg-lookahead)
    then: dict | None = None         # --delay-comp: the weights the forward pass used

    @property
    def rows(self) -> int:
        return (self.h if self.h is not None else self.sg_in).shape[0]


@dataclass
class Step:
    """A hidden layer's training step between its phases: what ``begin``
    computed, for the phases after it (``synthetic_dx``, ``end``)."""
    batch: int
    x: np.ndarray
    h: np.ndarray
    cache: tuple | None
    y: np.ndarray | None
    now: float
    true_input: bool = False         # --unlock: the true input of a guessed batch
    dz: np.ndarray | None = None
    extra: dict = field(default_factory=dict)  # the normalisation's own gradients
    sg_in: np.ndarray | None = None
    pred: np.ndarray | None = None
    acts: list | None = None
    version: int = 0
    dx: np.ndarray | None = None


def since(now: float, then: float | None) -> float | None:
    """Seconds from ``then`` to ``now``; None where ``then`` is unknown (a
    batch restored from a checkpoint, whose forward pass ran before it)."""
    return None if then is None else now - then


class Chance:
    """Yes with probability p, from the layer's own stream (so enabling one
    kind of chance never shifts another's draws); no draw when p is 0 or 1."""

    def __init__(self, p: float, rng: np.random.Generator):
        self.p = p
        self.rng = rng

    def __call__(self) -> bool:
        if self.p >= 1.0:
            return True
        if self.p <= 0.0:
            return False
        return bool(self.rng.random() < self.p)


def flat(x: np.ndarray) -> np.ndarray:
    """A batch as rows of numbers: an image batch (N, H, W, C) as (N, H*W*C),
    a view (channels-last order); rows stay as they are."""
    return x if x.ndim == 2 else x.reshape(x.shape[0], -1)


def rms_norm(h: np.ndarray) -> float:
    """Root mean square over the batch of each example's L2 norm: how large
    the layer's activations are (they grow without bound when stale feedback
    destabilises a layer and its SG module). One dot product."""
    return float(np.sqrt(np.vdot(h, h) / h.shape[0]))


def descend(layer, grads: dict[str, np.ndarray], scale: float = 1.0) -> None:
    """One optimiser step on a layer's parameters (its step size times
    ``scale``), if its update chance says yes."""
    if layer.update():
        layer.opt.step(grads, scale)
        layer.step += 1
        layer.stats.weight_updates += 1
    else:
        layer.stats.skipped_updates += 1
