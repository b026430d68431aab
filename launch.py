"""Train a network of DNI layers, one process per layer: ``python launch.py --layers 3``."""
from __future__ import annotations

import sys

from pipeline.cli import parse
from workers.supervisor import run


def main(argv: list[str] | None = None) -> int:
    cfg = parse(argv)
    try:
        return run(cfg)
    except ValueError as exc:  # e.g. a run directory that already holds a run
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
