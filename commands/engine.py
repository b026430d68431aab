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

from commands.spawn import module_of
from commands.supervisor import Supervisor, WorkerFailed
from pipeline import engines, rendezvous, security
from pipeline.cli import EngineArgs
from pipeline.engines import Engine
from pipeline.rendezvous import EngineCluster

# A rank's connection that closes is taken for its death only if no signal
# from the engine follows within this long: a Ctrl-C on mpiexec reaches
# every rank at once, and a worker may be gone a moment before we hear it.
SIGNAL_GRACE_S = 0.1


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
    return serve_placed(role_main, role, place)


class EngineSupervisor(Supervisor):
    """The supervisor of an engine's run: its workers are the other ranks,
    so a dead one is noticed by its connection closing (within
    milliseconds, before the engine tears the job down), not only by its
    heartbeats stopping; the error names its rank."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.fd_conn: dict[int, bytes] = {}  # file descriptor -> the ROUTER's name of it
        self.lost: WorkerFailed | None = None
        self.lost_at = 0.0
        self.monitor = self.router.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self.router = _Sources(self.router, self.fd_conn)

    def process_info(self, role: str) -> dict:
        c = self.cluster
        return {"pid": c.pids.get(role), "rank": c.ranks.get(role)}

    def _check_alive(self) -> None:
        self._watch_connections()
        if self.lost is not None and time.monotonic() - self.lost_at >= SIGNAL_GRACE_S:
            self._drain(50)  # it may have said why just before it went
            raise self.lost
        super()._check_alive()

    def _watch_connections(self) -> None:
        """Note the first role whose connection closed before it was done."""
        while self.lost is None and self.monitor.poll(0):
            event = parse_monitor_message(self.monitor.recv_multipart())
            role = self.members.role(self.fd_conn.pop(int(event["value"]), b""))
            if role is not None and role not in self.done:
                self.lost_at = time.monotonic()
                self.lost = WorkerFailed(role, f"{role} (rank {self.cluster.ranks[role]}) on "
                                               f"{self.host(role)} is gone: its connection closed")

    def _close(self, status: str, error: dict | None, start: float) -> int:
        if status == "interrupted":
            # The engine ends every rank once one dies, a quarter second
            # later: a connection that closed well before our own signal
            # came is that death. One that closed with it is the engine
            # passing a Ctrl-C (or scancel) on to every rank at once.
            signalled = time.monotonic()
            self._watch_connections()
            if self.lost is not None and self.lost_at <= signalled - SIGNAL_GRACE_S:
                status, error = "failed", {"role": self.lost.role,
                                           "host": self.host(self.lost.role),
                                           "message": self.lost.message}
        if error is not None and error.get("role") in self.cluster.ranks:
            error = {**error, "rank": self.cluster.ranks[error["role"]]}
        self.monitor.close(linger=0)
        self.router = self.router.sock
        return super()._close(status, error, start)


class _Sources:
    """The coordinator's ROUTER, noting which file descriptor each
    connection's messages arrive on, so a closed one names its role (the
    supervisor ties connections to roles, ``members``)."""

    def __init__(self, sock: zmq.Socket, fd_conn: dict[int, bytes]):
        self.sock = sock
        self.fd_conn = fd_conn

    def recv_multipart(self, *args, **kwargs):
        frames = self.sock.recv_multipart(*args, **kwargs)
        ident = frames[0]
        if isinstance(ident, zmq.Frame):
            with contextlib.suppress(zmq.ZMQError):
                self.fd_conn[ident.get(zmq.SRCFD)] = ident.bytes
        return frames

    def __getattr__(self, name: str):
        return getattr(self.sock, name)
