"""A local run (``launch.py``) and the supervisor of every run: starts one
process per role, handshakes, shows progress, writes the run directory, and
stops every process it started."""
from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from typing import TextIO

import zmq

from commands.spawn import SIGNALS, module_of, spawn, worker_env
from workers.serve import TOKEN_ENV
from pipeline.net import memory, security, transport
from pipeline.wire import codec as wire, protocol
from pipeline.layers.state import check_states, check_weights
from pipeline.net.cluster import Cluster
from pipeline.config import Config
from pipeline.coord.membership import Membership
from pipeline.wire.protocol import HEARTBEAT_S, LIVENESS_S
from pipeline.wire.protocol import Message, Speaker
from pipeline.run.in_process import run_in_process
from pipeline.run.rundir import RunDir, WriteError, open_run
from pipeline.nodes.schedule import checkpoint_due
from pipeline.coord.sgwatch import SGWatch
from pipeline.run.summary import Progress, build_summary, close_run, layer_entry, save_weights
from pipeline.net.transport import Net, private_dir, remove_private_dir
from pipeline.coord.watchdog import Watchdog

STARTUP_S = 60.0     # a worker that has not said hello by then is broken
CLUSTER_STARTUP_S = 600.0  # roles started by hand on other hosts get longer
STOP_GRACE_S = 3.0   # after "stop", time to exit before SIGTERM, then SIGKILL
# A role's metric events: each at most this many bytes on the wire, and no
# more than a burst plus a few per epoch (a layer sends one or two an epoch).
METRIC_BYTES = 64 * 1024
METRIC_BURST, METRIC_PER_EPOCH = 256, 16
POLL_MS = 100


class WorkerFailed(Exception):
    def __init__(self, role: str, message: str):
        super().__init__(f"{role}: {message}")
        self.role = role
        self.message = message


def run(cfg: Config, stream: TextIO = sys.stdout, resume: dict | None = None) -> int:
    """Run ``cfg`` to the end; returns the exit code (0 completed, 1 failed,
    130 interrupted). The summary is written whatever happens. ``resume``:
    each layer role's checkpointed state, for a run that goes on from one."""
    rd = open_run(cfg, resume is not None, stream)
    run_id = secrets.token_hex(6)
    if cfg.in_process:
        return run_in_process(cfg, rd, run_id, stream, SIGNALS.shielded)
    return Supervisor(cfg, rd, run_id, stream, resume=resume).run()


