"""A staleness sweep as data: the grid of points, and the tables made from
their summaries (results.csv, results.md). No processes, no plotting."""
from __future__ import annotations

import csv
import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import SG_MODES, Config
from pipeline.files import write_private

CSV_FIELDS = ["variant", "mode", "unlock", "grad_delay", "input_delay", "seed", "status",
              "final_loss", "train_accuracy", "test_accuracy", "staleness_mean",
              "staleness_max", "sg_cosine_mean", "si_cosine_mean", "input_staleness_mean",
              "batches_per_s", "wall_s", "run_dir"]


def parse_axis(text: str) -> tuple[str, list[str]]:
    """``--axis 'OPTION=V1 V2 ...'``: a run option and its values (ValueError
    in one line otherwise)."""
    option, sep, values = text.partition("=")
    option, vals = option.strip().lstrip("-"), values.split()
    if not sep or not re.fullmatch(r"[a-z][a-z0-9-]*", option) or not vals:
        raise ValueError(f"expected OPTION=V1 V2 ... like 'link-delay=0 5 20', got {text[:80]!r}")
    return option, vals


def expand_axes(variants: list[tuple[str, list[str]]],
                axes: list[tuple[str, list[str]]]) -> list[tuple[str, list[str]]]:
    """Every variant (none: one, unnamed) with every value of each axis: a
    variant per combination, its name the variant's and the values'
    (``fast-link-delay5-layers6``), its options the variant's and the values'."""
    out = variants or [("", [])]
    for option, values in axes:
        out = [("-".join(filter(None, (name, re.sub(r"[^A-Za-z0-9_.+=-]", "_",
                                                      option + value))))[:64],
                [*options, f"--{option}", value]) for name, options in out for value in values]
    return out


@dataclass(frozen=True)
class Point:
    mode: str
    grad_delay: int
    seed: int
    variant: str = ""   # a named set of run options (--variant); "" without
    unlock: str = "none"
    input_delay: int = 0

    @property
    def line(self) -> str:
        """The point's mode, and its complete unlock: one line of the plot."""
        if self.unlock == "none":
            return self.mode
        what = "unlocked" if self.unlock == "forward" else "hidden unlocked"
        return f"{self.mode} {what}, input delay {self.input_delay}"

    def fields(self) -> dict:
        """The run options the point sets; a locked point drops the
        synthetic-input options a sweep's unlocked points take."""
        out = dict(mode=self.mode, grad_delay=self.grad_delay, unlock=self.unlock,
                   input_delay=self.input_delay)
        if self.unlock == "none":
            out.update(si_lr=0.0, si_second_step=False, si_output_scale=1.0)
        return out

    @property
    def name(self) -> str:
        tag = f"{self.variant}-" if self.variant else ""
        unlock = ("" if self.unlock == "none" else
                  f"-{'' if self.unlock == 'forward' else 'hidden-'}unlocked-in{self.input_delay}")
        return f"{tag}{self.mode}{unlock}-delay{self.grad_delay}-seed{self.seed}"


def grid(modes: list[str], delays: list[int], seeds: list[int],
         variants: list[str] = ("",), unlocks: list[str] = ("none",),
         input_delays: list[int] = (0,)) -> list[Point]:
    """Every variant x mode x unlock x delay x input delay x seed that can
    run. Locked backprop cannot be delayed: it runs at delay 0 only, the
    reference line the other modes are read against. Only the SG modes
    unlock; an input delay needs an unlocked run and at least as long a
    gradient delay (``Config``'s rule)."""
    points = []
    for variant in variants:
        for mode in modes:
            for unlock in unlocks:
                if unlock != "none" and mode not in SG_MODES:
                    continue
                for delay in ([0] if mode == "backprop" else delays):
                    for k in (input_delays if unlock != "none" else [0]):
                        if k <= delay:
                            points.extend(Point(mode, delay, seed, variant, unlock, k)
                                          for seed in seeds)
    return points


def point_config(base: Config, p: Point, out: Path) -> Config:
    """``base``: the run options of the point's variant."""
    return dataclasses.replace(base, **p.fields(), seed=p.seed,
                               run_dir=str(out / "runs" / p.name), quiet=True)


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def row(p: Point, summary: dict, run_dir: str) -> dict:
    """One CSV row: the point, its outcome, and its staleness averaged over
    the hidden layers."""
    hidden = [L for L in summary.get("layers", []) if L.get("role") != "output"]
    cosines = [L["sg_quality"]["cosine"]["mean"] for L in hidden
               if L.get("sg_quality") and L["sg_quality"].get("cosine")]
    # --unlock forward: every layer above the first, the output layer too
    unlocked = [L for L in summary.get("layers", []) if L.get("si_quality")]
    return {"variant": p.variant, "mode": p.mode, "unlock": p.unlock,
            "grad_delay": p.grad_delay, "input_delay": p.input_delay, "seed": p.seed,
            "status": summary.get("status"), "final_loss": summary.get("final_loss"),
            "train_accuracy": summary.get("train_accuracy"),
            "test_accuracy": summary.get("test_accuracy"),
            "staleness_mean": _mean([L["staleness_steps"]["mean"] for L in hidden]),
            "staleness_max": max((L["staleness_steps"]["max"] for L in hidden), default=None),
            "sg_cosine_mean": _mean(cosines),
            "si_cosine_mean": _mean([L["si_quality"]["cosine"]["mean"] for L in unlocked
                                     if L["si_quality"].get("cosine")]),
            "input_staleness_mean": _mean([L["input_staleness_steps"]["mean"]
                                           for L in unlocked]),
            "batches_per_s": summary.get("batches_per_s"), "wall_s": summary.get("wall_s"),
            "run_dir": run_dir}


