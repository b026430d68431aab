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
from commands.supervisor import Supervisor
from pipeline.coord.coordinator import Coordinator, WorkerFailed
from pipeline.net import engines, rendezvous, security
from pipeline.run.cli import EngineArgs
from pipeline.net.engines import Engine
from pipeline.net.rendezvous import EngineCluster
from pipeline.run.rundir import WriteError

# How long, once the engine's signal came, the ranks have to go or say they
# were stopped before the run is called interrupted. Open MPI follows its
# SIGTERM with a SIGKILL within a fraction of a second (docs/clusters.md), so
# the summary is written as the verdict stands before this window, and again
# should the window change it.
SIGNAL_WINDOW_S = 0.25
# While a closed connection awaits its verdict (blame), the longest the
# supervisor waits for a message before it looks again.
VERDICT_POLL_MS = 10


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
    from pipeline.run.rundir import open_run
    try:
        if cluster.policy(opts.insecure) == "insecure":
            print("WARNING: --insecure: traffic between hosts is NOT encrypted, and anyone who "
                  "can reach these ports can send the run messages", file=sys.stderr, flush=True)
        stream, sys.stderr = _Lenient(stream), _Lenient(sys.stderr)
        rd = open_run(cfg, resume is not None, stream)
        # rank 0's pty is the engine's, not the user's terminal (Progress)
        sup = Supervisor(cfg, rd, secrets.token_hex(6), stream, cluster=cluster, spawn=[],
                         insecure=opts.insecure, resume=resume, ranks=cluster.ranks,
                         terminal=False)
        sup.watch = RankWatch(sup, cluster)
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
    from pipeline.net.transport import Net, context
    from workers.serve import serve_placed
    role_main = importlib.import_module(module_of(role)).main

    def place():
        keys = cluster.keys_for(role, opts.insecure)
        guard = security.Guard(context(), keys) if keys else contextlib.nullcontext()
        return Net(context(), cluster.roles[role].host, 0, keys), endpoint, guard
    return serve_placed(role_main, role, place, parent_supervises=False)


class RankWatch:
    """What rank 0 adds to the supervisor's pump: its workers are the other
    ranks, so a dead one is noticed by its connection closing (within
    milliseconds, before the engine tears the job down), not only by its
    heartbeats stopping; the error names its rank.

    Which closed connection is the death: when a rank dies the engine ends
    the others, and when a whole host goes, its processes die in any order,
    so the engine may end ranks elsewhere before the last of that host's
    are gone. A rank the engine ends says so first (``stopped``, as every
    worker stopped by a signal does); a connection that closes without that
    word is a death. So the blame goes to the first silent closure, or,
    with none, to the first rank stopped from outside (``coord.blame``)."""

    def __init__(self, sup: Supervisor, cluster: EngineCluster):
        self.sup, self.cluster = sup, cluster
        self.fd_conn: dict[int, bytes] = {}  # file descriptor -> the ROUTER's name of it
        self.engine_parent = os.getppid()  # the engine's process that started this rank
        self.monitor = sup.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.poller = zmq.Poller()
        self.poller.register(sup.router, zmq.POLLIN)
        self.poller.register(self.monitor, zmq.POLLIN)
        self.began = time.perf_counter()
        self.written: tuple | None = None  # the verdict summary.json says so far

    def process_info(self, role: str) -> dict:
        c = self.cluster
        return {"pid": c.pids.get(role), "rank": c.ranks.get(role)}

    def poll(self, router: zmq.Socket, timeout_ms: int) -> bool:
        """The ROUTER's poll, ended early by a connection closing (an event
        on its monitor): a rank's death is seen at once, not after the wait;
        while a closure awaits its verdict, a short wait."""
        if self.sup.coord.closed:
            timeout_ms = min(timeout_ms, VERDICT_POLL_MS)
        return router in dict(self.poller.poll(timeout_ms))

    def received(self, conn_frame: zmq.Frame) -> None:
        """Note which file descriptor a connection's messages arrive on, so a
        closed one names its role (the coordinator ties connections to roles)."""
        with contextlib.suppress(zmq.ZMQError):
            self.fd_conn[conn_frame.get(zmq.SRCFD)] = conn_frame.bytes

    def _watch_connections(self, coord: Coordinator) -> None:
        """Tell the coordinator when each role's connection closed."""
        while self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            conn = self.fd_conn.pop(int(event["value"]), b"")
            coord.connection_closed(coord.members.role(conn), time.monotonic())

    def _explained(self, coord: Coordinator) -> set[str]:
        """Roles whose stop our own engine process going explains: it
        started every rank of this host, and its end stops them all (the
        kernel signals a rank whose parent dies)."""
        if os.getppid() == self.engine_parent:
            return set()
        here = coord.host("coordinator")
        return {role for role in coord.stopped if coord.host(role) == here}

    def check(self, coord: Coordinator, drain) -> None:
        """WorkerFailed naming the rank whose loss the closed connections show."""
        self._watch_connections(coord)
        if not coord.closed:
            return
        drain(0)  # a closing rank's last word came before its connection closed
        lost = coord.lost(time.monotonic(), self._explained(coord))
        if lost is not None:
            failure = coord.rank_failure(lost)
            self._write_early("failed", self.sup.error_of(lost, failure.message))
            drain(50)  # it may have said why just before it went
            raise failure

    def verdict(self, coord: Coordinator, drain, status: str, error: dict | None
                ) -> tuple[str, dict | None]:
        """The run's end as the summary is to say it: after the engine's
        signal (``interrupted``), a Ctrl-C or a rank's death; written at once
        unless the run completed (its summary comes after its weights)."""
        if status == "interrupted":
            status, error = self._signal_or_death(coord, drain)
        if status != "completed":
            self._write_early(status, error)
        return status, error

    def _signal_or_death(self, coord: Coordinator, drain) -> tuple[str, dict | None]:
        """A signal came (the engine's): a Ctrl-C on mpiexec or scancel, or
        the engine's teardown after a death. A Ctrl-C reaches every rank,
        and each says it was stopped before its connection closes; a death
        closes one without a word. Watch the ranks go for up to
        SIGNAL_WINDOW_S (or until one closes without a word), then say
        which it was."""
        deadline = time.monotonic() + SIGNAL_WINDOW_S
        try:
            while True:
                self._watch_connections(coord)
                drain(0)  # after the closures: each word came before its closure
                failure = coord.after_signal()
                if failure is not None:
                    return "failed", self.sup.error_of(failure.role, failure.message)
                self._write_early("interrupted", None)  # so far
                gone = set(coord.closed) | set(coord.done)
                if gone >= set(coord.roles) or time.monotonic() >= deadline:
                    return "interrupted", None
                self.monitor.poll(20)
        except WorkerFailed as exc:  # one said why it failed, meanwhile
            return "failed", self.sup.error_of(exc.role, exc.message)

    def _write_early(self, status: str, error: dict | None) -> None:
        """summary.json with the verdict as it stands, before the clean-up:
        the engine tears the job down on its own after a rank's death or a
        Ctrl-C, and its SIGKILL may end this process before the clean-up is
        over. The closing summary replaces it."""
        if self.written == (status, error):
            return
        summary = self.sup.summary(status, error, time.perf_counter() - self.began, [])
        # Not synced (a sync can take seconds on a busy disk), and whole: a
        # signal meanwhile is noted, not raised.
        with SIGNALS.shielded(), contextlib.suppress(OSError, WriteError):  # the closing summary says why
            self.sup.rd.write_json_at_once("summary.json", summary)
            self.written = (status, error)

    def close(self) -> None:
        self.monitor.close(linger=0)
