"""Which engine started this process (MPI, SLURM, a Kubernetes Indexed Job,
torchrun-style variables, or none), this process's rank and role, and where
rank 0 listens for the others: pure functions of the environment."""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Mapping

# No numpy here (pipeline.wire.protocol imports it): launch.py detects the engine
# before numpy loads, to cap the BLAS threads of every rank first.

LAUNCHERS = ("auto", "local", "mpi", "slurm", "k8s", "env")

# The ports rank 0's rendezvous may take when the engine names none: below
# Linux's ephemeral range (32768-60999), so an outgoing connection of the run
# itself never holds it; one job, one port, so two jobs on a node do not meet.
PORT_BASE, PORT_SPAN = 20000, 10000
K8S_PORT = 27100   # a pod has its own address: a fixed port is enough

# Variables a Kubernetes manifest sets for us (docs/k8s/dni-job.yaml): the
# Indexed Job gives each pod JOB_COMPLETION_INDEX but not the number of pods,
# nor the headless Service that makes pod names resolvable.
K8S_SIZE, K8S_SERVICE, K8S_PORT_VAR = "DNI_WORLD_SIZE", "DNI_SERVICE", "DNI_PORT"
# Any engine: where rank 0 listens, overriding the engine's rule ("HOST:PORT", or "HOST").
RENDEZVOUS_VAR = "DNI_RENDEZVOUS"


@dataclass(frozen=True)
class Engine:
    kind: str                  # "local", "mpi", "slurm", "k8s" or "env"
    rank: int
    size: int
    rendezvous: tuple[str, int] | None = None  # where rank 0 listens; None under MPI (allgather)
    job: str = ""              # the engine's job id, for messages

    @property
    def local(self) -> bool:
        return self.kind == "local"


LOCAL = Engine("local", 0, 1)


def _int(env: Mapping[str, str], name: str) -> int:
    text = env.get(name, "")
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"environment variable {name}={text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"environment variable {name}={text!r} is negative")
    return value


def _port(env: Mapping[str, str], name: str) -> int:
    port = _int(env, name)
    if not 1 <= port <= 65535:
        raise ValueError(f"environment variable {name}={port} is not a port (1..65535)")
    return port


