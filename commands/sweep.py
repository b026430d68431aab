"""The sweep (run by ``launch.py sweep``): one supervised run per grid point,
skipping points already completed, then the tables and the plot."""
from __future__ import annotations

import io
import json
import time
from pathlib import Path
from typing import TextIO

from pipeline import files
from pipeline.run import plots
from pipeline.run.cli import SweepArgs
from pipeline.run.sweep import (Point, aggregate, grid, markdown, markdown_by_variant,
                                point_config, row, write_csv)
from commands import supervisor
from commands.spawn import SIGNALS


def _finished(run_dir: Path) -> dict | None:
    """The summary of a completed run there, else None."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if summary.get("status") == "completed" else None


def _set_aside(run_dir: Path) -> None:
    """A failed or interrupted attempt is kept for inspection, not overwritten."""
    if run_dir.exists():
        n = 1
        while run_dir.with_name(f"{run_dir.name}.attempt{n}").exists():
            n += 1
        run_dir.rename(run_dir.with_name(f"{run_dir.name}.attempt{n}"))


def run_sweep(args: SweepArgs, stream: TextIO) -> int:
    out = Path(args.out or Path("sweeps") / time.strftime("%Y%m%d-%H%M%S"))
    points = grid(args.modes, args.delays, args.seeds, args.variants, args.unlocks,
                  args.input_delays)
    # (--out was measured with every point's run directory inside: cli.parse_sweep)
    try:
        files.make_private_dirs(out)
    except OSError as exc:
        raise ValueError(f"argument --out: cannot make {out}: {exc.strerror or exc}") from None
    text = json.dumps({
        "modes": args.modes, "grad_delays": args.delays, "seeds": args.seeds,
        "unlock": args.unlocks, "input_delays": args.input_delays,
        "variants": {name: base.to_dict() for name, base in args.bases.items()}}, indent=2)
    files.write_private(out / "sweep.json", lambda f: f.write(text + "\n"), text=True)
    print(f"sweep directory: {out}  ({len(points)} runs)", file=stream, flush=True)
    rows: list[dict] = []
    code = 0
    try:
        for i, p in enumerate(points, 1):
            rows.append(_run_point(args, p, out, f"[{i}/{len(points)}]", stream))
            if rows[-1]["status"] == "interrupted":
                code = 130
                break
    except KeyboardInterrupt:
        code = 130
    with SIGNALS.shielded():
        _write_results(rows, out, stream)
    if code:
        print("sweep interrupted; run the same command again to resume", file=stream)
    return code


def _run_point(args: SweepArgs, p: Point, out: Path, tag: str, stream: TextIO) -> dict:
    cfg = point_config(args.bases[p.variant], p, out)
    run_dir = Path(cfg.run_dir)
    summary = _finished(run_dir)
    if summary is not None:
        print(f"{tag} {p.name}: done before, skipped", file=stream, flush=True)
        return row(p, summary, cfg.run_dir)
    _set_aside(run_dir)
    start = time.perf_counter()
    supervisor.run(cfg, stream=io.StringIO())  # its closing table would drown the sweep's
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {"status": "failed"}
    r = row(p, summary, cfg.run_dir)
    if r["final_loss"] is not None:
        what = "exact" if r["test_accuracy"] is None else "train"
        result = f"loss {r['final_loss']:.4f}, {what} {r['train_accuracy'] * 100:.1f} %"
        if r["test_accuracy"] is not None:
            result += f", test {r['test_accuracy'] * 100:.2f} %"
    else:
        result = summary.get("error", {}).get("message", "")
    print(f"{tag} {p.name}: {r['status']}, {result} ({time.perf_counter() - start:.1f} s)",
          file=stream, flush=True)
    return r


def _write_results(rows: list[dict], out: Path, stream: TextIO) -> None:
    write_csv(rows, out / "results.csv")
    agg = aggregate(rows)
    table = markdown(agg)
    side_by_side = markdown_by_variant(agg)
    if side_by_side:
        table += "\n" + side_by_side
    files.write_private(out / "results.md", lambda f: f.write(table), text=True)
    print(f"\n{table}\nwrote {out / 'results.csv'} and {out / 'results.md'}", file=stream)
    if not agg:
        return
    if plots.available():
        print(f"wrote {plots.sweep_plot(agg, out / 'accuracy_vs_staleness.png')}", file=stream)
    else:
        print(plots.HINT, file=stream)
