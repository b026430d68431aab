"""Train a network of DNI layers, one process per layer: ``python launch.py --layers 3``.

Also ``python launch.py sweep ...`` (a staleness sweep) and
``python launch.py report RUN_DIR`` (one run's plots).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["sweep"]:
        from pipeline.cli import parse_sweep
        from workers.sweep import run_sweep
        return run_sweep(parse_sweep(argv[1:]), sys.stdout)
    if argv[:1] == ["report"]:
        from pipeline.cli import parse_report
        from pipeline.report import main as report
        return report(parse_report(argv[1:]), sys.stdout)
    from pipeline.cli import parse
    from workers.supervisor import run
    cfg = parse(argv)
    try:
        return run(cfg)
    except ValueError as exc:  # e.g. a run directory that already holds a run
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
