"""A worker's link to the supervisor (coordinator): the handshake, metric
events, heartbeats both ways, and the report of a failure."""
from __future__ import annotations

import os
import signal
import sys
import time
import traceback
from typing import Callable

import zmq

from pipeline.net import memory, security, transport
from pipeline.wire import codec as wire
from pipeline.wire.protocol import (HEARTBEAT, HEARTBEAT_S, LIVENESS_S, METRIC, STOP, Message,
                                    Speaker, stop_report)
from pipeline.net.transport import POLL_MS, Net, Stopped

CHECK_S = 0.02      # how often a busy worker looks at its parent and its heartbeat
REPORT_LINGER_MS = 2000  # how long an error report may hold the exit to reach the coordinator


class ControlLink:
    """A worker's DEALER to the supervisor's ROUTER.

    The run id is not known before the handshake: hello goes out without one,
    and the config that comes back carries it. From then on, every message
    of another run is refused.
    """

    def __init__(self, net: Net, endpoint: str, role: str, run_id: str = "",
                 parent_supervises: bool = True):
        self.role = role
        self.say = Speaker(run_id, role)
        self.endpoint = endpoint
        self.refusals: security.Refusals | None = None

        def watch(sock: zmq.Socket) -> None:  # a refused key is an error, not a hang
            self.refusals = security.Refusals(sock)

        # No identity of our choosing: the supervisor's ROUTER names this
        # connection, and ties it to a role only once a hello proves it.
        self.sock = net.connect(zmq.DEALER, endpoint, "coordinator",
                                before=watch if net.keys is not None else None)
        self.parent = os.getppid()
        # A worker's parent is launch.py (the coordinator, or a cluster
        # host's launcher): once it is gone, so is the run here, and no
        # report is waited on. An engine's rank has the engine for parent.
        self.parent_supervises = parent_supervises
        self.last_heard = self.last_beat = time.monotonic()
        self.last_check = 0.0
        self.progress = 0  # messages handled: each heartbeat carries it to the watchdog
        self.joined = False  # the handshake is done: from now on, silence means death
        self.resume: tuple[dict, dict] | None = None  # (state, weights) of a resumed run
        # The role's (counters, decode errors, weights) as they are now, for
        # a stop that asks for them; set by the role once it has its node.
        self.at_stop: Callable[[], tuple[dict, int, dict]] | None = None

    @property
    def run_id(self) -> str:
        return self.say.run_id

    def joined_run(self, run_id: str) -> None:
        """The handshake is done: from now on this link speaks for ``run_id``,
        and silence from the coordinator means it is gone."""
        self.say = Speaker(run_id, self.role)
        self.joined = True

    def send(self, msg: Message) -> None:
        """Send without ever blocking for good: a link that cannot take a
        message (a coordinator that refused our key drops the connection for
        good) is an error after a few seconds, not a hang. A heartbeat that
        cannot go is simply skipped."""
        frames = wire.encode(msg)
        deadline = time.monotonic() + LIVENESS_S
        while True:
            try:
                transport.send_whole(self.sock, frames, copy=False)
                return
            except zmq.Again:
                if msg.kind == HEARTBEAT:
                    return
                self._check_parent()
                self._check_refused()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cannot reach the coordinator at {self.endpoint}")
                self.sock.poll(POLL_MS, zmq.POLLOUT)

    def _check_parent(self) -> None:
        # A local supervisor killed outright (SIGKILL), or the engine that
        # started this rank gone: never outlive it, and give the clean exit
        # 3 s at most.
        if os.getppid() != self.parent:
            signal.alarm(3)
            if self.parent_supervises:
                raise Stopped("supervisor is gone")
            raise Stopped("the process that started this rank is gone", outside=True)

    def _check_refused(self) -> None:
        if self.refusals is not None and self.refusals.poll(0):
            raise RuntimeError(f"the coordinator at {self.endpoint} refused this role: "
                               f"{self.refusals.reasons[0]} (is this host's key for "
                               f"{self.role} the one in the cluster's key directory?)")

    def event(self, event: dict) -> None:
        """A metric event; per-epoch ones carry this process's resident memory,
        so a run's metrics show whether any process grows."""
        if event.get("event") in ("epoch", "layer"):
            event = {**event, "rss_mb": memory.rss_mb()}
        self.send(self.say.metric(event))

    def forward(self, msg: Message) -> None:
        """What a node says to the coordinator (its ``link`` port)."""
        if msg.kind == METRIC:
            self.event(msg.meta)
        else:
            self.send(msg)

    def tick(self) -> None:
        """Called from every wait of a worker's loop: say we are alive, and
        make sure the supervisor still is (at most every CHECK_S: a worker
        of small batches ticks thousands of times a second)."""
        now = time.monotonic()
        if now - self.last_check < CHECK_S:
            return
        self.last_check = now
        self._check_parent()
        self._check_refused()
        if now - self.last_beat >= HEARTBEAT_S:
            self.last_beat = now
            self.send(self.say.heartbeat(self.progress))
        if self.joined and now - self.last_heard > LIVENESS_S:
            self.poll_stop()  # its heartbeats may be waiting unread
            if time.monotonic() - self.last_heard > LIVENESS_S:
                raise RuntimeError(f"the coordinator has been silent for {LIVENESS_S:.0f} s")

    def recv(self, timeout_ms: int) -> Message | None:
        """The next control message other than a heartbeat, or None after
        ``timeout_ms``. Control messages come from our own supervisor over an
        authenticated link; a malformed one is a bug there."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            left = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.sock.poll(left):
                self.tick()
                return None
            msg = wire.decode(self.sock.recv_multipart(copy=False),
                              run_id=self.run_id or None)
            self.last_heard = time.monotonic()
            if msg.kind == STOP:
                if stop_report(msg) and self.at_stop is not None:
                    # A node sends before or after an update, never within
                    # one: its arrays hold whole updates whenever this comes.
                    self._last_word(self._done(*self.at_stop()))
                raise Stopped("stop requested")
            if msg.kind != HEARTBEAT:
                return msg

    def wait_for(self, kind: str, timeout_s: float | None = None) -> Message:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            if deadline is not None and time.monotonic() > deadline:
                raise RuntimeError(f"no {kind!r} from the coordinator at {self.endpoint} "
                                   f"within {timeout_s:.0f} s")
            msg = self.recv(POLL_MS)
            if msg is not None:
                if msg.kind != kind:
                    raise RuntimeError(f"expected {kind!r} from the supervisor, got {msg.kind!r}")
                return msg

    def poll_stop(self) -> None:
        """Handle whatever control message is waiting (only stop matters mid-run)."""
        while self.sock.poll(0):
            self.recv(0)

    def finish(self, counters: dict, decode_errors: int, weights: dict) -> None:
        """Report DONE with final counters and weights, then wait for stop.

        Call it while the data sockets are still in scope: closing them (as
        garbage collection does when a role's main returns) with linger=0
        would drop messages that are queued but not yet on the wire.
        """
        self.at_stop = None  # the weights go now, and once only
        self.send(self._done(counters, decode_errors, weights))
        while True:
            self.recv(1000)  # raises Stopped

    def _done(self, counters: dict, decode_errors: int, weights: dict) -> Message:
        return self.say.done(counters, decode_errors, memory.peak_rss_mb(), memory.cpu_s(),
                             weights)

    def log(self, text: str) -> None:
        print(f"[{self.role}] {text}", file=sys.stderr, flush=True)

    def dropped(self, reason: str) -> None:
        """A bad message was dropped (each reason reported once): tell the
        user on stderr and the run's metrics.jsonl."""
        self.log(f"dropped a bad message: {reason}")
        self.event({"event": "decode_error", "role": self.role, "reason": reason})

    def report_error(self, exc: BaseException) -> None:
        """Tell the supervisor why we fail, if it can be told at once: a link
        that is down (the reason we fail, perhaps) must not delay the exit.

        The report lingers (up to REPORT_LINGER_MS after the socket closes)
        only while the coordinator may be there to take it: queued for one
        that is gone, it held zmq_ctx_term at exit for the whole linger."""
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        self._last_word(self.say.error(f"{type(exc).__name__}: {exc}", "".join(tb)[-4000:]))

    def report_stopped(self, why: str) -> None:
        """Tell the supervisor that something outside the run stopped us (a
        signal, the engine gone), as report_error does a failure."""
        self._last_word(self.say.stopped(why))

    def _last_word(self, msg: Message) -> None:
        try:
            transport.send_whole(self.sock, wire.encode(msg))
        except zmq.ZMQError:
            return
        there = ((os.getppid() == self.parent or not self.parent_supervises)
                 and time.monotonic() - self.last_heard <= LIVENESS_S)
        self.sock.linger = REPORT_LINGER_MS if there else 0
