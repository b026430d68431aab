"""Test shorthand: a hidden layer from the command line's option names, as
the tests describe their layers (the library takes a LayerSpec and a mode
strategy, built from a Config by ``pipeline.layers.build``)."""
from __future__ import annotations

import numpy as np

from pipeline.layers.common import Chance, LayerSpec, mode_of
from pipeline.layers.hidden import HiddenLayer


def hidden_layer(index: int, fan_in: int, fan_out: int, *, mode: str, activation: str,
                 lr: float, sg_lr: float, label_dim: int, rng: np.random.Generator,
                 grad_delay: int = 0, update: Chance | None = None, drop: Chance | None = None,
                 dtype=np.float64, optimizer: str = "sgd", sg_hidden: tuple[int, ...] = (),
                 batchnorm: bool = False, layernorm: bool = False, sg_refresh: bool = True,
                 momentum: float = 0.0, sg_boost: float = 0.0, lr_staleness: float = 0.0,
                 sg_lookahead: float = 0.0, delay_comp: float = 0.0) -> HiddenLayer:
    if batchnorm and layernorm:
        raise ValueError("batch norm and layer norm are exclusive")
    spec = LayerSpec(activation=activation, norm="batch" if batchnorm else
                     "layer" if layernorm else "", dtype=np.dtype(dtype), optimizer=optimizer,
                     lr=lr, momentum=momentum, lr_staleness=lr_staleness,
                     grad_delay=grad_delay)
    return HiddenLayer(index, fan_in, fan_out, spec=spec,
                       mode=mode_of(mode, sg_lr=sg_lr, sg_hidden=sg_hidden,
                                    sg_refresh=sg_refresh, sg_boost=sg_boost,
                                    sg_lookahead=sg_lookahead, delay_comp=delay_comp),
                       label_dim=label_dim, rng=rng, update=update, drop=drop)


# --- complete unlock: a layer's phases back to back, as its node runs them -------------

def _with(layer, si):
    """``layer`` stepping with the synthetic-input model ``si`` (a test may
    keep the two apart); the previous model is returned to put back."""
    before, layer.si = layer.si, si
    return before


def synthetic_forward(layer: HiddenLayer, si, batch: int, x, y, now: float = 0.0):
    """The synthetic step of an unlocked hidden layer: its synthetic h."""
    before = _with(layer, si)
    try:
        return layer.synthetic_step(batch, x, y, now)
    finally:
        layer.si = before


def true_input_arrives(layer: HiddenLayer, si, batch: int, h_prev, y, need_dx: bool,
                       second_step: bool = False):
    """The true input of a guessed batch: (the input model's regression, h, dx)."""
    before = _with(layer, si)
    try:
        h = layer.begin_true(batch, h_prev, y)
        dx = layer.synthetic_dx(need_dx)
        return layer.end_true(second_step), h, dx
    finally:
        layer.si = before


def synthetic_output_step(out, si, batch: int, x, y) -> float:
    before = _with(out, si)
    try:
        return out.synthetic_step(batch, x, y)
    finally:
        out.si = before


def true_output_input(out, si, batch: int, h_prev, y, need_dx: bool,
                      second_step: bool = False):
    before = _with(out, si)
    try:
        return out.true_input(batch, h_prev, y, need_dx, second_step)
    finally:
        out.si = before


def reference(cfg, **kw):
    """The in-process reference trained on ``cfg``'s own data."""
    from pipeline.data import tasks
    from pipeline.nodes.reference import train_reference
    return train_reference(cfg, tasks.load(cfg), **kw)