class Supervisor:
    """Runs one training run: spawns the worker roles it is to start, waits
    for every role to say hello (also roles started by hand on other hosts,
    in a cluster run), wires them together, and watches them to the end."""

    def __init__(self, cfg: Config, rd: RunDir, run_id: str, stream: TextIO,
                 cluster: "Cluster | None" = None, spawn: list[str] | None = None,
                 insecure: bool = False, resume: dict | None = None):
        self.cfg = cfg
        self.rd = rd
        self.run_id = run_id
        self.stream = stream
        self.cluster = cluster
        self.insecure = insecure
        self.roles = protocol.roles(cfg.layers)
        self.say = Speaker(run_id, "supervisor")
        self.resume = resume or {}   # role -> (state, arrays) from a checkpoint
        self.checkpoints: dict[int, set[str]] = {}
        self.committed = -1          # the last checkpoint epoch made the one to resume from
        self.refused: dict[str, int] = {}  # control messages dropped, per role
        self.metric_counts: dict[str, int] = {}
        self.spawn_roles = self.roles if spawn is None else spawn
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
            self.router, self.endpoint = net.bind(zmq.ROUTER, admit=self.roles)
        except BaseException:  # a failed bind, a signal: leave nothing behind
            self.guard.close()
            self.ctx.destroy(linger=0)
            remove_private_dir(self.ipc_dir)
            raise
        # Local runs: the processes we start get this secret, and a hello
        # must show it before any config goes out (pipeline/coord/membership.py).
        self.token = secrets.token_hex(16) if cluster is None else None
        self.members = Membership(self.roles, self.token,
                                  curve=cluster is not None and net.keys is not None)
        self.procs: dict[str, subprocess.Popen] = {}
        self.hello: dict[str, Message] = {}
        self.ready: dict[str, Message] = {}
        self.done: dict[str, Message] = {}
        self.stopped: dict[str, str] = {}  # role -> what stopped it from outside the run
        self.last_seen: dict[str, float] = {}
        self.last_beat = 0.0
        self.started = False
        self.final: dict | None = None
        self.write_error: WriteError | None = None  # the run directory could not be written
        self.progress = Progress(cfg, stream)
        self.watch = SGWatch(cfg)
        self.moves: Watchdog | None = None  # each role's handled-message count, from the start

    def host(self, role: str) -> str:
        return self.cluster.roles[role].host if self.cluster else "localhost"

    def process_info(self, role: str) -> dict:
        """What config.json says of a role's process besides host and endpoints."""
        return {"pid": self.procs[role].pid if role in self.procs else None}

    # -- processes ---------------------------------------------------------------
    def _spawn(self) -> None:
        env = worker_env(self.cfg.blas_threads)
        if self.token is not None:
            env = {**env, TOKEN_ENV: self.token}
        for role in self.spawn_roles:
            if self.cluster is None:
                where = ["--control", self.endpoint]
            else:
                where = ["--cluster", str(self.cluster.path)] + (["--insecure"] if self.insecure else [])
            self.procs[role] = spawn(module_of(role), role, where, env)

    def _check_alive(self) -> None:
        for role, p in self.procs.items():
            code = p.poll()
            if code is not None and role not in self.done:
                # It may have said why just before exiting: give that a moment.
                self._drain(500)
                why = (f" (stopped from outside the run: {self.stopped[role]})"
                       if role in self.stopped else "")
                raise WorkerFailed(role, f"process exited with code {code}{why}")
        now = time.monotonic()
        # Of the roles silent too long, the one silent longest went first.
        silent = [(seen, role) for role, seen in self.last_seen.items()
                  if now - seen > LIVENESS_S and role not in self.done]
        if silent:
            role = min(silent)[1]
            if role in self.stopped:
                raise WorkerFailed(role, f"{role} on {self.host(role)} was stopped from "
                                         f"outside the run ({self.stopped[role]})")
            raise WorkerFailed(role, f"no word from {role} on {self.host(role)} "
                                     f"for {LIVENESS_S:.0f} s: taken for dead")
        if self.moves is not None:
            stopped = self.moves.stalled(self.done, now, self.cfg.watchdog)
            if stopped is not None:
                raise WorkerFailed(stopped, (
                    f"the run stopped making progress: no role has handled a message for "
                    f"{self.cfg.watchdog:g} s though every process still answers; {stopped} on "
                    f"{self.host(stopped)} stopped first, after {self.moves.count[stopped]} "
                    f"messages (--watchdog)"))
        if now - self.last_beat >= HEARTBEAT_S:
            for role in self.hello:
                self._send(role, self.say.heartbeat())
            self.last_beat = now

    def _collect_done(self, deadline: float) -> None:
        """Until every layer role that took part has sent its DONE, or
        ``deadline``; whatever else comes meanwhile changes nothing now."""
        waiting = {r for r in self.roles[1:] if r in self.hello} - set(self.done)
        while waiting - set(self.done) and time.monotonic() < deadline:
            with contextlib.suppress(WorkerFailed, WriteError):
                self._recv(POLL_MS)

    def _stop_all(self, weights: bool = False) -> None:
        """Stop every process; with ``weights``, each layer first sends its
        weights as they are (a DONE), for a run that cannot go on writing."""
        for role in self.hello:
            self._send(role, self.say.stop(report=weights))
        deadline = time.monotonic() + STOP_GRACE_S
        if weights:
            self._collect_done(deadline)
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

    # -- messages ------------------------------------------------------------------
    def _send(self, role: str, msg: Message) -> None:
        conn = self.members.conn(role)
        if conn is None:
            return
        try:
            transport.send_whole(self.router, [conn, *wire.encode(msg)])
        except zmq.ZMQError:
            pass  # the peer is gone; nothing to tell it

    def _recv(self, timeout_ms: int) -> Message | None:
        if not self.router.poll(timeout_ms):
            return None
        conn, *frames = self.router.recv_multipart(copy=False)
        conn = conn.bytes
        size = sum(len(f) for f in frames)  # bytes on the wire, for the metric budget
        try:
            # Hello comes before the worker knows the run id; nothing else may.
            msg = wire.decode(frames)
            if msg.kind != protocol.HELLO and msg.run_id != self.run_id:
                raise ValueError(f"foreign run id {msg.run_id!r}")
            key_role = (security.user_id(frames[0])
                        if self.members.curve and frames else None)
            role = self.members.speaker(conn, msg, key_role)
        except ValueError as exc:
            who = self.members.role(conn) or "unknown"
            self._dropped(who, f"a control message from {who}'s connection: {exc}")
            return None
        if msg.kind == protocol.HELLO and not self.started:
            self.members.tie(role, conn)
        self.last_seen[role] = time.monotonic()
        if msg.kind == protocol.HEARTBEAT and self.moves is not None:
            self.moves.heard(role, msg.step, self.last_seen[role])
        self._take(msg, size)
        return msg

    def _take(self, msg: Message, size: int) -> None:
        """Handle a message of ``size`` bytes on the wire from a known role;
        one that is well-formed but not what this role may say now is
        counted and dropped."""
        try:
            self._handle(msg, size)
        except ValueError as exc:
            self._dropped(msg.sender, f"a {msg.kind} from {msg.sender}: {exc}")

    def _dropped(self, who: str, what: str) -> None:
        """Count a control message dropped under ``who`` (a role, or
        "unknown"); the first few of each are said on stderr."""
        self.refused[who] = self.refused.get(who, 0) + 1
        if self.refused[who] <= 3:
            print(f"[supervisor] dropped {what}", file=sys.stderr)

    def _drain(self, timeout_ms: int) -> None:
        while self._recv(timeout_ms) is not None:
            timeout_ms = 0

    def _handle(self, msg: Message, size: int) -> None:
        role = msg.sender
        if msg.kind == protocol.ERROR:
            raise WorkerFailed(role, protocol.error_text(msg))
        if msg.kind == protocol.STOPPED:
            self.stopped.setdefault(role, protocol.stopped_why(msg))
            return
        if msg.kind == protocol.METRIC:
            event = protocol.event(msg)
            self._metric_budget(role, size)
            self.rd.metric(event)
            if event.get("event") == "epoch":
                self.progress.epoch(event)
            elif event.get("event") == "final":
                self.final = event
            elif (warning := self.watch.add(event)) is not None:
                self.progress.warn(warning)
        elif msg.kind == protocol.DONE:
            if role in self.done:
                raise ValueError("a second done")
            _, _, weights = protocol.done(msg)
            if role != protocol.SOURCE:
                check_weights(self.cfg, role, weights, "final weights")
            self.done[role] = msg
        elif msg.kind == protocol.HELLO:
            if self.started:
                raise WorkerFailed(role, f"{role} on {self.host(role)} restarted mid-run; "
                                         "its state is lost (resume from a checkpoint)")
            rejoined = role in self.hello
            self.hello[role] = msg
            if self.cluster is not None:  # roles started by hand: say who is here
                print(f"[coordinator] {role} {'rejoined' if rejoined else 'joined'} from "
                      f"{self.host(role)} ({len(self.hello)}/{len(self.roles)} roles)",
                      file=sys.stderr, flush=True)
            self.ready.pop(role, None)
            self._send(role, self.say.config(self.cfg.to_dict(), self.resume.get(role)))
        elif msg.kind == protocol.READY:
            self.ready[role] = msg
        elif msg.kind == protocol.CHECKPOINT:
            epoch = protocol.epoch(msg)
            if (role == protocol.SOURCE or not checkpoint_due(epoch, self.cfg)
                    or epoch < self.cfg.start_epoch or epoch <= self.committed
                    or role in self.checkpoints.get(epoch, ())):
                raise ValueError(f"no checkpoint of epoch {epoch} is due from {role}")
            check_states(self.cfg, {role: (protocol.state(msg), protocol.named_arrays(msg))},
                         f"from {role}")
            self.rd.write_checkpoint(epoch, role, protocol.state(msg), protocol.named_arrays(msg))
            got = self.checkpoints.setdefault(epoch, set())
            got.add(role)
            if got >= set(self.roles[1:]):
                self.rd.commit_checkpoint(epoch, self.roles[1:], self.cfg.keep_checkpoints)
                self.committed = epoch
                self.rd.metric({"event": "checkpoint", "epoch": epoch})
                del self.checkpoints[epoch]

    def _metric_budget(self, role: str, size: int) -> None:
        """ValueError for a metric event too large (``size``: its bytes on the
        wire), or one too many for how far the run has got: a flood cannot
        fill the disk or drown the real ones."""
        if size > METRIC_BYTES:
            raise ValueError(f"a metric event of {size} bytes (at most {METRIC_BYTES})")
        n = self.metric_counts[role] = self.metric_counts.get(role, 0) + 1
        allowed = METRIC_BURST + METRIC_PER_EPOCH * (self.progress.epochs_done + 1)
        if n > allowed:
            raise ValueError(f"more metric events than {allowed} by epoch "
                             f"{self.progress.epochs_done}")

    def _wait_all(self, got: dict, kind: str, deadline: float) -> None:
        """Until every role has sent ``kind`` (a handshake step, not a sleep)."""
        while len(got) < len(self.roles):
            if time.monotonic() > deadline:
                missing = sorted(set(self.roles) - set(got))
                raise WorkerFailed(missing[0], f"no {kind!r} from {missing[0]} on "
                                               f"{self.host(missing[0])} in time")
            self._recv(POLL_MS)
            SIGNALS.raise_if_noted()
            self._check_alive()

    # -- the run ---------------------------------------------------------------------
    def run(self) -> int:
        start = time.perf_counter()
        status, error = "completed", None
        try:
            self._spawn()
            deadline = time.monotonic() + (STARTUP_S if self.cluster is None else CLUSTER_STARTUP_S)
            while len(self.ready) < len(self.roles):  # a rejoin may take a ready back
                self._wait_all(self.hello, protocol.HELLO, deadline)
                self._wait_all(self.ready, protocol.READY, deadline)
            endpoints = {r: protocol.endpoints(self.ready[r]) for r in self.roles}
            self.rd.write_json("config.json", {
                "run_id": self.run_id, "config": self.cfg.to_dict(),
                "supervisor": {"control": self.endpoint, "pid": os.getpid()},
                "cluster": str(self.cluster.path) if self.cluster else None,
                "processes": {r: {"host": self.host(r), "endpoints": endpoints[r],
                                  **self.process_info(r)}
                              for r in self.roles}})
            self.started = True
            self.moves = Watchdog(self.roles, time.monotonic())
            for role, peers in self._peers(endpoints).items():
                self._send(role, self.say.start(peers))
            while len(self.done) < len(self.roles):
                self._recv(POLL_MS)
                SIGNALS.raise_if_noted()
                self._check_alive()
        except KeyboardInterrupt:
            status = "interrupted"
        except WriteError as exc:  # the disk is full: stop now, keep what is written
            self.write_error = exc
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": str(exc)}
        except WorkerFailed as exc:
            status = "failed"
            error = {"role": exc.role, "host": self.host(exc.role) if exc.role in self.roles
                     else "localhost", "message": exc.message}
        except Exception as exc:  # a bug here must still stop the workers and say why
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": f"{type(exc).__name__}: {exc}"}
        # No signal may cut the clean-up short: it is noted, and ends the command after.
        with SIGNALS.shielded():
            return self._close(status, error, start)

    def _close(self, status: str, error: dict | None, start: float) -> int:
        """Stop every process, write the weights and the summary. A run the
        run directory failed asks each layer for its weights as it stops,
        and writes them (into the space kept for them)."""
        at_stop = self.write_error is not None and self.started
        self._stop_all(weights=at_stop)
        self.router.close()
        self.guard.close()
        self.ctx.term()
        remove_private_dir(self.ipc_dir)
        self.progress.finish()
        layers = []
        peaks = {role: msg.meta.get("peak_rss_mb") for role, msg in self.done.items()}
        peaks["supervisor"] = memory.peak_rss_mb()
        cpu = {role: msg.meta.get("cpu_s") for role, msg in self.done.items()}
        cpu["supervisor"] = memory.cpu_s()
        weights = {}
        for role in self.roles[1:]:
            msg = self.done.get(role)
            if msg is None:
                continue
            counters, decode_errors, weights[role] = protocol.done(msg)
            layers.append(layer_entry(self.roles.index(role), role, counters, decode_errors))
        saved, failed = None, None
        if status == "completed" or at_stop:
            saved, failed = save_weights(self.rd, weights, status)
        if failed is not None and error is None:
            status, error = "failed", {"role": "supervisor", "host": "localhost",
                                       "message": str(failed)}
        summary = build_summary(self.cfg, status=status, run_id=self.run_id, final=self.final,
                                layers=layers, error=error, epochs_done=self.progress.epochs_done,
                                wall_s=time.perf_counter() - start, peak_rss_mb=peaks,
                                cpu_s=cpu, watch=self.watch, weights=saved)
        summary["control_dropped"] = dict(self.refused)
        return close_run(self.rd, summary, self.stream)

    def _peers(self, ep: dict[str, dict]) -> dict[str, dict]:
        """Who connects where: activations flow down, gradients up; with the
        role behind each endpoint, whose public key a CURVE client needs."""
        r = self.roles
        peers = {}
        for i, role in enumerate(r):
            p = {}
            if i + 1 < len(r):
                p["downstream"] = [ep[r[i + 1]]["act"], r[i + 1]]
            if i >= 2:
                p["upstream_grad"] = [ep[r[i - 1]]["grad"], r[i - 1]]
            peers[role] = p
        # --unlock: the source's copy of each training batch to every unlocked layer
        peers[protocol.SOURCE].update({protocol.input_port(x): [ep[x]["input"], x]
                                       for x in self.cfg.input_roles})
        return peers
