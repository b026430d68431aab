"""A layer's checkpoint: its state as (meta, arrays), and back, and the
checks a state must pass before any layer takes it.

Taken at a checkpoint barrier (``schedule.barrier_passes``). In the DNI
modes every gradient of the batches before it has arrived by then; those
not yet due (under --grad-delay) are kept with what the layer holds for
their batches, so a resume goes on exactly. In the backprop modes the ones
not yet due have not come; they are not kept and count as expired after a
resume. The run directory (``rundir``) writes the files and ``resume`` reads
them back; this module turns a layer into them and back, and checks every
array and field of a state against the run's layers.
"""
from __future__ import annotations

import json
import math

import numpy as np

from pipeline import limits
from pipeline.math import optim
from pipeline.layers.common import Chance, Pending
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.output import OutputLayer
from pipeline.wire.protocol import OUTPUT, is_count

Layer = HiddenLayer | OutputLayer


def _rng_state(chance: Chance) -> str:
    # JSON text: the generator's 128-bit integers do not fit msgpack.
    return json.dumps(chance.rng.bit_generator.state)


def _optimizers(layer: Layer) -> dict[str, optim.SGD | optim.Adam]:
    out = {"opt": layer.opt}
    if getattr(layer, "sg", None) is not None:
        out["sg_opt"] = layer.sg.opt
    if layer.si is not None:
        out["si_opt"] = layer.si.model.opt
    return out


def layer_state(layer: Layer) -> tuple[dict, dict[str, np.ndarray]]:
    """(meta, arrays): weights (with an unlocked layer's synthetic-input
    model, ``si_u`` and ``si_b``), optimiser state (prefixed ``opt.``,
    ``sg_opt.`` and ``si_opt.``), the SG module's drift (``sg_drift.``),
    counters, clocks, model versions and the random streams. An unlocked
    layer has no guess in flight at a barrier (``schedule.input_stop``)."""
    meta = {"clock": layer.clock, "step": layer.step, "stats": layer.stats.state(),
            "update_rng": _rng_state(layer.update)}
    if layer.si is not None:
        assert not layer.si.pending, "a checkpoint with a synthetic input in flight"
        meta["si_version"] = layer.si.model.version
    # Copies: the arrays leave as zero-copy frames, sent while the layer
    # trains on and updates its weights in place.
    arrays = {k: v.copy() for k, v in layer.weights().items()}
    for prefix, opt in _optimizers(layer).items():
        opt_meta, opt_arrays = opt.state()
        meta[prefix] = opt_meta
        arrays.update({f"{prefix}.{k}": v for k, v in opt_arrays.items()})
    if isinstance(layer, HiddenLayer):
        meta.update(sg_version=layer.sg_version, drop_rng=_rng_state(layer.drop),
                    tau_bar=layer.tau_bar)
        if layer.sg is not None and layer.sg.drift is not None:
            arrays.update({f"sg_drift.{k}": v.copy() for k, v in layer.sg.drift.items()})
        if layer.uses_sg:
            meta["expired"], meta["pending"] = 0, _save_pending(layer, arrays)
        else:
            meta["expired"] = len(layer.pending)
    return meta, arrays


def _save_pending(layer: HiddenLayer, arrays: dict[str, np.ndarray]) -> list[list]:
    """DNI: the batches whose gradient has arrived but is not yet due, each
    as [batch, clock, act_norm, sg_version, number of SG inputs] in the meta
    and its SG inputs, prediction and true gradient as ``pending.I.*``
    arrays (I: its place in the list)."""
    assert len(layer.arrived) == len(layer.pending), "a checkpoint awaiting a gradient"
    out = []
    for i, batch in enumerate(sorted(layer.pending)):
        p = layer.pending[batch]
        out.append([batch, p.clock, p.act_norm, p.sg_version, len(p.sg_acts)])
        arrays.update({f"pending.{i}.act{j}": a.copy() for j, a in enumerate(p.sg_acts)})
        arrays[f"pending.{i}.pred"] = p.sg_pred.copy()
        arrays[f"pending.{i}.grad"] = np.array(layer.arrived[batch])
    return out


