"""A local run (``launch.py``) and the supervisor of every run: a thin pump
around the socket-free coordinator (``pipeline/coord/coordinator.py``). It
starts one process per role, carries the control socket's messages and the
time to the coordinator, carries out the actions it returns (sends, the run
directory's records, what the user reads), and stops every process it
started. A cluster host's coordinator is this same pump; an engine's rank 0
adds a watch on its ranks' connections (``commands/engine.py``)."""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import Protocol, TextIO

import zmq

from commands.spawn import SIGNALS, module_of, spawn, worker_env
from pipeline.config import Config
from pipeline.coord.coordinator import (Action, Coordinator, Record, Say, Send, Warn,
                                        WorkerFailed)
from pipeline.net import memory, security, transport
from pipeline.net.cluster import Cluster
from pipeline.net.transport import Net, private_dir, remove_private_dir
from pipeline.run.in_process import run_in_process
from pipeline.run.rundir import RunDir, WriteError, open_run
from pipeline.run.summary import (Progress, build_summary, close_run, layer_entry,
                                  resume_command, save_weights)
from pipeline.wire import codec as wire
from pipeline.wire import protocol
from pipeline.wire.protocol import Message
from workers.serve import TOKEN_ENV

STARTUP_S = 60.0     # a worker that has not said hello by then is broken
CLUSTER_STARTUP_S = 600.0  # roles started by hand on other hosts get longer
STOP_GRACE_S = 3.0   # after "stop", time to exit before SIGTERM, then SIGKILL
POLL_MS = 100

__all__ = ["Supervisor", "WorkerFailed", "run"]


def run(cfg: Config, stream: TextIO = sys.stdout, resume: dict | None = None) -> int:
    """Run ``cfg`` to the end; returns the exit code (0 completed, 1 failed,
    130 interrupted). The summary is written whatever happens. ``resume``:
    each layer role's checkpointed state, for a run that goes on from one."""
    rd = open_run(cfg, resume is not None, stream)
    run_id = secrets.token_hex(6)
    if cfg.in_process or cfg.simulate:
        return run_in_process(cfg, rd, run_id, stream, SIGNALS.shielded, resume)
    return Supervisor(cfg, rd, run_id, stream, resume=resume).run()


class Watch(Protocol):
    """What an engine's rank 0 adds to the pump (``commands/engine.py``):
    its ranks' connections watched as they close."""

    def poll(self, router: zmq.Socket, timeout_ms: int) -> bool: ...
    def received(self, conn_frame: zmq.Frame) -> None: ...
    def check(self, coord: Coordinator, drain) -> None: ...
    def verdict(self, coord: Coordinator, drain, status: str, error: dict | None
                ) -> tuple[str, dict | None]: ...
    def process_info(self, role: str) -> dict: ...
    def close(self) -> None: ...


