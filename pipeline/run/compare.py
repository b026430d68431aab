"""Several finished runs side by side (``launch.py report RUN_DIR RUN_DIR
...``): each labelled by what differs between their configurations
(``labels``, pure), their figures in a table of a column each, and their
curves overlaid in one figure (matplotlib optional, as for every plot)."""
from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.config import Config
from pipeline.run import plots
from pipeline.run.plots import _colour, _epoch_axis, _figure, _loss_axis, _marker, _note, _save
from pipeline.run.report import _f

# Fields that say where a run was written and how it reported, not what it
# trained, or that follow from the data (its dataset is a label of its own).
IGNORED = frozenset({"run_dir", "overwrite", "quiet", "tensorboard", "start_epoch",
                     "features", "classes", "test_examples", "image"})
_FIELDS = {name: f.default for name, f in Config.__dataclass_fields__.items()}


def _shown(value) -> str:
    """A configuration value as a label shows it: flags on/off, lists comma-separated."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return ",".join(_shown(v) for v in value)
    return "n/a" if value is None else str(value)


def labels(configs: list[dict], names: list[str]) -> list[str]:
    """Each run's label: ``field=value`` of every field whose value differs
    between the runs (in the Config's order, named as the option is, a
    field a run's config.json lacks at its default), or, when none differs,
    ``names`` (the directories). Runs whose configurations are the same
    among others that differ get their name after the label."""
    keys = list(_FIELDS) + sorted({k for c in configs for k in c} - set(_FIELDS))
    differ = [k for k in keys if k not in IGNORED
              and len({_shown(c.get(k, _FIELDS.get(k))) for c in configs}) > 1]
    if not differ:
        return list(names)
    out = [" ".join(f"{k.replace('_', '-')}={_shown(c.get(k, _FIELDS.get(k)))}" for k in differ)
           for c in configs]
    return [f"{label} ({name})" if out.count(label) > 1 else label
            for label, name in zip(out, names)]


def names_of(paths: list[str | os.PathLike]) -> list[str]:
    """The directories' own names, or the paths as given where two share one."""
    short = [Path(p).name or str(p) for p in paths]
    return [s if short.count(s) == 1 else str(p) for s, p in zip(short, paths)]


def _hidden_roles(runs: list[dict]) -> list[str]:
    roles: list[str] = []
    for run in runs:
        for layer in run["summary"].get("layers") or []:
            role = str(layer.get("role"))
            if role != "output" and role not in roles:
                roles.append(role)
    return roles


def _layer(run: dict, role: str) -> dict:
    return next((L for L in run["summary"].get("layers") or [] if L.get("role") == role), {})


def text_table(runs: list[dict], names: list[str]) -> str:
    """The runs as a key (number, label, directory) and a table of a column each."""
    tags = labels([r["config"].get("config") or {} for r in runs], names)
    width = max(len(t) for t in tags)
    lines = [f"{len(runs)} runs, labelled by what differs in their configurations:"]
    lines += [f"  [{i}] {t:<{width}}  {r['path']}" for i, (t, r) in enumerate(zip(tags, runs), 1)]
    s = [r["summary"] for r in runs]
    addition = all(x.get("dataset", "addition") == "addition" for x in s)
    rows = [("status", [str(x.get("status", "?")) for x in s]),
            ("mode", [str(x.get("mode", "?")) for x in s]),
            ("epochs", [f"{x.get('epochs_done', '?')}/{x.get('epochs', '?')}" for x in s]),
            ("final loss", [_f(x.get("final_loss"), ".4f") for x in s]),
            ("exact sums" if addition else "train accuracy",
             [_f(x.get("train_accuracy"), ".1f", 100, " %") for x in s])]
    if any(x.get("test_accuracy") is not None for x in s):
        rows.append(("test accuracy", [_f(x.get("test_accuracy"), ".2f", 100, " %") for x in s]))
    rows += [("batches/s", [_f(x.get("batches_per_s"), ".0f") for x in s]),
             ("wall s", [_f(x.get("wall_s"), ".1f") for x in s])]
    for role in _hidden_roles(runs):
        layers = [_layer(r, role) for r in runs]
        rows.append((f"{role} stale mean",
                     [_f((L.get("staleness_steps") or {}).get("mean"), ".2f") for L in layers]))
        rows.append((f"{role} sg cos mean",
                     [_f(((L.get("sg_quality") or {}).get("cosine") or {}).get("mean"), ".3f")
                      for L in layers]))
    head = max(len(name) for name, _ in rows)
    col = max(10, *(len(v) for _, vs in rows for v in vs))
    lines.append(" " * (head + 2) + "".join(f"{f'[{i}]':>{col + 2}}"
                                            for i in range(1, len(runs) + 1)))
    lines += [f"  {name:<{head}}" + "".join(f"{v:>{col + 2}}" for v in vs) for name, vs in rows]
    return "\n".join(lines)


def curves(events: list[dict]) -> dict[str, tuple[list[int], list[float]]]:
    """(epochs from 1, values) of a run's curves: ``loss``, ``accuracy``,
    ``test_loss``, ``test_accuracy`` (the epoch events) and ``sg_cosine``
    (the mean over the hidden layers that have one). An epoch logged twice
    (run again after a resume) counts as it was last logged."""
    epochs: dict[int, dict] = {}
    cosines: dict[int, dict[str, float]] = {}
    for e in events:
        epoch = e.get("epoch")
        if not isinstance(epoch, int) or isinstance(epoch, bool):
            continue
        if e.get("event") == "epoch":
            epochs[epoch] = e
        elif e.get("event") == "layer" and isinstance(e.get("sg_cosine"), (int, float)):
            cosines.setdefault(epoch, {})[str(e.get("role"))] = float(e["sg_cosine"])
    out: dict[str, tuple[list[int], list[float]]] = {}
    for key in ("loss", "accuracy", "test_loss", "test_accuracy"):
        xs = [k for k in sorted(epochs) if isinstance(epochs[k].get(key), (int, float))]
        if xs:
            out[key] = (xs, [float(epochs[k][key]) for k in xs])
    if cosines:
        xs = sorted(cosines)
        out["sg_cosine"] = (xs,
                            [sum(cosines[k].values()) / len(cosines[k]) for k in xs])
    return out


def compare_plot(runs: list[dict], names: list[str], path: str | os.PathLike) -> Path:
    """One figure of the runs' curves, a colour each: (a) loss, (b) accuracy
    (training solid, test dashed), (c) SG cosine, per epoch; the key below
    gives each colour's label."""
    if not plots.available():
        raise RuntimeError(plots.HINT)
    from matplotlib.lines import Line2D
    tags = labels([r["config"].get("config") or {} for r in runs], names)
    every = [curves(r["events"]) for r in runs]
    addition = all(r["summary"].get("dataset", "addition") == "addition" for r in runs)
    rows = 1 if len(runs) <= 3 else len(runs)  # the key: side by side, or a line each
    fig = _figure(figsize=(15, 5.0 + 0.3 * rows))
    grid = fig.add_gridspec(2, 3, height_ratios=[1, 0.04 + 0.05 * rows])
    panels = [("(a) loss per epoch", ("loss", "test_loss"), 1.0, "mean loss"),
              (f"(b) {'exact sums' if addition else 'accuracy'} per epoch",
               ("accuracy", "test_accuracy"), 100.0,
               f"{'exact sums' if addition else 'accuracy'} (%)"),
              ("(c) SG cosine per epoch, mean over the layers", ("sg_cosine",), 1.0,
               "cosine(SG, true)")]
    tested = any("test_loss" in found for found in every)
    for j, (title, keys, scale, ylabel) in enumerate(panels):
        ax = fig.add_subplot(grid[0, j])
        ax.set_title(title)
        _epoch_axis(ax)
        drawn: list[float] = []
        for i, found in enumerate(every):
            for name, style in zip(keys, ("-", "--")):
                if name in found:
                    xs, ys = found[name]
                    ax.plot(xs, [y * scale for y in ys], color=_colour(i), ls=style, lw=1.6,
                            **_marker(xs))
                    drawn += ys
        if not drawn:
            _note(ax, "no synthetic gradients in these runs" if j == 2
                  else "no epoch events in metrics.jsonl")
            continue
        ax.set_ylabel(ylabel + (", test dashed" if tested and j < 2 else ""))
        ax.grid(True, alpha=0.3)
        if j == 0:
            _loss_axis(ax, [y for y in drawn if math.isfinite(y)])
        elif j == 1:
            ax.set_ylim(-3, 103)
    key = fig.add_subplot(grid[1, :])
    key.set_axis_off()
    key.legend([Line2D([], [], color=_colour(i), lw=2) for i in range(len(runs))],
               [f"[{i}] {t}" for i, t in enumerate(tags, 1)], loc="center",
               ncol=1 if rows > 1 else len(runs), frameon=False)
    fig.suptitle(f"{len(runs)} runs, labelled by what differs in their configurations")
    return _save(fig, path)