def _load_pending(layer: HiddenLayer, entries: list, arrays: dict[str, np.ndarray]) -> None:
    """The inverse of ``_save_pending``, every array checked against the
    layer's widths (ValueError otherwise). Times are not kept: the seconds of
    staleness of these batches go unmeasured."""
    if not isinstance(entries, list):
        raise ValueError("'pending' must be a list")
    widths = layer.sg.input_shapes()
    out, dtype = tuple(layer.out_shape), layer.w.dtype
    used = set()
    for i, entry in enumerate(entries):
        batch, clock, act_norm, version, n = entry
        if not (is_count(batch) and is_count(clock) and clock <= layer.clock
                and n == len(widths) and batch not in layer.pending):
            raise ValueError(f"pending entry {i} is not [batch, clock, act_norm, version, "
                             f"{len(widths)}] of a batch before clock {layer.clock}: {entry!r}")
        acts = [arrays[f"pending.{i}.act{j}"] for j in range(n)]
        pred, grad = arrays[f"pending.{i}.pred"], arrays[f"pending.{i}.grad"]
        rows = pred.shape[0]
        shapes = [a.shape for a in acts] + [pred.shape, grad.shape]
        if (shapes != [(rows, *w) for w in widths] + [(rows, *out)] * 2
                or any(a.dtype != dtype for a in (*acts, pred, grad))):
            want = [list(w) for w in widths + [out, out]]
            raise ValueError(f"pending entry {i}: arrays of shapes {shapes}, not rows by "
                             f"{want} of {dtype}")
        used.update([f"pending.{i}.act{j}" for j in range(n)]
                    + [f"pending.{i}.pred", f"pending.{i}.grad"])
        layer.pending[batch] = Pending(clock, None, float(act_norm), sg_in=acts[0],
                                        sg_pred=pred, sg_acts=acts, sg_version=int(version))
        layer.arrived[batch] = grad
    extra = sorted(k for k in arrays if k.startswith("pending.") and k not in used)
    if extra:
        raise ValueError(f"arrays of no pending batch: {extra[:5]}")


def load_layer_state(layer: Layer, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    live = layer.weights()
    for name, value in arrays.items():
        if "." not in name:
            live[name][...] = value  # optimiser state, drift and pending batches carry a prefix
    for prefix, opt in _optimizers(layer).items():
        opt.load_state(meta.get(prefix, {}), {k.removeprefix(prefix + "."): v
                                              for k, v in arrays.items()
                                              if k.startswith(prefix + ".")})
    layer.clock, layer.step = int(meta["clock"]), int(meta["step"])
    layer.stats.load_state(meta["stats"])
    if layer.si is not None:
        layer.si.model.version = int(meta["si_version"])
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
        if layer.uses_sg:
            _load_pending(layer, meta.get("pending", []), arrays)


# --- checks of a checkpoint against the run ----------------------------------------------

def refuse(message: str) -> ValueError:
    return ValueError(f"argument --resume: {message}")


def _fresh_layer(cfg, role: str) -> Layer:
    """A new layer of this configuration for ``role``: the arrays to check against."""
    from pipeline.layers.build import make_hidden, make_output
    if role == OUTPUT:
        return make_output(cfg)
    return make_hidden(cfg, int(role.removeprefix("layer")))


def _check_arrays(where: str, role: str, arrays: dict[str, np.ndarray],
                  want: dict[str, np.ndarray]) -> None:
    """The same names as ``want``, each of the same shape and dtype."""
    if sorted(arrays) != sorted(want):
        raise refuse(f"{where}: {role} has arrays {sorted(arrays)}, this run's layer has "
                      f"{sorted(want)}")
    for name, a in arrays.items():
        if a.shape != want[name].shape or a.dtype != want[name].dtype:
            raise refuse(f"{where}: {role}.{name} is {a.dtype}{list(a.shape)}, the layer's "
                          f"is {want[name].dtype}{list(want[name].shape)}")


# A layer's state JSON, checked field by field against the state a fresh
# layer of the run writes: the same fields, each of the same kind.
OPTIONAL = frozenset({"tau_bar", "pending", "inputs"})  # loaded with a default when absent
HISTOGRAMS = frozenset({"staleness_hist", "hist"})     # {steps: batches}, any steps
RNG_MOST = 1 << 128                                    # a generator's state words


def _field(path: str, want: str, value) -> ValueError:
    return ValueError(f"{path or 'the state'} must be {want}, got {limits.shown(value)}")


def _numbers_carried(value, path: str = "") -> None:
    """Anywhere in the JSON: no inf or NaN, no integer beyond the wire's 64 bits."""
    if isinstance(value, float) and not math.isfinite(value):
        raise _field(path, "a finite number", value)
    if isinstance(value, int) and not -limits.WIRE_INT - 1 <= value <= limits.WIRE_INT:
        raise _field(path, "within 64 bits", value)
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        _numbers_carried(v, f"{path}.{k}" if path else str(k))


def _count(value, path: str, most: int = limits.MAX_COUNT) -> int:
    if not (is_count(value) and value <= most):
        raise _field(path, f"an integer in [0, {limits.say(most)}]", value)
    return value


def _real(value, path: str) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and 0 <= value <= limits.MAX_COUNT):
        raise _field(path, f"a finite number in [0, {limits.say(limits.MAX_COUNT)}]", value)


