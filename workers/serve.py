"""What every worker process does around its role: arguments, signals,
where it listens, the handshake with the coordinator, and reporting a failure
before exiting. A role's own ``main`` (``workers/``) gets the link, the
run's config and where to listen."""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import sys
from typing import Callable

from pipeline.net import memory, transport
from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.net.control import ControlLink
from pipeline.net.transport import UNPROTECTED, Net, Stopped, context

RoleMain = Callable[[ControlLink, Config, Net], None]
HANDSHAKE_S = 600.0  # how long a worker waits for the coordinator's reply to its hello
# A local supervisor hands each process it starts the run's secret here (the
# environment, unlike the arguments, is readable only by the same user).
TOKEN_ENV = "DNI_RUN_TOKEN"
PARENT_ENV = "DNI_PARENT_PID"  # the pid of the process that started this worker


def _die_with_parent() -> None:
    """Linux: have the kernel send SIGTERM when the supervisor dies, so a
    worker is never orphaned, even after a SIGKILL of the supervisor. A
    supervisor that died before this (our imports take about a second) is
    never signalled to us: then the parent is no longer the one that started
    us, and we leave at once instead of waiting for a config that never comes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass  # elsewhere the parent-pid check in the poll loop does the job
    started_by = os.environ.get(PARENT_ENV, "")
    if started_by.isdigit() and os.getppid() != int(started_by):
        raise SystemExit("the supervisor that started this worker is gone")


# Whether the role has ended and the process only cleans up. A SIGTERM then
# (an engine tearing the job down after another rank's death, the
# supervisor's after a stop) has nothing left to stop: raised, it would cut
# the clean-up short (Context.term, the Guard's thread) with a traceback.
_cleaning_up = False


def _terminate(signum, frame) -> None:
    # A clean exit, but a bounded one: a second SIGTERM, or 3 s of clean-up,
    # ends the process by the kernel's default action.
    global _cleaning_up
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _bound_exit(3)
    if _cleaning_up:
        return  # noted: the alarm bounds what is left
    _cleaning_up = True
    transport.raise_when_whole(Stopped(f"signal {signum}", outside=True))


def _bound_exit(seconds: int) -> None:
    """Have the kernel end the process within ``seconds``, never extending
    an alarm already armed to go off sooner."""
    pending = signal.alarm(0)
    signal.alarm(min(pending, seconds) if pending else seconds)


def _clean_up_begins() -> None:
    global _cleaning_up
    _cleaning_up = True


def placement(args: argparse.Namespace) -> tuple[Net, str, contextlib.AbstractContextManager]:
    """(Net, supervisor endpoint, security guard) for a local or a cluster worker."""
    ctx = context()
    if args.cluster is None:
        if args.control is None:
            raise SystemExit("a worker needs --control (local run) or --cluster")
        # A local supervisor listens in the run's private directory: so do we.
        ipc_dir = (None if not args.control.startswith("ipc://") else
                   UNPROTECTED if args.control.startswith("ipc://@") else  # bench only
                   os.path.dirname(args.control[len("ipc://"):]))
        return Net(ctx, ipc_dir=ipc_dir), args.control, contextlib.nullcontext()
    from pipeline.net import cluster, security
    c = cluster.load(args.cluster)
    if args.role not in c.roles:
        raise SystemExit(f"role {args.role!r} is not in {args.cluster}")
    keys = c.keys_for(args.role, args.insecure)
    me = c.roles[args.role]
    guard = security.Guard(ctx, keys) if keys else contextlib.nullcontext()
    return (Net(ctx, me.host, me.port, keys),
            c.roles["coordinator"].endpoint(), guard)


def worker_main(role_main: RoleMain, argv: list[str] | None = None) -> int:
    """Entry point of a worker: ``python -m workers.<role> --role R`` with
    ``--control EP`` (started by a local supervisor) or ``--cluster FILE``."""
    p = argparse.ArgumentParser(description="A pipeline worker; started by launch.py.")
    p.add_argument("--role", required=True, help="role name, e.g. layer1")
    p.add_argument("--control", help="supervisor's control endpoint (local runs)")
    p.add_argument("--cluster", help="cluster file (runs across machines)")
    p.add_argument("--insecure", action="store_true",
                   help="allow a non-loopback address without CURVE keys")
    args = p.parse_args(argv)
    # Started by launch.py, here or on a cluster host: that launcher is the
    # parent to outlive never.
    return serve_placed(role_main, args.role, lambda: placement(args), parent_supervises=True)


def serve_placed(role_main: RoleMain, role: str,
                 place: Callable[[], tuple[Net, str, contextlib.AbstractContextManager]],
                 parent_supervises: bool) -> int:
    """Run ``role`` in this process until the coordinator says stop: the
    signals, then ``place()`` (Net, control endpoint, guard), the handshake
    and the role. A worker started by launch.py (``parent_supervises``: its
    parent is the coordinator or a host's launcher), or a rank an engine
    started (its parent is the engine's)."""
    # Ctrl-C is the supervisor's to handle; it tells the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _terminate)
    _die_with_parent()
    try:
        net, control, guard = place()
        with guard:
            return _serve(role_main, net, control, role, parent_supervises)
    except Stopped:
        # The signal came before the role began, or just as it ended (before
        # _serve could say the clean-up had begun): stopped, nothing to say.
        return 0
    finally:
        # After the guard: each socket closes with its own linger (data sockets
        # drop what is queued, outboxes after OUTBOX_LINGER_MS at most; the
        # control link delivers an error report, and
        # lingers only while the coordinator may still be there to take it,
        # see ControlLink.report_error). zmq_ctx_term waits out that linger
        # where no Python signal handler runs: a last-resort alarm, which
        # never extends the shorter one a stop has already armed, ends the
        # process by the kernel's default action should anything else hold it.
        _clean_up_begins()
        _bound_exit(5)
        context().destroy()


def _serve(role_main: RoleMain, net: Net, control: str, role: str,
           parent_supervises: bool) -> int:
    link = ControlLink(net, control, role, parent_supervises=parent_supervises)
    try:
        link.send(link.say.hello(os.environ.pop(TOKEN_ENV, "")))
        # Roles started by hand may wait long for the coordinator to come up.
        config, run_id, link.resume = protocol.config(
            link.wait_for(protocol.CONFIG, timeout_s=HANDSHAKE_S))
        link.joined_run(run_id)
        cfg = Config.from_dict(config)
        role_main(link, cfg, net)  # returns only through Stopped (see ControlLink.finish)
        raise RuntimeError("role ended without waiting for stop")
    except Stopped as stop:
        _clean_up_begins()
        if stop.outside and link.joined:
            # Stopped from outside the run (an engine's teardown, a user):
            # say so, so that the coordinator does not take it for a death.
            # (The kernel's SIGTERM when our parent dies looks the same: at
            # that moment getppid() may still give the parent's pid, since a
            # dying process's children pass to its last live thread first.)
            link.report_stopped(str(stop))
        return 0
    except BaseException as exc:  # report every failure, then exit non-zero
        _clean_up_begins()
        link.report_error(exc)
        link.log(f"failed: {type(exc).__name__}: {exc}")
        return 1


def run(role_main: RoleMain) -> None:
    memory.tune_allocator()
    sys.exit(worker_main(role_main))
