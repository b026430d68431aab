"""A rank started by an engine (mpiexec, srun, a Kubernetes Indexed Job,
torchrun-style variables): find the other ranks, then rank 0 supervises the
run and every other rank is its role's worker, in this very process."""
from __future__ import annotations

import contextlib
import importlib
import os
import secrets
import sys
import time
from typing import Callable, TextIO

import zmq
from zmq.utils.monitor import parse_monitor_message

from commands.spawn import SIGNALS, module_of
from commands.supervisor import Supervisor, WorkerFailed
from pipeline import engines, rendezvous, security
from pipeline.cli import EngineArgs
from pipeline.engines import Engine
from pipeline.rendezvous import EngineCluster
from pipeline.summary import build_summary

# A rank's connection that closes without a word is taken for its death
# only if no signal from the engine follows within this long: then we look
# at how the ranks go (see EngineSupervisor._signal_or_death).
SIGNAL_GRACE_S = 0.1
# How long, once the engine's signal came, the ranks have to go or say they
# were stopped before the run is called interrupted. Open MPI follows its
# SIGTERM with a SIGKILL within a fraction of a second (docs/clusters.md), so
# the summary is written as the verdict stands before this window, and again
# should the window change it.
SIGNAL_WINDOW_S = 0.25
# While a closed connection awaits its verdict (blame), the longest the
# supervisor waits for a message before it looks again.
VERDICT_POLL_MS = 10
# A rank that said it was stopped from outside is named only if no silent
# death shows within this long (see blame).
STOPPED_GRACE_S = 1.0


def run_rank(engine: Engine, opts: EngineArgs, prepare: Callable[[], tuple], stream: TextIO) -> int:
    """This rank's part of the run; its exit code. ``prepare()`` (rank 0
    only) parses the run's options: (Config, resume states or None); a bad
    option or a world of the wrong size ends every rank with 2, the reason
    said once, by rank 0."""
    exchange = rendezvous.exchange_for(engine)
    rank, size = exchange.rank, exchange.size
    try:
        verdict, cfg, resume = None, None, None
        if rank == 0:
            try:
                cfg, resume = prepare()
                engines.check_world(size, cfg.layers, _name(engine))
            except SystemExit as exc:  # argparse said why already
                verdict = f"exit {exc.code}"
            except ValueError as exc:
                print(f"launch.py: error: {exc}", file=sys.stderr, flush=True)
                verdict = str(exc)
        role = engines.role_of(rank, size) if size >= 4 else None
        keys = security.memory_keys(role) if engine.kind == "mpi" and role else None
        if engine.kind == "mpi":
            hostnames = exchange.gather(_hostname())
            host = rendezvous.own_host(os.environ, hostnames, rank)
        else:  # the address on the route to rank 0's rendezvous
            host = rendezvous.own_host(os.environ, [], rank, target=exchange.host)
        mine = {**rendezvous.record(engine, role or "", host, keys), "verdict": verdict}
        records = exchange.gather(mine)
        if records[0]["verdict"] is not None or role is None:
            return 2  # rank 0 said why
        cluster = rendezvous.placement(engine, records, keys, opts.keys)
        if rank == 0:
            return _coordinate(cfg, resume, cluster, exchange, opts, stream)
        endpoint = exchange.share()
    finally:
        exchange.close()
    if endpoint is None:
        return 2  # the coordinator could not start, and said why
    return _work(role, cluster, endpoint, opts)


def _name(engine: Engine) -> str:
    return {"mpi": "the MPI launcher", "slurm": "srun", "k8s": "the Indexed Job",
            "env": "the launcher"}.get(engine.kind, engine.kind)


def _hostname() -> str:
    import socket
    return socket.gethostname()


def _coordinate(cfg, resume, cluster: EngineCluster, exchange, opts: EngineArgs,
                stream: TextIO) -> int:
    """Rank 0: open the run directory, bind the control socket, tell the
    other ranks where it is, and supervise the run (nothing to spawn)."""
    from pipeline.rundir import open_run
    try:
        if cluster.policy(opts.insecure) == "insecure":
            print("WARNING: --insecure: traffic between hosts is NOT encrypted, and anyone who "
                  "can reach these ports can send the run messages", file=sys.stderr, flush=True)
        stream, sys.stderr = _Lenient(stream), _Lenient(sys.stderr)
        rd = open_run(cfg, resume is not None, stream)
        sup = EngineSupervisor(cfg, rd, secrets.token_hex(6), stream, cluster=cluster, spawn=[],
                               insecure=opts.insecure, resume=resume)
    except BaseException:
        exchange.share(None)  # every other rank exits 2 at once instead of waiting
        raise
    exchange.share(sup.endpoint)
    exchange.close()
    return sup.run()


