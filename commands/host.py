"""Cluster runs on one host (``launch.py --cluster FILE``): the coordinator
if this host has it, and every worker role the file puts here, or just the
one named by --role."""
from __future__ import annotations

import secrets
import sys
from typing import TextIO

import zmq

from commands.spawn import module_of, spawn, worker_env
from commands.supervisor import Supervisor
from pipeline.net import cluster as clusters
from pipeline.data import tasks
from pipeline.run.subcommands import ClusterArgs
from pipeline.run.resume import resume_config
from pipeline.run.rundir import open_run


def run_cluster(args: ClusterArgs, stream: TextIO) -> int:
    c = clusters.load(args.cluster)
    if args.role is not None:
        if args.role not in c.roles:
            raise ValueError(f"argument --role: {args.role!r} is not a role of {c.path} "
                             f"({', '.join(c.roles)})")
        here = [args.role]
    else:
        here = c.local_roles()
        if not here:
            raise ValueError(f"argument --cluster: no role of {c.path} listens on an address "
                             "of this host; name one with --role")
    # Refuse plain text across machines before anything listens.
    if c.policy(args.insecure) == "insecure":
        print("WARNING: --insecure: traffic between hosts is NOT encrypted, and anyone who can "
              "reach these ports can send the run messages", file=sys.stderr, flush=True)
    workers = [r for r in here if r != "coordinator"]
    if "coordinator" in here:
        resume = None
        if args.resume:
            cfg, resume = resume_config(args.resume, args.quiet)
        else:
            cfg = tasks.resolve(c.config(run_dir=args.run_dir or c.run.get("run_dir", ""),
                                         quiet=args.quiet,
                                         overwrite=args.overwrite or c.run.get("overwrite", False)),
                                limit_examples="examples" in c.run)
        rd = open_run(cfg, resume is not None, stream)
        try:
            supervisor = Supervisor(cfg, rd, secrets.token_hex(6), stream, cluster=c,
                                    spawn=workers, insecure=args.insecure, resume=resume)
        except (OSError, zmq.ZMQError) as exc:  # its port taken, its address not this host's
            rd.discard()
            me = c.roles["coordinator"]
            raise ValueError(f"argument --cluster: the coordinator at {me.host}:{me.port}: "
                             f"{exc}") from None
        return supervisor.run()
    extra = ["--cluster", str(c.path)] + (["--insecure"] if args.insecure else [])
    return _run_workers(workers, extra, worker_env(c.config().blas_threads))


def _run_workers(roles: list[str], extra: list[str], env: dict[str, str]) -> int:
    """The worker roles of this host, without the coordinator: start them
    (each its own process, its BLAS threads capped before numpy loads), wait
    for them, and pass a Ctrl-C on as a stop."""
    procs = [spawn(module_of(r), r, extra, env) for r in roles]
    try:
        codes = [p.wait() for p in procs]
    except KeyboardInterrupt:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        codes = [p.wait() for p in procs]
        return 130
    return max(codes, default=0)
