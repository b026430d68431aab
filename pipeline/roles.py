"""What every worker process does around its own loop: arguments, signals,
the handshake with the supervisor, and reporting a failure before exiting."""
from __future__ import annotations

import argparse
import ctypes
import signal
import sys
from typing import Callable

from pipeline import wire
from pipeline.config import Config
from pipeline.transport import ControlLink, Stopped, context

RoleMain = Callable[[ControlLink, Config], None]


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the supervisor dies, so a
    worker is never orphaned, even after a SIGKILL of the supervisor."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere the parent-pid check in the poll loop does the job


def _terminate(signum, frame) -> None:
    raise Stopped(f"signal {signum}")


def worker_main(role_main: RoleMain, argv: list[str] | None = None) -> int:
    """Entry point of a worker: ``python -m workers.<role> --control EP --role R --run-id ID``."""
    p = argparse.ArgumentParser(description="A pipeline worker; started by launch.py.")
    p.add_argument("--control", required=True, help="supervisor's control endpoint")
    p.add_argument("--role", required=True, help="role name, e.g. layer1")
    p.add_argument("--run-id", required=True)
    args = p.parse_args(argv)
    # Ctrl-C reaches the whole process group; the supervisor alone decides
    # how the run ends and tells the workers, so they ignore it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    _die_with_parent()
    link = ControlLink(context(), args.control, args.role, args.run_id)
    try:
        link.send(wire.HELLO)
        cfg = Config.from_dict(link.wait_for(wire.CONFIG).meta["config"])
        role_main(link, cfg)  # returns only through Stopped (see ControlLink.finish)
        raise RuntimeError("role ended without waiting for stop")
    except Stopped:
        return 0
    except BaseException as exc:  # report every failure, then exit non-zero
        link.report_error(exc)
        link.log(f"failed: {type(exc).__name__}: {exc}")
        return 1
    finally:
        # Each socket closes with its own linger: data sockets drop what is
        # queued, the control link gets a moment to deliver an error report.
        context().destroy()


def run(role_main: RoleMain) -> None:
    sys.exit(worker_main(role_main))