class Supervisor:
    """Runs one training run: spawns the worker roles it is to start, waits
    for every role to say hello (also roles started by hand on other hosts,
    in a cluster run), wires them together, and watches them to the end."""

    def __init__(self, cfg: Config, rd: RunDir, run_id: str, stream: TextIO,
                 cluster: "Cluster | None" = None, spawn: list[str] | None = None,
                 insecure: bool = False, resume: dict | None = None,
                 ranks: dict[str, int] | None = None, terminal: bool | None = None):
        self.cfg, self.rd, self.run_id, self.stream = cfg, rd, run_id, stream
        self.cluster, self.insecure = cluster, insecure
        self.ctx = zmq.Context()
        self.guard = contextlib.ExitStack()
        # A local run's sockets live in a directory only this user can enter.
        self.ipc_dir = private_dir() if cluster is None else None
        try:
            net = Net(self.ctx, ipc_dir=self.ipc_dir)
            if cluster is not None:
                me = cluster.roles["coordinator"]
                keys = cluster.keys_for("coordinator", insecure)
                if keys is not None:
                    self.guard.enter_context(security.Guard(self.ctx, keys))
                net = Net(self.ctx, me.host, me.port, keys)
            # Under CURVE only the keys of the run's roles get in; each
            # message then carries its key's role (security.user_id).
            self.router, self.endpoint = net.bind(zmq.ROUTER,
                                                  admit=protocol.roles(cfg.layers))
        except BaseException:  # a failed bind, a signal: leave nothing behind
            self.guard.close()
            self.ctx.destroy(linger=0)
            remove_private_dir(self.ipc_dir)
            raise
        # Local runs: the processes we start get this secret, and a hello
        # must show it before any config goes out (pipeline/coord/membership.py).
        self.token = secrets.token_hex(16) if cluster is None else None
        hosts = {r: cluster.roles[r].host for r in cluster.roles} if cluster else {}
        self.coord = Coordinator(cfg, run_id, token=self.token,
                                 curve=cluster is not None and net.keys is not None,
                                 hosts=hosts, announce=cluster is not None, resume=resume,
                                 ranks=ranks)
        self.spawn_roles = self.coord.roles if spawn is None else spawn
        self.procs: dict[str, subprocess.Popen] = {}
        self.progress = Progress(cfg, stream, terminal)
        self.write_error: WriteError | None = None  # the run directory could not be written
        self.watch: Watch | None = None  # an engine's rank 0: its ranks' connections

    def host(self, role: str) -> str:
        return self.coord.host(role)

    def process_info(self, role: str) -> dict:
        """What config.json says of a role's process besides host and endpoints."""
        if self.watch is not None:
            return self.watch.process_info(role)
        return {"pid": self.procs[role].pid if role in self.procs else None}

    # -- what the coordinator says to do ---------------------------------------------------
    def _do(self, actions: list[Action]) -> None:
        for a in actions:
            if self.rd.take_checkpoint(a, self.coord.roles[1:], self.cfg.keep_checkpoints):
                continue
            if isinstance(a, Send):
                self._send(a.role, a.msg)
            elif isinstance(a, Record):
                self.rd.metric(a.event)
                if a.event.get("event") == "epoch":
                    self.progress.epoch(a.event)
            elif isinstance(a, Warn):
                self.progress.warn(a.text)
            elif isinstance(a, Say):
                print(a.text, file=sys.stderr, flush=True)

    def _send(self, role: str, msg: Message) -> None:
        conn = self.coord.members.conn(role)
        if conn is None:
            return
        try:
            transport.send_whole(self.router, [conn, *wire.encode(msg)])
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to tell it

    def _recv(self, timeout_ms: int) -> bool:
        """One control message to the coordinator, if one comes within
        ``timeout_ms``; whether one came."""
        ready = (self.watch.poll(self.router, timeout_ms) if self.watch is not None
                 else self.router.poll(timeout_ms))
        if not ready:
            return False
        conn_frame, *frames = self.router.recv_multipart(copy=False)
        if self.watch is not None:
            self.watch.received(conn_frame)
        conn = conn_frame.bytes
        try:
            msg = wire.decode(frames)
        except ValueError as exc:
            self._do(self.coord.undecodable(conn, str(exc)))
            return True
        key_role = (security.user_id(frames[0]) if self.coord.members.curve and frames
                    else None)
        size = sum(len(f) for f in frames)  # bytes on the wire, for the metric budget
        self._do(self.coord.receive(conn, msg, size, time.monotonic(), key_role))
        return True

    def _drain(self, timeout_ms: int) -> None:
        while self._recv(timeout_ms):
            timeout_ms = 0

    def _check_alive(self) -> None:
        if self.watch is not None:
            self.watch.check(self.coord, self._drain)
        for role, p in self.procs.items():
            code = p.poll()
            if code is not None and role not in self.coord.done:
                self._drain(500)  # it may have said why just before exiting
                self.coord.exited(role, code)
        self._do(self.coord.tick(time.monotonic()))

    def _step(self) -> None:
        """One turn of the pump: a message (or the wait for one), a signal
        noted and lost to a destructor raised again, the liveness checks."""
        self._recv(POLL_MS)
        SIGNALS.raise_if_noted()
        self._check_alive()

    # -- processes ---------------------------------------------------------------
    def _spawn(self) -> None:
        env = worker_env(self.cfg.blas_threads)
        if self.token is not None:
            env = {**env, TOKEN_ENV: self.token}
        for role in self.spawn_roles:
            if self.cluster is None:
                where = ["--control", self.endpoint]
            else:
                where = (["--cluster", str(self.cluster.path)]
                         + (["--insecure"] if self.insecure else []))
            self.procs[role] = spawn(module_of(role), role, where, env)

    def _stop_all(self, weights: bool = False) -> None:
        """Stop every process; with ``weights``, each layer first sends its
        weights as they are (a DONE), for a run that cannot go on writing."""
        self._do(self.coord.stop(report=weights))
        deadline = time.monotonic() + STOP_GRACE_S
        while weights and self.coord.awaited_reports() and time.monotonic() < deadline:
            with contextlib.suppress(WorkerFailed, WriteError):  # nothing changes now
                self._recv(POLL_MS)
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            for p in self.procs.values():
                if p.poll() is None and sig is not None:
                    p.send_signal(sig)
            for p in self.procs.values():
                try:
                    p.wait(max(0.05, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    pass
            if all(p.poll() is not None for p in self.procs.values()):
                return
            deadline = time.monotonic() + 1.0

    # -- the run ---------------------------------------------------------------------
    def run(self) -> int:
        start = time.perf_counter()
        status, error = "completed", None
        try:
            self._spawn()
            deadline = time.monotonic() + (STARTUP_S if self.cluster is None
                                           else CLUSTER_STARTUP_S)
            while not self.coord.all_ready:  # a rejoin may take a ready back
                self._step()
                self.coord.waiting_for(deadline, time.monotonic())
            self.rd.write_config({
                "run_id": self.run_id, "config": self.cfg.to_dict(),
                "supervisor": {"control": self.endpoint, "pid": os.getpid()},
                "cluster": str(self.cluster.path) if self.cluster else None,
                "processes": {r: {"host": self.host(r), "endpoints": ep,
                                  **self.process_info(r)}
                              for r, ep in self.coord.endpoints().items()}})
            self._do(self.coord.start(time.monotonic()))
            while not self.coord.finished:
                self._step()
        except KeyboardInterrupt:
            status = "interrupted"
        except WriteError as exc:  # the disk is full: stop now, keep what is written
            self.write_error = exc
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": str(exc)}
        except WorkerFailed as exc:
            status, error = "failed", self.error_of(exc.role, exc.message)
        except Exception as exc:  # a bug here must still stop the workers and say why
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": f"{type(exc).__name__}: {exc}"}
        # No signal may cut the clean-up short: it is noted, and ends the command after.
        with SIGNALS.shielded():
            if self.watch is not None:  # the engine's signal: a Ctrl-C, or a rank's death?
                status, error = self.watch.verdict(self.coord, self._drain, status, error)
            return self._close(status, error, start)

    def error_of(self, role: str, message: str) -> dict:
        """summary.json's error naming ``role`` (its rank, under an engine)."""
        error = {"role": role, "host": self.host(role) if role in self.coord.roles
                 else "localhost", "message": message}
        if role in self.coord.ranks:
            error["rank"] = self.coord.ranks[role]
        return error

    def summary(self, status: str, error: dict | None, wall_s: float, layers: list[dict],
                weights: str | None = None, usage: tuple[dict, dict] = ({}, {})) -> dict:
        """summary.json as the run stands."""
        summary = build_summary(self.cfg, status=status, run_id=self.run_id,
                                final=self.coord.final, layers=layers, error=error,
                                epochs_done=self.progress.epochs_done, wall_s=wall_s,
                                peak_rss_mb=usage[0], cpu_s=usage[1], watch=self.coord.watch,
                                weights=weights)
        summary["control_dropped"] = dict(self.coord.refused)
        return summary

    def _close(self, status: str, error: dict | None, start: float) -> int:
        """Stop every process, write the weights and the summary. A run the
        run directory failed asks each layer for its weights as it stops,
        and writes them (into the space kept for them)."""
        at_stop = self.write_error is not None and self.coord.started
        self._stop_all(weights=at_stop)
        if self.watch is not None:
            self.watch.close()
        self.router.close()
        self.guard.close()
        self.ctx.term()
        remove_private_dir(self.ipc_dir)
        self.progress.finish()
        peaks, cpu = self.coord.usage()
        peaks["supervisor"], cpu["supervisor"] = memory.peak_rss_mb(), memory.cpu_s()
        results = self.coord.results()
        layers = [layer_entry(self.coord.roles.index(role), role, counters, errors)
                  for role, counters, errors, _ in results]
        saved, failed = None, None
        if status == "completed" or at_stop:
            saved, failed = save_weights(self.rd, {role: w for role, _, _, w in results},
                                         status)
        if failed is not None and error is None:
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": str(failed)}
        summary = self.summary(status, error, time.perf_counter() - start, layers, saved,
                               (peaks, cpu))
        how = "engine" if self.watch is not None else "cluster" if self.cluster else "local"
        path = str(getattr(self.cluster, "path", ""))
        return close_run(self.rd, summary, self.stream,
                         resume_command(str(self.rd.path), how, path))
