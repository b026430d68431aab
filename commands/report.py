"""``launch.py report RUN_DIR``: a finished run's text report on the
terminal and its plots in RUN_DIR/report.png."""
from __future__ import annotations

import os
import sys
from typing import TextIO

from pipeline.run import plots
from pipeline.run.report import text_report
from pipeline.run.finished import load_run


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