def _mean_sd(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation; one value has no spread (None),
    and is shown without one."""
    if not values:
        return None, None
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else None
    return m, sd


def aggregate(rows: list[dict]) -> list[dict]:
    """Mean and sample standard deviation over seeds, per (variant, mode,
    delay), of the completed runs; in grid order."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for r in rows:  # an unlocked mode is a line of its own, named by Point.line
        line = Point(r["mode"], r["grad_delay"], 0, unlock=r.get("unlock") or "none",
                     input_delay=int(r.get("input_delay") or 0)).line
        groups.setdefault((r.get("variant") or "", line, r["grad_delay"]), []).append(r)
    out = []
    for (variant, mode, delay), rs in groups.items():
        ok = [r for r in rs if r["status"] == "completed" and r["final_loss"] is not None]
        loss_m, loss_sd = _mean_sd([r["final_loss"] for r in ok])
        acc_m, acc_sd = _mean_sd([r["train_accuracy"] for r in ok])
        stale = [r["staleness_mean"] for r in ok if r["staleness_mean"] is not None]
        test_m, test_sd = _mean_sd([r["test_accuracy"] for r in ok
                                    if r.get("test_accuracy") is not None])
        wall = [r["wall_s"] for r in ok if r.get("wall_s") is not None]
        out.append({"variant": variant, "mode": mode, "grad_delay": delay, "n": len(ok),
                    "runs": len(rs),
                    "loss_mean": loss_m, "loss_std": loss_sd,
                    "accuracy_mean": acc_m, "accuracy_std": acc_sd,
                    "staleness_mean": _mean(stale), "test_mean": test_m, "test_std": test_sd,
                    "wall_mean": _mean(wall)})
    return out


def write_csv(rows: list[dict], path: Path) -> Path:
    def write(f) -> None:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        w.writerows(rows)
    return write_private(path, write, text=True)


def _pm(m: float | None, sd: float | None, fmt: str, scale: float = 1.0) -> str:
    if m is None:
        return "n/a"
    if sd is None:  # one seed: no spread to show
        return f"{m * scale:{fmt}}"
    return f"{m * scale:{fmt}} ± {sd * scale:{fmt}}"


def markdown_by_variant(agg: list[dict]) -> str:
    """The sweep's accuracy (on the test split where there is one, else the
    training set's) with a column per variant and a row per mode and delay:
    the variants side by side. Empty without variants."""
    variants = list(dict.fromkeys(a.get("variant") or "" for a in agg))
    if len(variants) < 2:
        return ""
    key = "test" if any(a.get("test_mean") is not None for a in agg) else "accuracy"
    cells = {(a["mode"], a["grad_delay"], a.get("variant") or ""): a for a in agg}
    rows = list(dict.fromkeys((a["mode"], a["grad_delay"]) for a in agg))
    what = "test accuracy %" if key == "test" else "accuracy %"
    lines = [f"| mode | grad delay K | {' | '.join(variants)} |",
             "|---|---|" + "---|" * len(variants),
             *(f"| {mode} | {k} | " + " | ".join(
                 _pm(cells[(mode, k, v)][f"{key}_mean"], cells[(mode, k, v)][f"{key}_std"],
                     ".2f", 100) if (mode, k, v) in cells else "" for v in variants) + " |"
               for mode, k in rows)]
    over = ("one seed each" if all(a.get(f"{key}_std") is None for a in agg)
            else "mean ± sd over the seeds")
    return f"{what}, {over}, by variant:\n\n" + "\n".join(lines) + "\n"


def markdown(agg: list[dict]) -> str:
    pm = _pm

    # Classification sweeps have a test split: their table shows its accuracy
    # and the wall time, the addition task's its exact sums.
    test = any(a.get("test_mean") is not None for a in agg)
    named = any(a.get("variant") for a in agg)
    acc = "train accuracy %" if test else "exact sums %"
    lines = [("| variant " if named else "") + f"| mode | grad delay K | seeds | final loss | {acc} |"
             + (" test accuracy % | wall s |" if test else "") + " measured staleness |",
             ("|---" if named else "") + "|---|---|---|---|---|" + ("---|---|" if test else "")
             + "---|"]
    for a in agg:
        stale = "n/a" if a["staleness_mean"] is None else f"{a['staleness_mean']:.2f}"
        seeds = f"{a['n']}" + (f" of {a['runs']}" if a["n"] != a["runs"] else "")
        extra = ""
        if test:
            wall = "n/a" if a.get("wall_mean") is None else f"{a['wall_mean']:.0f}"
            extra = f" {pm(a.get('test_mean'), a.get('test_std'), '.2f', 100)} | {wall} |"
        lines.append((f"| {a.get('variant') or '-'} " if named else "")
                     + f"| {a['mode']} | {a['grad_delay']} | {seeds} | "
                     f"{pm(a['loss_mean'], a['loss_std'], '.4f')} | "
                     f"{pm(a['accuracy_mean'], a['accuracy_std'], '.1f', 100)} |{extra} {stale} |")
    return "\n".join(lines) + "\n"
