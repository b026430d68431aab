"""Starting the worker processes, and the signals every command that starts
them handles the same way."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from pipeline.net import transport

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
    env["DNI_PARENT_PID"] = str(os.getpid())  # workers.serve.PARENT_ENV: orphaned at birth?
    return env


def spawn(module: str, role: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """One worker process. Its own session: a Ctrl-C at the terminal reaches
    the command alone, which stops the workers in order."""
    return subprocess.Popen([sys.executable, "-m", module, "--role", role, *args],
                            env=env, stdin=subprocess.DEVNULL, start_new_session=True)


class Signals:
    """SIGINT (Ctrl-C) and SIGTERM (a job scheduler, a plain ``kill``) end a
    command the same way: the first one raises KeyboardInterrupt, where the
    command stops its workers and writes ``interrupted``; any later one is
    noted and nothing more, so it cannot cut that clean-up short. Inside
    ``shielded()`` (the clean-up itself) even the first is only noted."""

    def __init__(self) -> None:
        self.first: int | None = None
        self._shield = 0

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._handle)
        signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.first is not None:
            return
        self.first = signum
        if not self._shield:
            transport.raise_when_whole(KeyboardInterrupt())

    def raise_if_noted(self) -> None:
        """For a command's waiting loops: the first signal's KeyboardInterrupt
        again, should the handler's have been lost (raised where Python can
        only print it, as in a socket's or frame's destructor)."""
        if self.first is not None and not self._shield:
            raise KeyboardInterrupt

    @contextmanager
    def shielded(self):
        self._shield += 1
        try:
            yield
        finally:
            self._shield -= 1

    def exit_code(self, code: int) -> int:
        """128 + the signal that ended the command (130 SIGINT, 143 SIGTERM),
        else ``code``."""
        return 128 + self.first if self.first is not None else code


SIGNALS = Signals()  # the process's one set: launch.py installs it first thing