class _Lenient:
    """rank 0's output: when the engine is gone before us (Open MPI's
    mpiexec exits as soon as a whole host dies), our last lines have nowhere
    to go, which must not turn a clean report into a traceback."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, text: str) -> int:
        try:
            return self.stream.write(text)
        except (OSError, ValueError):  # EIO/EPIPE, or a closed file
            return len(text)

    def flush(self) -> None:
        with contextlib.suppress(OSError, ValueError):
            self.stream.flush()

    def __getattr__(self, name: str):
        return getattr(self.stream, name)


def _work(role: str, cluster: EngineCluster, endpoint: str, opts: EngineArgs) -> int:
    """Any other rank: this process becomes its role's worker."""
    from pipeline.transport import Net, context
    from pipeline.worker import serve_placed
    role_main = importlib.import_module(module_of(role)).main

    def place():
        keys = cluster.keys_for(role, opts.insecure)
        guard = security.Guard(context(), keys) if keys else contextlib.nullcontext()
        return Net(context(), cluster.roles[role].host, 0, keys), endpoint, guard
    return serve_placed(role_main, role, place, parent_supervises=False)


class EngineSupervisor(Supervisor):
    """The supervisor of an engine's run: its workers are the other ranks,
    so a dead one is noticed by its connection closing (within
    milliseconds, before the engine tears the job down), not only by its
    heartbeats stopping; the error names its rank.

    Which closed connection is the death: when a rank dies the engine ends
    the others, and when a whole host goes, its processes die in any order,
    so the engine may end ranks elsewhere before the last of that host's
    are gone. A rank the engine ends says so first (``stopped``, as every
    worker stopped by a signal does); a connection that closes without that
    word is a death. So the blame goes to the first silent closure, or,
    with none, to the first rank stopped from outside (see blame)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fd_conn: dict[int, bytes] = {}  # file descriptor -> the ROUTER's name of it
        self.closed: dict[str, float] = {}  # role -> when its connection closed, in order
        self.engine_parent = os.getppid()  # the engine's process that started this rank
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.router = _Sources(self.router, self.fd_conn, self.monitor)
        self.began = time.perf_counter()  # run() sets it again as it starts
        self.written: tuple | None = None  # the verdict summary.json says so far

    def run(self) -> int:
        self.began = time.perf_counter()
        return super().run()

    def process_info(self, role: str) -> dict:
        c = self.cluster
        return {"pid": c.pids.get(role), "rank": c.ranks.get(role)}

    def _recv(self, timeout_ms: int):
        if self.closed:  # blame's grace runs: look again soon after it ends
            timeout_ms = min(timeout_ms, VERDICT_POLL_MS)
        return super()._recv(timeout_ms)

    def _check_alive(self) -> None:
        self._watch_connections()
        if self.closed:
            self._drain(0)  # a closing rank's last word came before its connection closed
            lost = blame(self.closed, self.stopped, time.monotonic(), self._explained())
            if lost is not None:
                failure = self._failure(lost)
                self._write_early("failed", self._error(lost, failure.message))
                self._drain(50)  # it may have said why just before it went
                raise failure
        super()._check_alive()

    def _failure(self, role: str) -> WorkerFailed:
        where = f"{role} (rank {self.cluster.ranks[role]}) on {self.host(role)}"
        if role in self.stopped:
            return WorkerFailed(role, f"{where} was the first rank stopped from outside the "
                                      f"run ({self.stopped[role]})")
        return WorkerFailed(role, f"{where} is gone: its connection closed")

    def _explained(self) -> set[str]:
        """Roles whose stop our own engine process going explains: it
        started every rank of this host, and its end stops them all (the
        kernel signals a rank whose parent dies)."""
        if os.getppid() == self.engine_parent:
            return set()
        here = self.host("coordinator")
        return {role for role in self.stopped if self.host(role) == here}

    def _watch_connections(self) -> None:
        """Note when each role's connection closed before it was done."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            role = self.members.role(self.fd_conn.pop(int(event["value"]), b""))
            if role is not None and role not in self.done:
                self.closed.setdefault(role, time.monotonic())

    def _error(self, role: str, message: str) -> dict:
        """summary.json's error for ``role`` (also the supervisor's own)."""
        error = {"role": role, "host": self.host(role) if role in self.roles else "localhost",
                 "message": message}
        if role in self.cluster.ranks:
            error["rank"] = self.cluster.ranks[role]
        return error

    def _write_early(self, status: str, error: dict | None) -> None:
        """summary.json with the verdict as it stands, before the clean-up:
        the engine tears the job down on its own after a rank's death or a
        Ctrl-C, and its SIGKILL may end this process before the clean-up is
        over. The closing summary replaces it."""
        if self.written == (status, error):
            return
        summary = build_summary(self.cfg, status=status, run_id=self.run_id, final=self.final,
                                layers=[], error=error, epochs_done=self.progress.epochs_done,
                                wall_s=time.perf_counter() - self.began, watch=self.watch)
        summary["control_dropped"] = dict(self.refused)
        # Not synced (a sync can take seconds on a busy disk), and whole: a
        # signal meanwhile is noted, not raised.
        with SIGNALS.shielded(), contextlib.suppress(OSError):  # the closing summary says why
            self.rd.write_json_at_once("summary.json", summary)
            self.written = (status, error)

    def _close(self, status: str, error: dict | None, start: float) -> int:
        if status == "interrupted":
            status, error = self._signal_or_death()
        elif error is not None and error.get("role") in self.cluster.ranks:
            error = {**error, "rank": self.cluster.ranks[error["role"]]}
        if status != "completed":  # a completed run's summary comes after its weights
            self._write_early(status, error)
        self.monitor.close(linger=0)
        self.router = self.router.sock
        return super()._close(status, error, start)

    def _signal_or_death(self) -> tuple[str, dict | None]:
        """A signal came (the engine's): a Ctrl-C on mpiexec or scancel, or
        the engine's teardown after a death. A Ctrl-C reaches every rank,
        and each says it was stopped before its connection closes; a death
        closes one without a word. Watch the ranks go for up to
        SIGNAL_WINDOW_S (or until one closes without a word), then say
        which it was."""
        deadline = time.monotonic() + SIGNAL_WINDOW_S
        try:
            while True:
                self._watch_connections()
                self._drain(0)  # after the closures: each word came before its closure
                first = first_silent(self.closed, self.stopped)
                if first is not None:
                    return "failed", self._error(first, self._failure(first).message)
                self._write_early("interrupted", None)  # so far
                gone = set(self.closed) | set(self.done)
                if gone >= set(self.roles) or time.monotonic() >= deadline:
                    return "interrupted", None
                self.monitor.poll(20)
        except WorkerFailed as exc:  # one said why it failed, meanwhile
            return "failed", self._error(exc.role, exc.message)


