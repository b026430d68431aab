"""A layer's checkpoint: its state as (meta, arrays), and back.

Taken at a checkpoint barrier, when no gradient is due, so the in-flight
cache holds only gradients not yet due (under --grad-delay); those are not
kept and count as expired after a resume. The run directory (``rundir``)
writes and reads the files; this module only turns a layer into them.
"""
from __future__ import annotations

import json

import numpy as np

from pipeline import optim
from pipeline.layers import Chance, HiddenLayer, OutputLayer

Layer = HiddenLayer | OutputLayer


def _rng_state(chance: Chance) -> str:
    # JSON text: the generator's 128-bit integers do not fit msgpack.
    return json.dumps(chance.rng.bit_generator.state)


def _optimizers(layer: Layer) -> dict[str, optim.SGD | optim.Adam]:
    out = {"opt": layer.opt}
    if getattr(layer, "sg", None) is not None:
        out["sg_opt"] = layer.sg.opt
    return out


def layer_state(layer: Layer) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays): weights, optimiser state (prefixed ``opt.`` and
    ``sg_opt.``), the SG module's drift (``sg_drift.``), counters, clocks and
    the random streams."""
    meta = {"clock": layer.clock, "step": layer.step, "stats": layer.stats.state(),
            "update_rng": _rng_state(layer.update)}
    # Copies: the arrays leave as zero-copy frames, sent while the layer
    # trains on and updates its weights in place.
    arrays = {k: v.copy() for k, v in layer.weights().items()}
    for prefix, opt in _optimizers(layer).items():
        opt_meta, opt_arrays = opt.state()
        meta[prefix] = opt_meta
        arrays.update({f"{prefix}.{k}": v for k, v in opt_arrays.items()})
    if isinstance(layer, HiddenLayer):
        meta.update(sg_version=layer.sg_version, drop_rng=_rng_state(layer.drop),
                    expired=len(layer.pending), tau_bar=layer.tau_bar)
        if layer.sg is not None and layer.sg.drift is not None:
            arrays.update({f"sg_drift.{k}": v.copy() for k, v in layer.sg.drift.items()})
    return meta, arrays


def load_layer_state(layer: Layer, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    live = layer.weights()
    for name, value in arrays.items():
        if "." not in name:
            live[name][...] = value  # optimiser state and drift carry a prefix
    for prefix, opt in _optimizers(layer).items():
        opt.load_state(meta.get(prefix, {}), {k.removeprefix(prefix + "."): v
                                              for k, v in arrays.items()
                                              if k.startswith(prefix + ".")})
    layer.clock, layer.step = int(meta["clock"]), int(meta["step"])
    layer.stats.load_state(meta["stats"])
    layer.update.rng.bit_generator.state = json.loads(meta["update_rng"])
    if isinstance(layer, HiddenLayer):
        if layer.sg is not None:
            layer.sg.version = int(meta["sg_version"])
            if layer.sg.drift is not None:
                for k, v in layer.sg.drift.items():
                    v[...] = arrays[f"sg_drift.{k}"]
        layer.tau_bar = float(meta.get("tau_bar", 0.0))
        layer.drop.rng.bit_generator.state = json.loads(meta["drop_rng"])
        layer.stats.expired_gradients += int(meta["expired"])
