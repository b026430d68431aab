"""``launch.py report RUN_DIR``: a finished run's text report on the
terminal and its plots in RUN_DIR/report.png; ``launch.py report RUN_DIR
RUN_DIR ...``: several side by side, their curves in one figure."""
from __future__ import annotations

import os
import sys
from typing import TextIO

from pipeline.run import plots
from pipeline.run.compare import compare_plot, names_of, text_table
from pipeline.run.finished import load_run
from pipeline.run.report import text_report
from pipeline.run.subcommands import ReportArgs


def run(args: ReportArgs, stream: TextIO) -> int:
    """``launch.py report``: one run's report, or several compared."""
    if len(args.run_dirs) == 1:
        return main(args.run_dirs[0], stream)
    return compare(args.run_dirs, args.out, stream)


def main(run_dir: str | os.PathLike, stream: TextIO) -> int:
    """``launch.py report RUN_DIR``: print the text report and write report.png."""
    try:
        run = load_run(run_dir)
    except ValueError as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    print(text_report(run), file=stream)
    if not plots.available():
        print(plots.HINT, file=stream)
        return 0
    try:
        png = plots.run_report(run_dir)
    except ValueError as exc:  # a value in the run's files that cannot be drawn
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. a read-only run directory
        print(f"report: error: cannot write the plot: {exc}", file=sys.stderr)
        return 1
    print(f"plots: {png}", file=stream)
    return 0


def compare(run_dirs: list[str | os.PathLike], out: str | os.PathLike, stream: TextIO) -> int:
    """Print the runs side by side and write their curves to ``out``."""
    runs = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except ValueError as exc:
            print(f"report: error: {exc}", file=sys.stderr)
            return 2
    names = names_of(run_dirs)
    print(text_table(runs, names), file=stream)
    if not plots.available():
        print(plots.HINT, file=stream)
        return 0
    try:
        png = compare_plot(runs, names, out)
    except ValueError as exc:  # a value in the runs' files that cannot be drawn
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"report: error: cannot write the plot: {exc}", file=sys.stderr)
        return 1
    print(f"plot: {png}", file=stream)
    return 0
