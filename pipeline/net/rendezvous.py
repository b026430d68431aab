"""How the ranks an engine started find each other: every rank's record
(role, host, pid, public key) to every rank, then the coordinator's control
endpoint from rank 0. Through MPI (mpi4py's allgather and bcast) where the
engine is MPI, otherwise through a small ZeroMQ rendezvous at rank 0."""
from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import zmq

from pipeline.net import security, transport
from pipeline.net.cluster import Cluster, Placement
from pipeline.net.engines import Engine
from pipeline.net.security import Keys

RENDEZVOUS_S = 300.0   # how long ranks wait for each other (the engine started them together)
HOST_VAR = "DNI_HOST"  # the address this rank listens on, where the rule below guesses wrong
POLL_MS = 200


# -- where this rank listens -----------------------------------------------------

def route_source(target: str) -> str | None:
    """The local address this host would use to reach ``target`` (a UDP
    connect picks the route and sends nothing), or None without a route."""
    try:
        infos = socket.getaddrinfo(target, 9, type=socket.SOCK_DGRAM)
    except OSError:
        return None
    for family, kind, proto, _, addr in infos:
        try:
            with socket.socket(family, kind, proto) as s:
                s.connect(addr)
                return s.getsockname()[0]
        except OSError:
            continue
    return None


def own_host(env: Mapping[str, str], hostnames: list[str], rank: int,
             target: str | None = None) -> str:
    """Where this rank listens: $DNI_HOST if set; loopback when every rank
    runs on this machine; else the address of the route to ``target`` (the
    rendezvous host) or, without one, to the first rank on another machine."""
    if env.get(HOST_VAR):
        return env[HOST_VAR]
    if len(set(hostnames)) == 1:
        return "127.0.0.1"
    if target is None:
        target = next(h for h in hostnames if h != hostnames[rank])
    found = route_source(target)
    if found is None:
        raise ValueError(f"no route from {hostnames[rank]} to {target}: set {HOST_VAR} to the "
                         "address this host's ranks should listen on")
    return found


# -- exchanging records --------------------------------------------------------------

class MpiExchange:
    """The records through MPI_COMM_WORLD: the engine's own channel, so
    public keys exchanged here need no other trust."""

    def __init__(self) -> None:
        try:
            from mpi4py import MPI
        except ModuleNotFoundError:
            raise ValueError("an MPI run needs mpi4py: pip install -e '.[mpi]'") from None
        self.mpi = MPI
        self.comm = MPI.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def gather(self, mine: Any) -> list[Any]:
        return self.comm.allgather(mine)

    def share(self, value: Any = None) -> Any:
        """Rank 0's ``value`` to every rank."""
        return self.comm.bcast(value, root=0)

    def close(self) -> None:
        # MPI is done once everyone is found: our data goes over ZeroMQ. A
        # rank that exits without finalising makes the engine end the job.
        if not self.mpi.Is_finalized():
            self.mpi.Finalize()