def _histogram(value, path: str) -> None:
    if not isinstance(value, dict):
        raise _field(path, "an object of {steps: count}", value)
    for k, n in value.items():
        if not (isinstance(k, str) and k.isascii() and k.isdigit()
                and int(k) <= limits.MAX_COUNT):
            raise _field(f"{path}.{k}", "a number of steps (the key)", k)
        _count(n, f"{path}.{k}")
    _count(sum(value.values()), f"the sum of {path}")


def _pending_entries(value, path: str) -> None:
    if not isinstance(value, list):
        raise _field(path, "a list", value)
    for i, entry in enumerate(value):
        if not (isinstance(entry, list) and len(entry) == 5):
            raise _field(f"{path}.{i}", "[batch, clock, act_norm, version, n]", entry)
        for j, name in enumerate(("batch", "clock", "act_norm", "version", "n")):
            (_real if name == "act_norm" else _count)(entry[j], f"{path}.{i}.{name}")


def _rng(value, like, path: str) -> None:
    """A generator's state as JSON text: the fields of this run's generator,
    each word an integer it can hold."""
    try:
        state = json.loads(value)
    except (TypeError, ValueError):
        raise _field(path, "a generator's state as JSON text", value) from None

    def same(v, w, at: str) -> None:
        if isinstance(w, dict):
            if not isinstance(v, dict) or sorted(v) != sorted(w):
                raise _field(at, f"an object of {sorted(w)}", v)
            for k in w:
                same(v[k], w[k], f"{at}.{k}")
        elif isinstance(w, str):
            if v != w:
                raise _field(at, repr(w), v)
        else:
            _count(v, at, RNG_MOST - 1)
    same(state, json.loads(like), path)


def check_meta(meta, like: dict) -> None:
    """ValueError naming the first field of a layer's state JSON that is not
    what ``like`` (a fresh layer's state) has: every field it has (but
    ``OPTIONAL``), no other, and each of its kind: counts within
    ``limits.MAX_COUNT``, finite non-negative numbers, generator states.
    Then, whatever the fields, no number anywhere the wire cannot carry."""
    _like(meta, like, "")
    _numbers_carried(meta)


def _like(meta, like: dict, path: str) -> None:
    if not isinstance(meta, dict):
        raise _field(path, "an object", meta)
    unknown = [k for k in meta if k not in like]  # a peer's keys may be bytes: no sorting
    if unknown:
        raise ValueError(f"{path + '.' if path else ''}{unknown[0]!s} is not a field of this "
                         "run's layers")
    for key, want in like.items():
        at = f"{path}.{key}" if path else key
        if key not in meta:
            if key in OPTIONAL:
                continue
            raise ValueError(f"{at} is missing")
        value = meta[key]
        if key in HISTOGRAMS:
            _histogram(value, at)
        elif key == "pending":
            _pending_entries(value, at)
        elif isinstance(want, dict):
            _like(value, want, at)
        elif isinstance(want, str):
            if not isinstance(value, str):
                raise _field(at, "a string", value)
            _rng(value, want, at)
        elif isinstance(want, float):
            _real(value, at)
        else:
            _count(value, at)


def check_weights(cfg, role: str, arrays: dict[str, np.ndarray], where: str) -> None:
    """A layer role's final weights fit the run: the names, shapes and dtypes
    a layer of this configuration has (ValueError otherwise)."""
    _check_arrays(where, role, arrays, _fresh_layer(cfg, role).weights())


def check_states(cfg, states: dict[str, tuple[dict, dict[str, np.ndarray]]], where: str) -> None:
    """Every role's checkpoint fits the run before any process starts: the
    same array names, shapes and dtypes as a layer of this configuration has,
    finite, and a state that loads."""
    for role, (meta, arrays) in states.items():
        fresh = _fresh_layer(cfg, role)
        like, want = layer_state(fresh)
        try:
            check_meta(meta, like)
        except ValueError as exc:
            raise refuse(f"checkpoint {where}: {role}.json: {exc}") from None
        own = {k: a for k, a in arrays.items() if not k.startswith("pending.")}
        _check_arrays(f"checkpoint {where}", role, own, want)
        for name, a in arrays.items():
            if not np.all(np.isfinite(a)):
                raise refuse(f"checkpoint {where}: {role}.{name} holds inf or NaN")
        try:
            load_layer_state(fresh, meta, arrays)
        except (KeyError, ValueError, TypeError, AttributeError, OverflowError) as exc:
            raise refuse(f"checkpoint {where}: {role}.json does not load: "
                          f"{type(exc).__name__}: {exc}") from None
