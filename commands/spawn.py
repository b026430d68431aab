"""Starting the worker processes, and the signals every command that starts
them handles the same way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def module_of(role: str) -> str:
    """The module a role's process runs: ``python -m <module> --role ROLE``."""
    return {"source": "workers.source", "output": "workers.output"}.get(role, "workers.layer")


def worker_env(blas_threads: int) -> dict[str, str]:
    """A worker's environment: the project importable, and its BLAS threads
    capped (they must be set before numpy loads), so processes share cores."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(blas_threads)
    return env


def spawn(module: str, role: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """One worker process. Its own session: a Ctrl-C at the terminal reaches
    the command alone, which stops the workers in order."""
    return subprocess.Popen([sys.executable, "-m", module, "--role", role, *args],
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def end_on_sigterm() -> None:
    """SIGTERM (a job scheduler, a plain ``kill``) ends the command like Ctrl-C."""
    signal.signal(signal.SIGTERM, interrupt)
