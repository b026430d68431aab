"""The coordinator of a run, socket-free: the handshake and the proof of
each role, checkpoint commits, the budget of metric events, the checks of
what the layers report, liveness and blame.

It takes messages and the time and returns *actions* (send this, record
that, say this); a failure of the run is the exception ``WorkerFailed``,
naming the role. The local supervisor, an engine's rank 0 and a cluster
host's coordinator are thin pumps around it (``commands/``): they own the
sockets, the processes and the run directory, and carry the actions out in
the order given. So every rule here is tested with exact tables, without a
socket or a clock (tests/test_coordinator.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pipeline.wire import protocol
from pipeline.coord.blame import blame, first_silent
from pipeline.layers.state import check_states, check_weights
from pipeline.config import Config
from pipeline.wire.protocol import HEARTBEAT_S, LIVENESS_S
from pipeline.coord.membership import Membership
from pipeline.wire.protocol import Message, Speaker
from pipeline.nodes.schedule import checkpoint_due
from pipeline.coord.sgwatch import SGWatch
from pipeline.coord.watchdog import Watchdog

# A role's metric events: each at most this many bytes on the wire, and no
# more than a burst plus a few per epoch (a layer sends one or two an epoch).
METRIC_BYTES = 64 * 1024
METRIC_BURST, METRIC_PER_EPOCH = 256, 16
SAID_DROPS = 3  # dropped control messages said on stderr, per role; the rest only counted


class WorkerFailed(Exception):
    def __init__(self, role: str, message: str):
        super().__init__(f"{role}: {message}")
        self.role = role
        self.message = message


# --- actions: what the pump is to do, in order ---------------------------------------------

@dataclass(frozen=True)
class Send:
    """Send ``msg`` to ``role`` over its control connection."""
    role: str
    msg: Message


@dataclass(frozen=True)
class Record:
    """Append ``event`` to metrics.jsonl (and show an epoch's on the progress line)."""
    event: dict


@dataclass(frozen=True)
class SaveCheckpoint:
    """Write ``role``'s state of ``epoch`` under checkpoints/. Here and in
    ``Commit`` ``epoch`` is the barrier's, its index from 0; the run
    directory names the checkpoint by the epochs done, ``epoch + 1``."""
    epoch: int
    role: str
    state: dict
    arrays: dict = field(repr=False)


@dataclass(frozen=True)
class Commit:
    """Every role's state of ``epoch`` is written: make it the one to resume from."""
    epoch: int


@dataclass(frozen=True)
class Say:
    """A line for the user (stderr): a role joined, a message dropped."""
    text: str


@dataclass(frozen=True)
class Warn:
    """A warning for the progress output and summary.json (the SG watch's)."""
    text: str


Action = Send | Record | SaveCheckpoint | Commit | Say | Warn


class Coordinator:
    """One run's coordination. ``roles``: the worker roles in chain order;
    ``token``: a local run's secret (None elsewhere); ``curve``: the control
    link is CURVE, every message with its key's role; ``hosts``: where each
    role runs, for the messages (default: localhost); ``announce``: say who
    joined (roles started by hand on other hosts); ``resume``: each layer
    role's checkpointed (state, arrays); ``ranks``: under an engine, each
    role's rank, for the messages that blame one."""

    def __init__(self, cfg: Config, run_id: str, *, token: str | None = None,
                 curve: bool = False, hosts: dict[str, str] | None = None,
                 announce: bool = False, resume: dict | None = None,
                 ranks: dict[str, int] | None = None):
        self.cfg, self.run_id = cfg, run_id
        self.roles = protocol.roles(cfg.layers)
        self.say = Speaker(run_id, "supervisor")
        self.members = Membership(self.roles, token, curve=curve)
        self.hosts = hosts or {}
        self.announce = announce
        self.resume = resume or {}
        self.hello: dict[str, Message] = {}
        self.ready: dict[str, Message] = {}
        self.done: dict[str, Message] = {}
        self.stopped: dict[str, str] = {}   # role -> what stopped it from outside the run
        self.last_seen: dict[str, float] = {}
        self.last_beat = 0.0
        self.started = False
        self.final: dict | None = None
        self.epochs_done = 0
        self.checkpoints: dict[int, set[str]] = {}
        self.committed = -1                 # the last checkpoint made the one to resume from
        self.refused: dict[str, int] = {}   # control messages dropped, per role
        self.metric_counts: dict[str, int] = {}
        self.watch = SGWatch(cfg)
        self.moves: Watchdog | None = None  # each role's handled-message count, from the start
        self.ranks = ranks or {}
        self.closed: dict[str, float] = {}  # engine: role -> when its connection closed

    def host(self, role: str) -> str:
        return self.hosts.get(role, "localhost")

    @property
    def finished(self) -> bool:
        """Every role has reported done."""
        return len(self.done) == len(self.roles)

    @property
    def all_ready(self) -> bool:
        """Every role has said hello and ready: the run may start."""
        return len(self.ready) == len(self.roles)

    # -- what comes in -----------------------------------------------------------------
    def receive(self, conn: bytes, msg: Message, size: int, now: float,
                key_role: str | None = None) -> list[Action]:
        """A decoded control message on connection ``conn``, ``size`` bytes
        on the wire, its key's role ``key_role`` under CURVE. One that may
        not be taken is counted and dropped (a ``Say`` for the first few);
        WorkerFailed where it ends the run."""
        try:
            # Hello comes before the worker knows the run id; nothing else may.
            if msg.kind != protocol.HELLO and msg.run_id != self.run_id:
                raise ValueError(f"foreign run id {msg.run_id!r}")
            role = self.members.speaker(conn, msg, key_role)
        except ValueError as exc:
            who = self.members.role(conn) or "unknown"
            return self.dropped(who, f"a control message from {who}'s connection: {exc}")
        if msg.kind == protocol.HELLO and not self.started:
            self.members.tie(role, conn)
        self.last_seen[role] = now
        if msg.kind == protocol.HEARTBEAT and self.moves is not None:
            self.moves.heard(role, msg.step, now)
        return self.take(msg, size)

    def take(self, msg: Message, size: int) -> list[Action]:
        """A message of ``size`` bytes on the wire from a role proven to be
        its sender: one that is well-formed but not what this role may say
        now is counted and dropped."""
        try:
            return self._handle(msg, size)
        except ValueError as exc:
            return self.dropped(msg.sender, f"a {msg.kind} from {msg.sender}: {exc}")

    def undecodable(self, conn: bytes, reason: str) -> list[Action]:
        """Frames on ``conn`` that are no message of ours."""
        who = self.members.role(conn) or "unknown"
        return self.dropped(who, f"a control message from {who}'s connection: {reason}")

    def dropped(self, who: str, what: str) -> list[Action]:
        """Count a control message dropped under ``who`` (a role, or
        "unknown"); the first few of each are said."""
        self.refused[who] = self.refused.get(who, 0) + 1
        return [Say(f"[supervisor] dropped {what}")] if self.refused[who] <= SAID_DROPS else []

    def _handle(self, msg: Message, size: int) -> list[Action]:
        role, kind = msg.sender, msg.kind
        if kind == protocol.ERROR:
            raise WorkerFailed(role, protocol.error_text(msg))
        if kind == protocol.STOPPED:
            self.stopped.setdefault(role, protocol.stopped_why(msg))
            return []
        if kind == protocol.METRIC:
            return self._metric(role, protocol.event(msg), size)
        if kind == protocol.DONE:
            if role in self.done:
                raise ValueError("a second done")
            _, _, weights = protocol.done(msg)
            if role != protocol.SOURCE:
                check_weights(self.cfg, role, weights, "final weights")
            self.done[role] = msg
            return []
        if kind == protocol.HELLO:
            return self._hello(role, msg)
        if kind == protocol.READY:
            self.ready[role] = msg
            return []
        if kind == protocol.CHECKPOINT:
            return self._checkpoint(role, msg)
        return []  # a heartbeat: its time is noted

    def _hello(self, role: str, msg: Message) -> list[Action]:
        if self.started:
            raise WorkerFailed(role, f"{role} on {self.host(role)} restarted mid-run; its "
                                     "state is lost (resume from a checkpoint)")
        rejoined = role in self.hello
        self.hello[role] = msg
        self.ready.pop(role, None)
        out: list[Action] = []
        if self.announce:  # roles started by hand: say who is here
            out.append(Say(f"[coordinator] {role} {'rejoined' if rejoined else 'joined'} from "
                           f"{self.host(role)} ({len(self.hello)}/{len(self.roles)} roles)"))
        out.append(Send(role, self.say.config(self.cfg.to_dict(), self.resume.get(role))))
        return out

    def _metric(self, role: str, event: dict, size: int) -> list[Action]:
        self._metric_budget(role, size)
        out: list[Action] = [Record(event)]
        if event.get("event") == "epoch":  # its epoch counts from 1: the epochs done
            self.epochs_done = event["epoch"]
        elif event.get("event") == "final":
            self.final = event
        elif (warning := self.watch.add(event)) is not None:
            out.append(Warn(warning))
        return out

    def _metric_budget(self, role: str, size: int) -> None:
        """ValueError for a metric event too large (``size``: its bytes on the
        wire), or one too many for how far the run has got: a flood cannot
        fill the disk or drown the real ones."""
        if size > METRIC_BYTES:
            raise ValueError(f"a metric event of {size} bytes (at most {METRIC_BYTES})")
        n = self.metric_counts[role] = self.metric_counts.get(role, 0) + 1
        allowed = METRIC_BURST + METRIC_PER_EPOCH * (self.epochs_done + 1)
        if n > allowed:
            raise ValueError(f"more metric events than {allowed} by epoch {self.epochs_done}")

    def _checkpoint(self, role: str, msg: Message) -> list[Action]:
        epoch = protocol.epoch(msg)
        if (role == protocol.SOURCE or not checkpoint_due(epoch, self.cfg)
                or epoch < self.cfg.start_epoch or epoch <= self.committed
                or role in self.checkpoints.get(epoch, ())):
            raise ValueError(f"no checkpoint of epoch {epoch} is due from {role}")
        state, arrays = protocol.state(msg), protocol.named_arrays(msg)
        check_states(self.cfg, {role: (state, arrays)}, f"from {role}")
        out: list[Action] = [SaveCheckpoint(epoch, role, state, arrays)]
        got = self.checkpoints.setdefault(epoch, set())
        got.add(role)
        if got >= set(self.roles[1:]):
            self.committed = epoch
            del self.checkpoints[epoch]
            # In metrics.jsonl as the user counts: the epochs done.
            out += [Commit(epoch), Record({"event": "checkpoint", "epoch": epoch + 1})]
        return out

    # -- the handshake ------------------------------------------------------------------
    def waiting_for(self, deadline: float, now: float) -> None:
        """WorkerFailed naming the first role missing from the handshake
        once ``deadline`` has passed."""
        if now <= deadline:
            return
        for got, kind in ((self.hello, protocol.HELLO), (self.ready, protocol.READY)):
            missing = sorted(set(self.roles) - set(got))
            if missing:
                raise WorkerFailed(missing[0], f"no {kind!r} from {missing[0]} on "
                                               f"{self.host(missing[0])} in time")

    def endpoints(self) -> dict[str, dict]:
        """Where every role listens (once ``all_ready``)."""
        return {r: protocol.endpoints(self.ready[r]) for r in self.roles}

    def start(self, now: float) -> list[Action]:
        """Every role is ready: tell each where its peers are."""
        self.started = True
        self.moves = Watchdog(self.roles, now)
        return [Send(role, self.say.start(peers))
                for role, peers in self._peers(self.endpoints()).items()]

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

    # -- liveness ---------------------------------------------------------------------
    def tick(self, now: float) -> list[Action]:
        """Heartbeats out, at most every HEARTBEAT_S; WorkerFailed for a role
        silent for LIVENESS_S (the one silent longest went first), or a run
        no role has moved for ``--watchdog`` seconds."""
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
        if now - self.last_beat < HEARTBEAT_S:
            return []
        self.last_beat = now
        return [Send(role, self.say.heartbeat()) for role in self.hello]

    def exited(self, role: str, code: int) -> None:
        """A process the pump started has exited with ``code`` (it was given
        a moment to say why first): WorkerFailed unless it was done."""
        if role in self.done:
            return
        why = (f" (stopped from outside the run: {self.stopped[role]})"
               if role in self.stopped else "")
        raise WorkerFailed(role, f"process exited with code {code}{why}")

    def stop(self, report: bool = False) -> list[Action]:
        """The end, however it came: tell every role that said hello to stop;
        with ``report``, each layer first sends its weights as they are (a
        DONE), for a run that cannot go on (its disk is full)."""
        return [Send(role, self.say.stop(report)) for role in self.hello]

    def awaited_reports(self) -> set[str]:
        """The layer roles that said hello and have not reported done."""
        return {r for r in self.roles[1:] if r in self.hello} - set(self.done)

    # -- under an engine: connections that close ---------------------------------------------
    def connection_closed(self, role: str | None, now: float) -> None:
        """``role``'s connection closed at ``now`` (an engine's rank: its
        death, or the engine ending it)."""
        if role is not None and role not in self.done:
            self.closed.setdefault(role, now)

    def lost(self, now: float, explained: set[str] = frozenset()) -> str | None:
        """The rank whose loss the closed connections show (``blame``), or
        None: none yet."""
        return blame(self.closed, self.stopped, now, explained) if self.closed else None

    def rank_failure(self, role: str) -> WorkerFailed:
        where = f"{role} (rank {self.ranks.get(role)}) on {self.host(role)}"
        if role in self.stopped:
            return WorkerFailed(role, f"{where} was the first rank stopped from outside the "
                                      f"run ({self.stopped[role]})")
        return WorkerFailed(role, f"{where} is gone: its connection closed")

    def after_signal(self) -> WorkerFailed | None:
        """The engine's signal came: was it a death (the first connection that
        closed without a word, returned as the failure) or a Ctrl-C (None)?"""
        first = first_silent(self.closed, self.stopped)
        return None if first is None else self.rank_failure(first)

    # -- the results ------------------------------------------------------------------
    def results(self) -> list[tuple[str, dict, int, dict[str, np.ndarray]]]:
        """(role, counters, decode errors, final weights) of every layer
        role that reported done, in chain order."""
        out = []
        for role in self.roles[1:]:
            msg = self.done.get(role)
            if msg is not None:
                out.append((role, *protocol.done(msg)))
        return out

    def usage(self) -> tuple[dict, dict]:
        """({role: peak resident MiB}, {role: CPU seconds}) as each reported it."""
        return ({role: m.meta.get("peak_rss_mb") for role, m in self.done.items()},
                {role: m.meta.get("cpu_s") for role, m in self.done.items()})