def first_silent(closed: dict[str, float], stopped: dict[str, str]) -> str | None:
    """The first role whose connection closed without saying it was stopped."""
    silent = [(t, role) for role, t in closed.items() if role not in stopped]
    return min(silent)[1] if silent else None


def blame(closed: dict[str, float], stopped: dict[str, str], now: float,
          explained: set[str] = frozenset()) -> str | None:
    """The role whose loss a closed connection shows, from when each role's
    connection closed (``closed``) and which of them said they were stopped
    from outside (``stopped``), or None: none yet. The first silent closure,
    SIGNAL_GRACE_S after it (a signal to us may yet show it was a Ctrl-C).
    With none, the first rank stopped from outside, STOPPED_GRACE_S after the
    first closure (a silent death may yet show meanwhile), leaving out those
    whose stop we can explain otherwise (``explained``: our own engine
    process went, and so did this host's ranks) while there are others: the
    ranks of a host whose engine daemon died are stopped by the kernel
    (their parent died), and the engine, learning of it, ends the job."""
    first = first_silent(closed, stopped)
    if first is not None:
        return first if now - closed[first] >= SIGNAL_GRACE_S else None
    if not closed or now - min(closed.values()) < STOPPED_GRACE_S:
        return None
    unexplained = [(t, role) for role, t in closed.items() if role not in explained]
    return min(unexplained or [(t, role) for role, t in closed.items()])[1]


class _Sources:
    """The coordinator's ROUTER, noting which file descriptor each
    connection's messages arrive on, so a closed one names its role (the
    supervisor ties connections to roles, ``members``)."""

    def __init__(self, sock: zmq.Socket, fd_conn: dict[int, bytes], monitor: zmq.Socket):
        self.sock = sock
        self.fd_conn = fd_conn
        self.poller = zmq.Poller()
        self.poller.register(sock, zmq.POLLIN)
        self.poller.register(monitor, zmq.POLLIN)

    def poll(self, timeout: int | None = None) -> int:
        """The ROUTER's poll, ended early by a connection closing (an event
        on its monitor): a rank's death is seen at once, not after the wait."""
        return dict(self.poller.poll(timeout)).get(self.sock, 0)

    def recv_multipart(self, *args, **kwargs):
        frames = self.sock.recv_multipart(*args, **kwargs)
        ident = frames[0]
        if isinstance(ident, zmq.Frame):
            with contextlib.suppress(zmq.ZMQError):
                self.fd_conn[ident.get(zmq.SRCFD)] = ident.bytes
        return frames

    def __getattr__(self, name: str):
        return getattr(self.sock, name)
