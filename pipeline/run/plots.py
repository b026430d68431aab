"""All of the project's plots (sweep curves, one run's report.png); matplotlib is optional and imported lazily."""
from __future__ import annotations

import math
import os
from pathlib import Path

from pipeline.run.finished import load_run
from pipeline.files import write_private

HINT = "plots need matplotlib: pip install -e '.[plot]'"
DPI = 120


def available() -> bool:
    """True if matplotlib can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _figure(**kwargs):
    """A matplotlib Figure drawn by the Agg canvas. Built without pyplot, so it
    touches no global backend or figure registry (nothing to close, nothing
    leaks into a notebook that imports us)."""
    if not available():
        raise RuntimeError(HINT)
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise RuntimeError(HINT) from None
    fig = Figure(layout="constrained", **kwargs)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | os.PathLike) -> Path:
    """Write the figure whole, readable by the user alone (as the run is)."""
    path = write_private(Path(path), lambda f: fig.savefig(f, dpi=DPI, format="png"))
    fig.clear()  # free the artists now rather than at garbage collection
    return path


def _num(value) -> float:
    """A JSON number or null as a float (null -> NaN, which matplotlib skips)."""
    return float("nan") if value is None else float(value)


def _loss_axis(ax, values: list[float]) -> None:
    """Log scale when the loss spans more than a factor of ten (a run that
    learns goes from ~7 to ~0.03), with plain numbers instead of 10^x."""
    from matplotlib.ticker import FuncFormatter
    finite = [v for v in values if v > 0 and math.isfinite(v)]
    if not finite or max(finite) / min(finite) <= 10:
        return
    ax.set_yscale("log")
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    if max(finite) / min(finite) < 100:
        # Under two decades one or two powers of ten are all the labels there
        # would be; label the 2s and 5s between them as well.
        def minor(v: float, _) -> str:
            mantissa = round(v / 10 ** math.floor(math.log10(v) + 1e-9), 6)
            return f"{v:g}" if mantissa in (2, 5) else ""
        ax.yaxis.set_minor_formatter(FuncFormatter(minor))


def _colour(i: int):
    from matplotlib import colormaps
    return colormaps["tab10"](i % 10)


# --- sweep -----------------------------------------------------------------------------------

def seeds_said(ns: list[int]) -> str:
    """What a sweep's points are over, from their seed counts: one seed has
    no spread to show."""
    if ns[-1] == 0:
        return "no run completed"
    if ns[-1] == 1:
        return "one seed"
    seeds = f"{ns[0]}" if len(ns) == 1 else f"{ns[0]}–{ns[-1]}"
    return f"mean ± std over {seeds} seeds"


def sweep_plot(rows: list[dict], path: str | os.PathLike, title: str = "") -> Path:
    """Final accuracy (on the test split where the data has one, else the
    training set's exact sums) against injected gradient delay K, mean ± std
    over seeds, one line per mode; a line run at K=0 only is a dashed
    reference. Without variants, a second panel shows the final loss; with
    variants (``sweep --variant``), one accuracy panel per variant."""
    if not rows:
        raise ValueError("sweep_plot: no rows to plot")
    variants = list(dict.fromkeys(r.get("variant") or "" for r in rows))
    test = any(r.get("test_mean") is not None for r in rows)
    acc_key = "test" if test else "accuracy"
    delays = sorted({int(r["grad_delay"]) for r in rows})
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    ns = sorted({int(r.get("n") or 0) for r in rows} - {0}) or [0]  # n=0: every seed failed
    panels = ([(v, [(acc_key, 100.0)]) for v in variants] if len(variants) > 1
              else [("", [(acc_key, 100.0), ("loss", 1.0)])])
    n_axes = sum(len(keys) for _, keys in panels)
    cols = min(n_axes, 4 if len(variants) > 1 else 2)
    nrows = -(-n_axes // cols)
    fig = _figure(figsize=(3.2 * cols + 1.2 if len(variants) > 1 else 11, 3.6 * nrows + 1.0))
    # A thin bottom row holds the legend, below the panels and over no data
    # (fig.legend(loc="outside ...") would do it too, but only from matplotlib 3.7).
    grid = fig.add_gridspec(nrows + 1, cols, height_ratios=[1] * nrows + [0.09])
    ax_key = fig.add_subplot(grid[nrows, :])
    ax_key.set_axis_off()
    axes = []
    for variant, keys in panels:
        for key, scale in keys:
            i = len(axes)
            ax = fig.add_subplot(grid[i // cols, i % cols])
            axes.append(ax)
            mine = [r for r in rows if (r.get("variant") or "") == variant]
            _sweep_panel(ax, mine, modes, key, scale, len(delays) > 1)
            _delay_axis(ax, delays)
            if key == "loss":
                _loss_axis(ax, [_num(r["loss_mean"]) for r in rows])
                ax.set_ylabel("final training loss" + ("" if test else " (binary cross-entropy)"))
                ax.set_title("loss")
            else:
                ax.set_ylim(-3, 103)
                ax.set_ylabel("final test accuracy (%)" if test
                              else "final train accuracy: exact sums (%)")
                ax.set_title(variant or "accuracy")
    handles, labels = [], []
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            if label not in labels:
                handles.append(h)
                labels.append(label)
    ax_key.legend(handles, labels, loc="center", ncol=max(1, min(6, len(labels))),
                  frameon=False)
    what = "test accuracy" if test else "training accuracy"
    over = seeds_said(ns)
    fig.suptitle(title or f"Final {what}" + ("" if len(variants) > 1 else " and loss")
                 + f" against gradient delay ({over})")
    return _save(fig, path)


def _sweep_panel(ax, rows: list[dict], modes: list[str], key: str, scale: float,
                 several_delays: bool) -> None:
    """One line per mode of ``rows`` (one variant's), in the sweep's mode colours."""
    for i, mode in enumerate(modes):
        rs = sorted((r for r in rows if r["mode"] == mode), key=lambda r: int(r["grad_delay"]))
        if not rs:
            continue
        colour = _colour(i)
        ys = [_num(r[f"{key}_mean"]) * scale for r in rs]
        if all(math.isnan(y) for y in ys):
            continue  # no completed run of this line: nothing to draw
        sds = [0.0 if r.get(f"{key}_std") is None else r[f"{key}_std"] * scale for r in rs]
        if len(rs) == 1 and int(rs[0]["grad_delay"]) == 0 and several_delays:
            y, sd = ys[0], sds[0]
            ax.axhline(y, color=colour, ls="--", lw=1.5, label=f"{mode} (K=0 only)")
            if sd > 0:
                lo = max(y - sd, y * 0.05) if key == "loss" else y - sd
                ax.axhspan(lo, y + sd, color=colour, alpha=0.12, lw=0)
            continue
        ks = [int(r["grad_delay"]) for r in rs]
        if key == "loss":
            # On a log axis a bar reaching zero or below vanishes; keep the
            # lower bar inside the positive range.
            lower = [min(sd, 0.95 * y) if y > 0 else 0.0 for y, sd in zip(ys, sds)]
            yerr = [lower, sds]
        else:
            yerr = sds
        ax.errorbar(ks, ys, yerr=yerr, color=colour, marker="o", ms=5, lw=1.8, capsize=3,
                    label=mode)


def _delay_axis(ax, delays: list[int]) -> None:
    """symlog base 2, linear below 1; linscale 0.5 makes the linear part as
    wide as one factor of 2, so 0, 1, 2, 4, 8, 16 come out evenly spaced."""
    from matplotlib.ticker import FixedLocator, NullLocator
    ax.set_xscale("symlog", base=2, linthresh=1, linscale=0.5)
    ax.xaxis.set_major_locator(FixedLocator(delays))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(k) for k in delays])
    lo, hi = delays[0], delays[-1]
    ax.set_xlim(lo - 0.25, hi * 1.15 + 0.25 if hi > 0 else 1)
    ax.set_xlabel("injected gradient delay K (layer steps)")
    ax.grid(True, alpha=0.3)


# --- one run ---------------------------------------------------------------------------------

def _epoch_axis(ax) -> None:
    """Epochs numbered from 1 as the progress line prints them and the
    events count them (``finished.load_run`` renumbers older runs')."""
    from matplotlib.ticker import MaxNLocator
    ax.set_xlabel("epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _marker(xs: list) -> dict:
    """A lone point draws no line: give it a marker."""
    return {"marker": "o", "ms": 4} if len(xs) == 1 else {}


def _note(ax, text: str) -> None:
    """An empty panel that says why it is empty."""
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel("")
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center",
            fontsize=10, color="0.35", wrap=True)


def _accuracy_name(summary: dict) -> str:
    """What a run's accuracy counts: exact sums (addition) or classes."""
    return "exact sums" if summary.get("dataset", "addition") == "addition" else "accuracy"


def _title(summary: dict) -> str:
    loss, acc = summary.get("final_loss"), summary.get("train_accuracy")
    test = summary.get("test_accuracy")
    parts = [f"{summary.get('mode', '?')} run {summary.get('run_id', '')}".rstrip(),
             f"{summary.get('status', '?')}",
             f"{summary.get('epochs_done', '?')}/{summary.get('epochs', '?')} epochs",
             "final loss " + ("n/a" if loss is None else f"{loss:.4f}"),
             _accuracy_name(summary) + " " + ("n/a" if acc is None else f"{acc * 100:.1f} %")]
    if test is not None:
        parts.append(f"test {test * 100:.2f} %")
    title = " · ".join(parts)
    err = summary.get("error")
    if err:
        msg = str(err.get("message", ""))
        title += f"\nfailed in {err.get('role')}: {msg[:100]}{'…' if len(msg) > 100 else ''}"
    return title


def _by_role(events: list[dict], kind: str) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in events:
        if e.get("event") == kind and isinstance(e.get("epoch"), int):
            out.setdefault(str(e.get("role")), []).append(e)
    for es in out.values():
        es.sort(key=lambda e: e["epoch"])
    return out


def _training_panel(ax, events: list[dict], what: str = "exact sums") -> None:
    epochs = sorted((e for e in events if e.get("event") == "epoch"
                     and isinstance(e.get("epoch"), int)), key=lambda e: e["epoch"])
    ax.set_title(f"(a) training loss and {what} per epoch")
    _epoch_axis(ax)
    if not epochs:
        _note(ax, "no epoch events in metrics.jsonl")
        return
    x = [e["epoch"] for e in epochs]
    loss = [_num(e.get("loss")) for e in epochs]
    acc = [_num(e.get("accuracy")) * 100 for e in epochs]
    # Not the layer colours of the other panels: these curves are the whole net's.
    ax.plot(x, loss, color="0.15", lw=1.6, **_marker(x))
    _loss_axis(ax, loss)
    ax.set_ylabel("mean training loss")
    ax.grid(True, alpha=0.3)
    twin = ax.twinx()
    twin.plot(x, acc, color="tab:green", lw=1.6, **_marker(x))
    test = [_num(e.get("test_accuracy")) * 100 for e in epochs if e.get("test_accuracy") is not None]
    if len(test) == len(x):  # dashed: the test split after each epoch
        twin.plot(x, test, color="tab:green", lw=1.6, ls="--", **_marker(x))
    twin.set_ylim(-3, 103)
    # The coloured axis is the legend: a legend box would sit on one of the
    # curves somewhere, as they cross the panel in opposite directions.
    twin.set_ylabel(f"{what} (%)" + (", test dashed" if len(test) == len(x) else ""),
                    color="tab:green")
    twin.tick_params(axis="y", colors="tab:green")


def _sg_panel(ax, layer_events: dict[str, list[dict]], colours: dict[str, object],
              mode: str) -> None:
    ax.set_title("(b) synthetic-gradient quality per epoch")
    _epoch_axis(ax)
    drawn, skipped = [], []
    for role, es in layer_events.items():
        cos = [_num(e.get("sg_cosine")) for e in es]
        rel = [_num(e.get("sg_rel_err")) for e in es]
        if all(math.isnan(v) for v in cos + rel):
            skipped.append(role)
            continue
        x = [e["epoch"] for e in es]
        c = colours.get(role, "0.3")
        ax.plot(x, cos, color=c, lw=1.6, label=f"{role} cosine", **_marker(x))
        ax.plot(x, rel, color=c, lw=1.2, ls="--", label=f"{role} rel. error", **_marker(x))
        drawn.append(role)
    if not drawn:
        why = (f"no synthetic gradients in mode {mode}" if skipped
               else "no layer events in metrics.jsonl")
        _note(ax, why)
        return
    ax.axhline(1.0, color="0.6", lw=0.8, ls=":")
    ax.set_ylabel("cosine(SG, true) solid;  |SG − true| / |true| dashed", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="best")
    if skipped:
        ax.text(0.01, 0.01, f"no SG: {', '.join(skipped)}", transform=ax.transAxes,
                fontsize=8, color="0.4", va="bottom")


def _hist_panel(ax, layers: list[dict], colours: dict[str, object]) -> None:
    ax.set_title("(c) staleness of applied gradients (whole run)")
    ax.set_xlabel("staleness (layer steps)")
    hists = [(L["role"], {int(k): v for k, v in L["staleness_hist"].items()})
             for L in layers if L.get("staleness_hist")]
    if not hists:
        _note(ax, "no staleness histogram in summary.json")
        return
    width = 0.8 / len(hists)
    for j, (role, h) in enumerate(hists):
        ks = sorted(h)
        offset = (j - (len(hists) - 1) / 2) * width
        ax.bar([k + offset for k in ks], [h[k] for k in ks], width=width,
               color=colours.get(role, "0.3"), label=role)
    # Every integer step from 0 (or the smallest seen) up: a lone bar at K
    # still shows how far from 0 it is.
    lo = min(0, *(min(h) for _, h in hists))
    hi = max(1, *(max(h) for _, h in hists))
    ax.set_xlim(lo - 0.6, hi + 0.6)
    if hi - lo <= 24:
        ax.set_xticks(range(lo, hi + 1))
    ax.set_ylabel("gradients")
    ax.yaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)


def _seconds_panel(ax, layer_events: dict[str, list[dict]], colours: dict[str, object]) -> None:
    ax.set_title("(d) staleness in wall-clock time per epoch")
    _epoch_axis(ax)
    drawn = False
    for role, es in layer_events.items():
        ys = [_num(e.get("staleness_s_mean")) * 1e3 for e in es]
        if all(math.isnan(v) for v in ys):
            continue
        x = [e["epoch"] for e in es]
        ax.plot(x, ys, color=colours.get(role, "0.3"), lw=1.4, label=role, **_marker(x))
        drawn = True
    if not drawn:
        _note(ax, "no layer events in metrics.jsonl")
        return
    ax.set_ylim(bottom=0)
    ax.set_ylabel("mean staleness (ms)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)


def run_report(run_dir: str | os.PathLike) -> Path:
    """Draw run_dir/report.png: (a) loss and accuracy per epoch, (b) SG
    quality per hidden layer, (c) staleness histogram, (d) staleness in
    seconds per epoch. Raises ValueError if run_dir is not a finished run."""
    if not available():
        raise RuntimeError(HINT)
    run = load_run(run_dir)
    summary, events = run["summary"], run["events"]
    # The output layer computes its own gradient (staleness 0, no SG): only
    # hidden layers go into the per-layer panels.
    layers = [L for L in summary.get("layers") or [] if L.get("role") != "output"]
    layer_events = _by_role(events, "layer")
    roles = [L["role"] for L in layers] + sorted(set(layer_events) - {L["role"] for L in layers})
    colours = {role: _colour(i) for i, role in enumerate(roles)}
    layer_events = {r: layer_events[r] for r in roles if r in layer_events}

    fig = _figure(figsize=(12, 8.5))
    (a, b), (c, d) = fig.subplots(2, 2)
    _training_panel(a, events, _accuracy_name(summary))
    _sg_panel(b, layer_events, colours, str(summary.get("mode", "?")))
    _hist_panel(c, layers, colours)
    _seconds_panel(d, layer_events, colours)
    fig.suptitle(_title(summary), fontsize=12)
    return _save(fig, Path(run_dir) / "report.png")