class ZmqExchange:
    """The records through rank 0, which listens at the engine's address.
    Plain text: the records hold addresses only (with a key directory, every
    later link is CURVE and checks who is at each address)."""

    def __init__(self, engine: Engine, timeout_s: float = RENDEZVOUS_S):
        if engine.rendezvous is None:
            raise ValueError(f"{engine.kind}: no rendezvous address: set DNI_RENDEZVOUS=HOST:PORT "
                             "(rank 0's host and a free port)")
        self.rank, self.size = engine.rank, engine.size
        self.host, self.port = engine.rendezvous
        self.deadline = time.monotonic() + timeout_s
        self.ctx = zmq.Context()
        self.peers: list[bytes] = []  # rank 0: each other rank's identity, by rank
        if self.rank == 0:
            self.sock = self.ctx.socket(zmq.ROUTER)
            self.sock.linger = 2000   # the last replies must get out before close
            try:
                self.sock.bind(f"tcp://*:{self.port}")
            except zmq.ZMQError as exc:
                self.close()
                raise ValueError(f"rank 0 cannot listen on port {self.port} for the other ranks "
                                 f"({exc}); set DNI_RENDEZVOUS=HOST:PORT to a free port") from None
        else:
            self.sock = self.ctx.socket(zmq.DEALER)
            self.sock.linger = 0
            self.sock.identity = str(self.rank).encode()
            host = f"[{self.host}]" if ":" in self.host else self.host
            self.sock.connect(f"tcp://{host}:{self.port}")  # retried until rank 0 listens

    def _recv(self, what: str) -> list[bytes]:
        while not self.sock.poll(POLL_MS):
            if time.monotonic() > self.deadline:
                raise RuntimeError(f"rendezvous at {self.host}:{self.port}: {what} did not come "
                                   f"within {RENDEZVOUS_S:.0f} s")
        return self.sock.recv_multipart()

    def gather(self, mine: Any) -> list[Any]:
        if self.rank != 0:
            self.sock.send(json.dumps(mine).encode())
            return json.loads(self._recv("rank 0's table")[-1])
        table: list[Any] = [mine] + [None] * (self.size - 1)
        ids: dict[int, bytes] = {}
        while len(ids) < self.size - 1:
            ident, body = self._recv(f"{self.size - 1 - len(ids)} more ranks")[:2]
            try:
                rank = int(ident.decode())
                record = json.loads(body)
                if not 0 < rank < self.size or rank in ids:
                    raise ValueError(f"rank {rank}")
            except (ValueError, UnicodeDecodeError):
                continue  # not one of ours, or a rank twice: dropped
            ids[rank], table[rank] = ident, record
        self.peers = [ids[r] for r in range(1, self.size)]
        body = json.dumps(table).encode()
        for ident in self.peers:
            transport.send_whole(self.sock, [ident, body])  # a ROUTER: never blocks
        return table

    def share(self, value: Any = None) -> Any:
        if self.rank != 0:
            return json.loads(self._recv("rank 0's control endpoint")[-1])
        body = json.dumps(value).encode()
        for ident in self.peers:
            transport.send_whole(self.sock, [ident, body])  # a ROUTER: never blocks
        return value

    def close(self) -> None:
        if not self.ctx.closed:
            self.sock.close()
            self.ctx.term()


def exchange_for(engine: Engine) -> MpiExchange | ZmqExchange:
    return MpiExchange() if engine.kind == "mpi" else ZmqExchange(engine)


# -- the run's placement, in memory ------------------------------------------------

@dataclass(frozen=True)
class EngineCluster(Cluster):
    """A cluster found through an engine rather than read from a file: each
    role's host (ports chosen at bind time), its rank and pid, and this
    process's per-run keys where the engine exchanged them."""
    engine: str = ""
    ranks: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    memory_keys: Keys | None = None

    def policy(self, insecure: bool) -> str:
        return "curve" if self.memory_keys is not None else super().policy(insecure)

    def keys_for(self, role: str, insecure: bool) -> Keys | None:
        if self.memory_keys is not None:
            assert self.memory_keys.role == role, "per-run keys are this process's own"
            return self.memory_keys
        return super().keys_for(role, insecure)


def record(engine: Engine, role: str, host: str, keys: Keys | None) -> dict:
    """What one rank tells the others."""
    return {"rank": engine.rank, "role": role, "host": host, "pid": os.getpid(),
            "hostname": socket.gethostname(),
            "public": keys.public.decode() if keys is not None else None}


def placement(engine: Engine, records: list[dict], keys: Keys | None,
              key_dir: str | None) -> EngineCluster:
    """The cluster of the gathered records; ``keys`` (per-run, in memory)
    learn every peer's public key here."""
    roles = {r["role"]: Placement(r["role"], r["host"], 0) for r in records}
    if keys is not None:
        peers = {r["role"]: r["public"].encode() for r in records}
        if peers[keys.role] != keys.public:
            raise RuntimeError("the exchanged table does not hold this rank's own key")
        keys = security.Keys(keys.role, keys.public, keys.secret, peers, None)
    return EngineCluster(Path(f"{engine.kind}:{engine.job or 'job'}"), {}, roles,
                         Path(key_dir) if key_dir else None, engine=engine.kind,
                         ranks={r["role"]: r["rank"] for r in records},
                         pids={r["role"]: r["pid"] for r in records}, memory_keys=keys)