def _split(address: str, default_port: int, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or "]" in port or (host.count(":") and not host.endswith("]")):
        return address.strip("[]"), default_port  # no port given
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{what}: bad port in {address!r}")
    return host.strip("[]"), int(port)


def job_port(job: str) -> int:
    """A port from the job id: numeric ids (SLURM's) map in order, others by a hash."""
    n = int(job) if job.isdigit() else zlib.crc32(job.encode())
    return PORT_BASE + n % PORT_SPAN


def expand_nodes(nodelist: str) -> list[str]:
    """SLURM's compressed node list (``node[01-03,07]``) as host names, by the
    python-hostlist library (the parser the SLURM tools' own Python users rely on)."""
    try:
        import hostlist
    except ModuleNotFoundError:
        raise ValueError("expanding SLURM's node list needs python-hostlist: "
                         "pip install python-hostlist (or pip install -e '.[mpi]')") from None
    try:
        nodes = hostlist.expand_hostlist(nodelist)
    except hostlist.BadHostlist as exc:
        raise ValueError(f"SLURM node list {nodelist!r}: {exc}") from None
    if not nodes:
        raise ValueError(f"SLURM node list {nodelist!r} names no node")
    return nodes


# Each engine, recognised by the variables it sets in every process it starts.
def _mpi(env: Mapping[str, str]) -> Engine | None:
    # Open MPI (docs.open-mpi.org, "Environment variables set for MPI
    # applications"): OMPI_COMM_WORLD_RANK / OMPI_COMM_WORLD_SIZE; its PMIx
    # runtime adds PMIX_RANK. MPICH's Hydra and Intel MPI: PMI_RANK / PMI_SIZE.
    for rank, size in (("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), ("PMI_RANK", "PMI_SIZE")):
        if rank in env and size in env:
            return Engine("mpi", _int(env, rank), _int(env, size))
    return None


def _slurm(env: Mapping[str, str]) -> Engine | None:
    # srun(1), OUTPUT ENVIRONMENT VARIABLES: SLURM_PROCID (the task's global
    # rank), SLURM_NTASKS (with the older SLURM_NPROCS), SLURM_JOB_ID,
    # SLURM_STEP_ID, SLURM_STEP_NODELIST (the step's nodes; the batch script
    # has SLURM_JOB_NODELIST). Tasks are placed in node-list order, rank 0 on
    # the first node.
    if "SLURM_PROCID" not in env or not ("SLURM_NTASKS" in env or "SLURM_NPROCS" in env):
        return None
    size = _int(env, "SLURM_NTASKS" if "SLURM_NTASKS" in env else "SLURM_NPROCS")
    job = env.get("SLURM_JOB_ID", env.get("SLURM_JOBID", ""))
    step = env.get("SLURM_STEP_ID", "")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") \
        or env.get("SLURM_NODELIST", "")
    where = None
    if nodelist:
        # Steps of one job may run side by side: each gets its own port.
        where = (expand_nodes(nodelist)[0], job_port(f"{job}.{step}" if step else job))
    return Engine("slurm", _int(env, "SLURM_PROCID"), size, where, job)


def _k8s(env: Mapping[str, str]) -> Engine | None:
    # An Indexed Job (kubernetes.io, "Indexed Job for Parallel Processing with
    # Static Work Assignment"): JOB_COMPLETION_INDEX in every pod; with a
    # headless Service as the pods' subdomain ("Job with Pod-to-Pod
    # Communication"), pod i is reachable as <job>-<i>.<service>, and its own
    # host name is <job>-<i>. The world size and the Service come from our
    # manifest's env (DNI_WORLD_SIZE, DNI_SERVICE).
    if "JOB_COMPLETION_INDEX" not in env:
        return None
    index = _int(env, "JOB_COMPLETION_INDEX")
    if K8S_SIZE not in env:
        raise ValueError(f"a Kubernetes Indexed Job needs {K8S_SIZE} (its completions) in the "
                         "pod's env; see docs/k8s/dni-job.yaml")
    size = _int(env, K8S_SIZE)
    where = None
    hostname = env.get("HOSTNAME", "")
    suffix = f"-{index}"
    if hostname.endswith(suffix) and env.get(K8S_SERVICE):
        job = hostname[: -len(suffix)]
        where = (f"{job}-0.{env[K8S_SERVICE]}",
                 _port(env, K8S_PORT_VAR) if K8S_PORT_VAR in env else K8S_PORT)
    return Engine("k8s", index, size, where, hostname[: -len(suffix)] if where else "")


def _torchrun(env: Mapping[str, str]) -> Engine | None:
    # torchrun (pytorch.org, torch.distributed.run, "Environment Variables"):
    # RANK, WORLD_SIZE, MASTER_ADDR (the host of rank 0), MASTER_PORT.
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return None
    where = None
    if env.get("MASTER_ADDR"):
        where = (env["MASTER_ADDR"], _port(env, "MASTER_PORT") if "MASTER_PORT" in env
                 else job_port(env["MASTER_ADDR"]))
    return Engine("env", _int(env, "RANK"), _int(env, "WORLD_SIZE"), where)


# In the order auto tries them: an MPI launcher may run under SLURM (then both
# sets are present, and MPI's channel is the better one), and SLURM or a
# Kubernetes pod may carry stray torchrun-style variables.
DETECTORS = {"mpi": _mpi, "slurm": _slurm, "k8s": _k8s, "env": _torchrun}


def detect(env: Mapping[str, str], forced: str = "auto") -> Engine:
    """The engine of this process. ``forced``: --launcher; "auto" takes the
    first engine whose variables are set, and a world of one process as a
    local run (a plain ``python launch.py`` inside an allocation). ValueError
    when a forced engine's variables are missing or a variable is malformed."""
    if forced not in LAUNCHERS:
        raise ValueError(f"argument --launcher: {forced!r} is not one of {', '.join(LAUNCHERS)}")
    if forced == "local":
        return LOCAL
    if forced != "auto":
        found = DETECTORS[forced](env)
        if found is None:
            raise ValueError(f"argument --launcher: {forced} set none of the variables it sets "
                             f"({_NEEDS[forced]}): is this process running under it?")
        engine = found
    else:
        engine = next((e for e in (d(env) for d in DETECTORS.values()) if e is not None), LOCAL)
        if engine.size <= 1:
            return LOCAL
    if not engine.rank < engine.size:
        raise ValueError(f"{engine.kind}: rank {engine.rank} is not below the world size "
                         f"{engine.size}")
    if RENDEZVOUS_VAR in env:
        default = engine.rendezvous[1] if engine.rendezvous else job_port(engine.job or "dni")
        engine = Engine(engine.kind, engine.rank, engine.size,
                        _split(env[RENDEZVOUS_VAR], default, RENDEZVOUS_VAR), engine.job)
    return engine


# The variable that gives each engine's rank away.
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "JOB_COMPLETION_INDEX",
                  "RANK")

_NEEDS = {"mpi": "OMPI_COMM_WORLD_RANK/SIZE or PMI_RANK/SIZE",
          "slurm": "SLURM_PROCID, SLURM_NTASKS",
          "k8s": "JOB_COMPLETION_INDEX", "env": "RANK, WORLD_SIZE"}


def world_size(layers: int) -> int:
    """Processes a run of ``layers`` weight layers takes: the coordinator,
    the source, and one per weight layer."""
    from pipeline.wire import protocol
    return len(protocol.all_roles(layers))


def role_of(rank: int, size: int) -> str:
    """Rank -> role in a world of ``size``: 0 the coordinator, 1 the source,
    2..size-2 the hidden layers, size-1 the output layer."""
    from pipeline.wire import protocol
    return protocol.all_roles(size - 2)[rank]


def check_world(size: int, layers: int, kind: str) -> None:
    """ValueError, one line naming both numbers, when the engine started a
    world that does not fit ``--layers``."""
    need = world_size(layers)
    if size != need:
        raise ValueError(f"--layers {layers} needs {need} processes (the coordinator, the source "
                         f"and {layers} layers), but {kind} started {size}: start it with "
                         f"-n {need}, or pass --layers {size - 2}"
                         if size >= 4 else
                         f"--layers {layers} needs {need} processes (the coordinator, the "
                         f"source and {layers} layers), but {kind} started {size}: start it "
                         f"with -n {need}")
