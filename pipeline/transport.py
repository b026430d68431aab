"""Sockets for the workers: bound inboxes that validate and count, senders that
never block past a stop, and a worker's control link to the supervisor.

The math never sees a socket: this module is where ZeroMQ lives.
"""
from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

import numpy as np
import zmq

from pipeline import wire
from pipeline.config import Config
from pipeline.wire import Message

POLL_MS = 200            # longest a worker blocks before it looks at its parent
MAX_REASONS = 16         # distinct reasons for dropping a message that get logged
HEADER_SLACK = 4096      # bytes allowed on top of the arrays: the msgpack header


class Stopped(Exception):
    """The supervisor said stop (or went away): leave the loop, clean up, exit."""


def context() -> zmq.Context:
    return zmq.Context.instance()


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.linger = 0
    s.sndhwm = hwm
    s.rcvhwm = hwm
    return s


def bind_inbox(ctx: zmq.Context, host: str, hwm: int, max_bytes: int) -> tuple[zmq.Socket, str]:
    """A PULL socket on a free port of ``host``; returns it and its endpoint.

    The OS picks the port at bind time, so two runs on one machine never race
    for the same one. A frame far larger than any valid message of this run
    (``max_bytes``) is refused by ZeroMQ itself, which drops the sender,
    before it is ever buffered whole; a message somewhat too large still
    arrives, and decode() counts and drops it.
    """
    s = _socket(ctx, zmq.PULL, hwm)
    s.setsockopt(zmq.MAXMSGSIZE, 2 * max_bytes + 64 * 1024)
    s.bind(f"tcp://{host}:0")
    return s, s.getsockopt_string(zmq.LAST_ENDPOINT)


def connect_outbox(ctx: zmq.Context, endpoint: str, hwm: int) -> zmq.Socket:
    s = _socket(ctx, zmq.PUSH, hwm)
    s.connect(endpoint)
    return s


class Inbox:
    """Receives, decodes and checks messages; bad ones are counted and dropped.

    ``check(msg)`` raises ValueError for a well-formed message this receiver
    cannot use (wrong shape, unknown batch): it counts like a malformed one.
    Each distinct reason is logged once, and at most MAX_REASONS of them, so
    a flood of garbage cannot fill the log; the count keeps counting.
    """

    def __init__(self, sock: zmq.Socket, run_id: str, max_bytes: int,
                 check: Callable[[Message], None], log: Callable[[str], None]):
        self.sock = sock
        self.run_id = run_id
        self.max_bytes = max_bytes
        self.check = check
        self.log = log
        self.errors = 0
        self._seen: set[str] = set()

    def recv(self) -> Message | None:
        """One message (the caller knows one is waiting), or None if dropped."""
        frames = self.sock.recv_multipart(copy=False)
        try:
            msg = wire.decode(frames, run_id=self.run_id, max_bytes=self.max_bytes)
            self.check(msg)
        except ValueError as exc:
            self.errors += 1
            reason = str(exc)
            if reason not in self._seen and len(self._seen) <= MAX_REASONS:
                self._seen.add(reason)
                self.log(reason if len(self._seen) <= MAX_REASONS else
                         "more kinds of bad message; no longer logged, still counted")
            return None
        return msg


def expect(msg: Message, kinds: Sequence[str], shapes: Sequence[tuple[int | None, int]],
           dtype: np.dtype, max_rows: int) -> None:
    """Raise ValueError unless ``msg`` is one of ``kinds`` carrying arrays of
    these shapes ((None, w): any row count from 1 to max_rows, all equal)."""
    if msg.kind not in kinds:
        raise ValueError(f"unexpected message kind {msg.kind!r} on this socket")
    if msg.kind == wire.EOF:
        return
    if len(msg.arrays) != len(shapes):
        raise ValueError(f"{msg.kind} needs {len(shapes)} arrays, got {len(msg.arrays)}")
    rows = msg.arrays[0].shape[0] if msg.arrays and msg.arrays[0].ndim == 2 else -1
    for arr, (_, width) in zip(msg.arrays, shapes):
        if arr.dtype != dtype or arr.ndim != 2 or arr.shape[1] != width:
            raise ValueError(f"{msg.kind} array {arr.dtype}{list(arr.shape)} is not "
                             f"{dtype}[n, {width}]")
        if arr.shape[0] != rows or not 1 <= rows <= max_rows:
            raise ValueError(f"{msg.kind} arrays have {arr.shape[0]} rows, need 1..{max_rows}, equal")


class ActivationCheck:
    """The check of a layer's activation inbox: act/eval/eof from the one
    upstream role, (n, width) inputs with (n, labels) labels, and training
    batches in order (anything else cannot be ours)."""

    def __init__(self, upstream: str, width: int, labels: int, max_rows: int,
                 dtype: np.dtype = np.dtype(np.float64)):
        self.upstream = upstream
        self.shapes = [(None, width), (None, labels)]
        self.max_rows = max_rows
        self.dtype = dtype
        self.read = 0  # training batches accepted so far

    def __call__(self, msg: Message) -> None:
        expect(msg, (wire.ACT, wire.EVAL, wire.EOF), self.shapes, self.dtype, self.max_rows)
        if msg.sender != self.upstream:
            raise ValueError(f"activation from {msg.sender!r}, expected {self.upstream!r}")
        if msg.kind == wire.ACT:
            if msg.batch != self.read:
                raise ValueError(f"activation for batch {msg.batch}, expected {self.read}")
            self.read += 1


def send(sock: zmq.Socket, msg: Message, control: "ControlLink") -> None:
    """Send without blocking forever: while the peer is full (backpressure),
    keep answering the supervisor, so a stop still gets through."""
    frames = wire.encode(msg)
    poller = None
    while True:
        try:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=False)
            return
        except zmq.Again:
            if poller is None:
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLOUT)
                poller.register(control.sock, zmq.POLLIN)
            if control.sock in dict(poller.poll(POLL_MS)):
                control.poll_stop()
            control.check_parent()


def max_message_bytes(cfg: Config) -> int:
    """Bytes of the largest data message of this run: a batch of the widest
    layer's activations plus its labels, and the header."""
    widest = max(cfg.dims)
    return cfg.batch_size * (widest + cfg.dims[-1]) * 8 + HEADER_SLACK


class ControlLink:
    """A worker's DEALER to the supervisor's ROUTER: handshake, events, reports."""

    def __init__(self, ctx: zmq.Context, endpoint: str, role: str, run_id: str):
        self.role = role
        self.run_id = run_id
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.linger = 0
        self.sock.setsockopt(zmq.IDENTITY, role.encode())
        self.sock.connect(endpoint)
        self.parent = os.getppid()

    def send(self, kind: str, meta: dict | None = None, arrays: tuple = ()) -> None:
        msg = Message(kind=kind, run_id=self.run_id, sender=self.role,
                      arrays=arrays, meta=meta or {})
        self.sock.send_multipart(wire.encode(msg), copy=False)

    def event(self, event: dict) -> None:
        self.send(wire.METRIC, event)

    def check_parent(self) -> None:
        # The supervisor died without a word (SIGKILL): never outlive it.
        if os.getppid() != self.parent:
            raise Stopped("supervisor is gone")

    def recv(self, timeout_ms: int) -> Message | None:
        """The next control message, or None after ``timeout_ms``. Control
        messages come from our own supervisor; a malformed one is a bug there."""
        if not self.sock.poll(timeout_ms):
            self.check_parent()
            return None
        msg = wire.decode(self.sock.recv_multipart(copy=False), run_id=self.run_id)
        if msg.kind == wire.STOP:
            raise Stopped("stop requested")
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
