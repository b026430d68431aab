"""Builds each layer of a run from the config: the same seeds in every process."""
from __future__ import annotations

from enum import IntEnum

import numpy as np

from pipeline.config import Config
from pipeline.layers.common import Chance, LayerSpec, Mode, mode_of
from pipeline.layers.conv import ConvLayer
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.output import OutputLayer
from pipeline.layers.stats import InputStats
from pipeline.layers.input_model import InputPredictor


class Stream(IntEnum):
    """A layer's random streams, one per purpose, so that turning one on
    never shifts another's draws."""
    INIT = 0        # initial weights (and an SG module's hidden layers)
    UPDATE = 1      # --update-prob: does this update happen?
    DROP = 2        # --drop-prob: is this true gradient lost?
    GRAD_LINK = 3   # --link-delay jitter on the gradient link into the layer
    ACT_LINK = 4    # --delay-activations jitter on its activation link


def layer_rng(cfg: Config, index: int, purpose: Stream = Stream.INIT) -> np.random.Generator:
    """Layer ``index``'s random stream for ``purpose``."""
    return np.random.default_rng([cfg.seed, 0x1A7E, index, int(purpose)])


def layer_spec(cfg: Config) -> LayerSpec:
    """What every hidden layer of ``cfg`` computes with and how it steps."""
    norm = "batch" if cfg.batchnorm else "layer" if cfg.layernorm else ""
    return LayerSpec(activation=cfg.activation, norm=norm, dtype=cfg.np_dtype,
                     optimizer=cfg.optimizer, lr=cfg.lr, momentum=cfg.momentum,
                     lr_staleness=cfg.lr_staleness, grad_delay=cfg.grad_delay)


def layer_mode(cfg: Config) -> Mode:
    """The hidden layers' strategy for ``cfg.mode``."""
    return mode_of(cfg.mode, sg_lr=cfg.sg_lr, sg_hidden=cfg.sg_hidden,
                   sg_refresh=cfg.sg_refresh, sg_boost=cfg.sg_boost,
                   sg_lookahead=cfg.sg_lookahead, delay_comp=cfg.delay_comp)


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


def _updates(cfg: Config, index: int) -> Chance:
    """Does layer ``index`` apply an update: never if frozen (``--freeze``),
    else with ``--update-prob``."""
    return Chance(0.0 if index in cfg.freeze else cfg.update_prob,
                  layer_rng(cfg, index, Stream.UPDATE))


def make_hidden(cfg: Config, index: int) -> HiddenLayer:
    """Hidden layer ``index``: convolutional for the first ``len(cfg.conv)``,
    dense after them."""
    d = cfg.dims
    common = dict(spec=layer_spec(cfg), mode=layer_mode(cfg), label_dim=d[-1],
                  rng=layer_rng(cfg, index, Stream.INIT),
                  update=_updates(cfg, index),
                  drop=Chance(cfg.drop_prob, layer_rng(cfg, index, Stream.DROP)))
    if index <= len(cfg.conv):
        layer = ConvLayer(index, cfg.conv_shapes()[index - 1], cfg.conv[index - 1],
                          cfg.kernel, **common)
    else:
        layer = HiddenLayer(index, d[index - 1], d[index], **common)
    _unlock(layer, cfg, index)
    return layer


def make_output(cfg: Config) -> OutputLayer:
    d = cfg.dims
    n = cfg.layers
    out = OutputLayer(n, d[-2], d[-1], lr=cfg.lr, rng=layer_rng(cfg, n, Stream.INIT),
                      update=_updates(cfg, n),
                      dtype=cfg.np_dtype, optimizer=cfg.optimizer,
                      softmax=cfg.classification, momentum=cfg.momentum)
    _unlock(out, cfg, n)
    out.si_scale = cfg.si_output_scale
    return out


def _unlock(layer: HiddenLayer | OutputLayer, cfg: Config, index: int) -> None:
    layer.si = make_input_model(cfg, index)
    if layer.si is not None:
        layer.stats.inputs = InputStats(seed=index)
