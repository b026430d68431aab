"""A worker's link to the supervisor (coordinator): the handshake, metric
events, heartbeats both ways, and the report of a failure."""
from __future__ import annotations

import os
import sys
import time
import traceback

import zmq

from pipeline import wire
from pipeline.transport import POLL_MS, Net, Stopped
from pipeline.wire import Message

HEARTBEAT_S = 1.0   # a process says it is alive at least this often
LIVENESS_S = 5.0    # silent for this long: taken for dead


class ControlLink:
    """A worker's DEALER to the supervisor's ROUTER.

    The run id is not known before the handshake: hello goes out without one,
    and the config that comes back carries it. From then on, every message
    of another run is refused.
    """

    def __init__(self, net: Net, endpoint: str, role: str, run_id: str = ""):
        self.role = role
        self.run_id = run_id
        self.sock = net.connect(zmq.DEALER, endpoint, "coordinator", identity=role.encode())
        self.parent = os.getppid()
        self.last_sent = self.last_heard = time.monotonic()

    def send(self, kind: str, meta: dict | None = None, arrays: tuple = ()) -> None:
        msg = Message(kind=kind, run_id=self.run_id, sender=self.role,
                      arrays=arrays, meta=meta or {})
        self.sock.send_multipart(wire.encode(msg), copy=False)
        self.last_sent = time.monotonic()

    def event(self, event: dict) -> None:
        self.send(wire.METRIC, event)

    def tick(self) -> None:
        """Called from every wait of a worker's loop: say we are alive, and
        make sure the supervisor still is."""
        # A local supervisor killed outright (SIGKILL): never outlive it.
        if os.getppid() != self.parent:
            raise Stopped("supervisor is gone")
        now = time.monotonic()
        if now - self.last_sent >= HEARTBEAT_S:
            self.send(wire.HEARTBEAT)
        if now - self.last_heard > LIVENESS_S:
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
            if msg.kind == wire.STOP:
                raise Stopped("stop requested")
            if msg.kind != wire.HEARTBEAT:
                return msg

    def wait_for(self, kind: str) -> Message:
        while True:
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
        self.send(wire.DONE, {"counters": counters, "decode_errors": decode_errors,
                              "weights": list(weights)}, tuple(weights.values()))
        while True:
            self.recv(1000)  # raises Stopped

    def log(self, text: str) -> None:
        print(f"[{self.role}] {text}", file=sys.stderr, flush=True)

    def dropped(self, reason: str) -> None:
        """A bad message was dropped (each reason reported once): tell the
        user on stderr and the run's metrics.jsonl."""
        self.log(f"dropped a bad message: {reason}")
        self.event({"event": "decode_error", "role": self.role, "reason": reason})

    def report_error(self, exc: BaseException) -> None:
        tb = traceback.format_exception(type(exc), exc, exc.__traceback__)
        try:
            self.send(wire.ERROR, {"error": f"{type(exc).__name__}: {exc}",
                                   "traceback": "".join(tb)[-4000:]})
            self.sock.linger = 2000
        except zmq.ZMQError:
            pass
