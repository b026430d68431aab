"""Train a network of DNI layers, one process per layer: ``python launch.py --layers 3``.

Also ``python launch.py sweep ...`` (a staleness sweep),
``python launch.py report RUN_DIR ...`` (one run's plots, or several compared),
``python launch.py data mnist DIR`` (a dataset's files, downloaded and checked),
``python launch.py keys --out DIR`` (CURVE keys for a cluster) and
``python launch.py --cluster FILE [--role ROLE]`` (a run across machines).
"""
from __future__ import annotations

import signal
import sys
from typing import Callable

# The first thing that runs: a signal from here on is noted, not a traceback
# (what arrives while Python itself starts, before this line, no program sees).
_EARLY: list[int] = []
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: _EARLY.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: _EARLY.append(signum))
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM})


def main(argv: list[str] | None = None) -> int:
    """Ctrl-C or SIGTERM at any moment ends the command with 130 or 143 and no
    traceback; a run it has started writes ``interrupted`` first."""
    from commands.spawn import SIGNALS
    SIGNALS.install()
    SIGNALS.first = SIGNALS.first or (_EARLY[0] if _EARLY else None)
    # Imports and parsing are shielded: a KeyboardInterrupt raised inside an
    # extension module's import would surface as an ImportError traceback.
    try:
        with SIGNALS.shielded():
            command = _command(sys.argv[1:] if argv is None else argv)
        if SIGNALS.first is not None:
            return SIGNALS.exit_code(0)
        code = command()
    except KeyboardInterrupt:
        code = 130
        with SIGNALS.shielded():
            _write_up_unfinished()
    except ValueError as exc:  # bad input found past parsing: a file, a directory
        print(f"launch.py: error: {exc}", file=sys.stderr)
        code = 2
    return SIGNALS.exit_code(code)


def _write_up_unfinished() -> None:
    """A run directory the signal found opened but not yet in a run's charge
    (its sockets still binding): its summary says ``interrupted`` all the same."""
    from pipeline.run.rundir import unfinished
    from pipeline.run.summary import build_summary, close_run
    for rd, cfg in unfinished():
        close_run(rd, build_summary(cfg, status="interrupted", run_id="", wall_s=0.0,
                                    final=None, layers=[], epochs_done=cfg.start_epoch),
                  sys.stdout)


def _engine(argv: list[str]) -> Callable[[], int] | None:
    """Under an engine (mpiexec, srun, an Indexed Job, torchrun-style
    variables; --launcher): this rank's part of the run. None: a local run."""
    import os
    from pipeline.net import engines
    from pipeline.run.cli import parse_engine
    opts = parse_engine(argv)
    engine = engines.detect(os.environ, opts.launcher)
    if engine.local:
        return None
    from pipeline.run.cli import parse_run
    from pipeline.run.resume import resume_config
    from commands.engine import run_rank

    def prepare():  # rank 0 alone: the other hosts need not hold the data or the run
        cfg, resume = parse_run(argv)
        return resume_config(resume, cfg.quiet) if resume is not None else (cfg, None)
    return lambda: run_rank(engine, opts, prepare, sys.stdout)


def _command(argv: list[str]) -> Callable[[], int]:
    """The command ``argv`` asks for, imported and parsed, ready to run (a bad
    argument exits here, with its one line)."""
    if not any(a in ("sweep", "report", "keys", "data") for a in argv[:1]):
        _cap_blas_threads()
    from pipeline.net.memory import tune_allocator
    tune_allocator()  # the supervisor, and the reference trainer with --in-process
    if argv[:1] == ["sweep"]:
        from pipeline.run.cli import parse_sweep
        from commands.sweep import run_sweep
        args = parse_sweep(argv[1:])
        return lambda: run_sweep(args, sys.stdout)
    if argv[:1] == ["report"]:
        from pipeline.run.subcommands import parse_report
        from commands.report import run as report
        report_args = parse_report(argv[1:])
        return lambda: report(report_args, sys.stdout)
    if argv[:1] == ["data"]:
        from pipeline.run.subcommands import parse_data
        from commands.data import main as data
        data_args = parse_data(argv[1:])
        return lambda: data(data_args, sys.stdout)
    if argv[:1] == ["keys"]:
        from pipeline.run.subcommands import parse_keys
        from pipeline.wire.protocol import all_roles
        from pipeline.net.security import generate_keys
        out, layers = parse_keys(argv[1:])

        def keys() -> int:
            for path in generate_keys(out, all_roles(layers)):
                print(path)
            return 0
        return keys
    if any(a == "--cluster" or a.startswith("--cluster=") for a in argv):
        from pipeline.run.subcommands import parse_cluster
        from commands.host import run_cluster
        cluster = parse_cluster(argv)
        return lambda: run_cluster(cluster, sys.stdout)
    engine = _engine(argv)
    if engine is not None:
        return engine
    from pipeline.run.cli import parse_run
    from pipeline.run.resume import resume_config
    from commands.supervisor import run
    cfg, resume = parse_run(argv)
    if resume is not None:
        cfg, states = resume_config(resume, cfg.quiet)
        return lambda: run(cfg, resume=states)
    return lambda: run(cfg)


def _cap_blas_threads() -> None:
    """A rank an engine started is a worker itself, with no supervisor to cap
    its BLAS threads before numpy loads: one each, unless the user said."""
    import os
    from pipeline.net.engines import RANK_VARIABLES
    if any(v in os.environ for v in RANK_VARIABLES):
        for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ.setdefault(var, "1")


if __name__ == "__main__":
    code = main()
    # Python puts the default handlers back as it shuts down, and a signal
    # then would kill it (-2, -15) after the run was written up. Blocking
    # them here is not enough: the mask is this thread's, and a signal to
    # the process goes to any thread that does not block it (BLAS threads,
    # started before). Ignored signals stay ignored through the shutdown.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)
