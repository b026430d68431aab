"""Train a network of DNI layers, one process per layer: ``python launch.py --layers 3``.

Also ``python launch.py sweep ...`` (a staleness sweep),
``python launch.py report RUN_DIR`` (one run's plots),
``python launch.py keys --out DIR`` (CURVE keys for a cluster) and
``python launch.py --cluster FILE [--role ROLE]`` (a run across machines).
"""
from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C or SIGTERM at any moment ends the command with 130 or 143 and no
    traceback; a run it has started writes ``interrupted`` first."""
    from commands.spawn import SIGNALS
    SIGNALS.install()  # first thing: a signal during the imports below is handled too
    try:
        code = _main(sys.argv[1:] if argv is None else argv)
    except KeyboardInterrupt:
        code = 130
    return SIGNALS.exit_code(code)


def _main(argv: list[str]) -> int:
    from pipeline.memory import tune_allocator
    tune_allocator()  # the supervisor, and the reference trainer with --in-process
    if argv[:1] == ["sweep"]:
        from pipeline.cli import parse_sweep
        from commands.sweep import run_sweep
        return run_sweep(parse_sweep(argv[1:]), sys.stdout)
    if argv[:1] == ["report"]:
        from pipeline.cli import parse_report
        from pipeline.report import main as report
        return report(parse_report(argv[1:]), sys.stdout)
    try:
        if argv[:1] == ["keys"]:
            from pipeline.cli import parse_keys
            from pipeline.protocol import all_roles
            from pipeline.security import generate_keys
            out, layers = parse_keys(argv[1:])
            for path in generate_keys(out, all_roles(layers)):
                print(path)
            return 0
        if any(a == "--cluster" or a.startswith("--cluster=") for a in argv):
            from pipeline.cli import parse_cluster
            from commands.host import run_cluster
            return run_cluster(parse_cluster(argv), sys.stdout)
        from pipeline.cli import parse_run
        from pipeline.checkpoint import resume_config
        from commands.supervisor import run
        cfg, resume = parse_run(argv)
        if resume is not None:
            cfg, states = resume_config(resume, cfg.quiet)
            return run(cfg, resume=states)
        return run(cfg)
    except ValueError as exc:  # bad input found past parsing: a file, a directory
        print(f"launch.py: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
