"""Builds each layer of a run from the config: the same seeds in every process."""
from __future__ import annotations

import numpy as np

from pipeline.config import Config
from pipeline.layers import Chance, HiddenLayer
from pipeline.output_layer import OutputLayer
from pipeline.stats import InputStats
from pipeline.synthetic_input import InputPredictor


def layer_rng(cfg: Config, index: int, purpose: int = 0) -> np.random.Generator:
    """A layer's own random stream; ``purpose`` keeps init, update and drop
    draws apart, so turning one on never shifts the others."""
    return np.random.default_rng([cfg.seed, 0x1A7E, index, purpose])


def make_input_model(cfg: Config, index: int) -> InputPredictor | None:
    """``--unlock``: layer ``index``'s synthetic-input model, from the
    network's input to its own (None for layer 1, fed by the source, and
    for a layer ``cfg.unlocks`` leaves locked). Conditioned on the labels as
    the mode's SG modules are, except at the output layer, which would read
    its targets off its own input."""
    if not cfg.unlocks(index):
        return None
    d = cfg.dims
    return InputPredictor(d[0], d[-1], d[index - 1],
                          conditioned=cfg.mode == "cdni" and index < cfg.layers,
                          dtype=cfg.np_dtype, optimizer=cfg.optimizer, lr=cfg.si_step,
                          momentum=cfg.momentum, refresh=cfg.sg_refresh)


def make_hidden(cfg: Config, index: int) -> HiddenLayer:
    layer = _hidden(cfg, index)
    _unlock(layer, cfg, index)
    return layer


def _unlock(layer: HiddenLayer | OutputLayer, cfg: Config, index: int) -> None:
    layer.si = make_input_model(cfg, index)
    if layer.si is not None:
        layer.stats.inputs = InputStats(seed=index)


def _hidden(cfg: Config, index: int) -> HiddenLayer:
    d = cfg.dims
    return HiddenLayer(index, d[index - 1], d[index], mode=cfg.mode,
                       activation=cfg.activation, lr=cfg.lr, sg_lr=cfg.sg_lr,
                       label_dim=d[-1], rng=layer_rng(cfg, index),
                       grad_delay=cfg.grad_delay,
                       update=Chance(cfg.update_prob, layer_rng(cfg, index, 1)),
                       drop=Chance(cfg.drop_prob, layer_rng(cfg, index, 2)),
                       dtype=cfg.np_dtype, optimizer=cfg.optimizer, sg_hidden=cfg.sg_hidden,
                       batchnorm=cfg.batchnorm, layernorm=cfg.layernorm,
                       sg_refresh=cfg.sg_refresh,
                       momentum=cfg.momentum, sg_boost=cfg.sg_boost,
                       lr_staleness=cfg.lr_staleness, sg_lookahead=cfg.sg_lookahead,
                       delay_comp=cfg.delay_comp)


def make_output(cfg: Config) -> OutputLayer:
    d = cfg.dims
    n = cfg.layers
    out = OutputLayer(n, d[-2], d[-1], lr=cfg.lr, rng=layer_rng(cfg, n),
                      update=Chance(cfg.update_prob, layer_rng(cfg, n, 1)),
                      dtype=cfg.np_dtype, optimizer=cfg.optimizer,
                      softmax=cfg.classification, momentum=cfg.momentum)
    _unlock(out, cfg, n)
    return out
