"""Sockets for the workers: where they listen and how they are secured,
inboxes that validate and count, and sends that never block past a stop.

The math never sees a socket: this module is where ZeroMQ lives.
"""
from __future__ import annotations

import os
import secrets
import shutil
import sys
from typing import Callable, Sequence

import zmq

from pipeline.net import security, sockdir
from pipeline.wire import codec as wire
from pipeline.config import Config
from pipeline.wire.protocol import Message
from pipeline.net.security import Keys

POLL_MS = 200            # longest a worker blocks before it looks at its parent
MAX_REASONS = 16         # distinct reasons for dropping a message that get logged
HEADER_SLACK = 4096      # bytes allowed on top of the arrays: the msgpack header
# Unix-domain sockets: every platform but Windows.
LOCAL_IPC = zmq.has("ipc") and os.name == "posix"


UNPROTECTED = "@"  # the "directory" of abstract-namespace sockets (ipc://@name), bench only


def private_dir() -> str | None:
    """A fresh directory only this user may enter (0700), for a local run's
    Unix-domain sockets: no other user of the machine can connect to a socket
    in it. None where the platform has no such sockets (then loopback TCP).
    Named after its owner, so that the next run removes it should this
    process be killed before it can (``pipeline/net/sockdir.py``).

    For the benchmark only: with DNI_BENCH_UNPROTECTED=1 it returns
    ``UNPROTECTED`` instead, and every socket of the run is an
    abstract-namespace Unix socket, which any process of the machine can
    reach: ``bench/bench.py`` measures what the directory costs against it."""
    if not LOCAL_IPC:
        return None
    if os.environ.get("DNI_BENCH_UNPROTECTED") == "1" and sys.platform.startswith("linux"):
        print("WARNING: DNI_BENCH_UNPROTECTED=1: every local user can reach this run's "
              "sockets (a benchmark's baseline, never for real runs)", file=sys.stderr, flush=True)
        return UNPROTECTED
    return sockdir.make()


def remove_private_dir(path: str | None) -> None:
    if path and path != UNPROTECTED:
        shutil.rmtree(path, ignore_errors=True)


class Stopped(Exception):
    """The supervisor said stop (or went away), or something outside the
    run stopped us (``outside``: a signal, an engine gone): leave the loop,
    clean up, exit."""

    def __init__(self, why: str, outside: bool = False):
        super().__init__(why)
        self.outside = outside


def context() -> zmq.Context:
    return zmq.Context.instance()


# Frames smaller than this are copied into ZeroMQ's message when sent, larger
# ones handed over in place. In place costs a notification through pyzmq's
# garbage-collection thread when ZeroMQ is done with the frame: on loopback
# that is dearer than copying up to about a megabyte (docs/performance.md,
# "The wire", has the measurement). pyzmq's own default is 64 KiB.
ZERO_COPY_BYTES = 1 << 20


# A data outbox closes with a short linger, not none. With none, libzmq 4.3
# refuses its I/O thread the rest of a message it has begun to write, and if
# the peer's connection drops at that moment (at a stop every role closes at
# once) it aborts the process ("Resource temporarily unavailable
# (src/session_base.cpp:233)": session_base_t::clean_pipes). A lingering close
# lets it finish; a peer that takes nothing costs the exit this long at most.
OUTBOX_LINGER_MS = 100


def _socket(ctx: zmq.Context, kind: int, hwm: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.copy_threshold = ZERO_COPY_BYTES
    s.linger = 0
    s.sndhwm = hwm
    s.rcvhwm = hwm
    return s


class Net:
    """Where a process listens and how its sockets are secured.

    Local runs: with ``ipc_dir`` (the run's private directory, where the
    platform has Unix-domain sockets) every socket is a Unix-domain socket in
    it, under a random name: only this user can reach them, and they cost
    half what loopback TCP does for a 2 MB message. Without it, loopback TCP
    on ports the OS picks at bind time (two runs never race for a port), no
    encryption. Cluster runs: the host and
    ports of the cluster file, and CURVE when the file names keys: every
    bound socket is a CURVE server, every connecting one a client that knows
    its server's public key.
    """

    def __init__(self, ctx: zmq.Context, host: str = "127.0.0.1", port: int = 0,
                 keys: "Keys | None" = None, ipc_dir: str | None = None):
        self.ctx = ctx
        self.host = host
        self.port = port
        self.keys = keys
        self.ipc_dir = ipc_dir

    def endpoint(self, offset: int = 0, data: bool = False) -> str:
        if self.ipc_dir == UNPROTECTED:
            return f"ipc://@dni-{secrets.token_hex(8)}"
        if self.ipc_dir is not None:
            return f"ipc://{self.ipc_dir}/{secrets.token_hex(8)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port + offset if self.port else 0}"

    def bind(self, kind: int, offset: int = 0, hwm: int = 1000,
             max_frame: int | None = None, data: bool = False,
             admit: Sequence[str] = ()) -> tuple[zmq.Socket, str]:
        """A bound socket and its endpoint; ``admit``: the roles whose keys
        may connect (under CURVE; no other key gets past the handshake);
        ``max_frame``: ZeroMQ drops a sender whose frame is larger; ``data``:
        a data inbox."""
        s = _socket(self.ctx, kind, hwm)
        if max_frame is not None:
            s.setsockopt(zmq.MAXMSGSIZE, max_frame)
        if self.keys is not None:
            security.make_server(s, self.keys, f"port+{offset}", admit)
        endpoint = self.endpoint(offset, data)
        try:
            s.bind(endpoint)
        except zmq.ZMQError as exc:
            s.close()
            if exc.errno == zmq.EADDRINUSE and self.port:
                raise OSError(
                    f"cannot listen on {endpoint}: another process holds that port; "
                    "give this role another port in the cluster file (on Linux, ports "
                    "below 32768 are never handed to outgoing connections)") from None
            raise
        return s, s.getsockopt_string(zmq.LAST_ENDPOINT)

    def connect(self, kind: int, endpoint: str, server_role: str, hwm: int = 1000,
                identity: bytes | None = None,
                before: Callable[[zmq.Socket], None] | None = None) -> zmq.Socket:
        """``before(sock)`` runs just before connecting (to watch the handshake)."""
        s = _socket(self.ctx, kind, hwm)
        if identity is not None:
            s.setsockopt(zmq.IDENTITY, identity)  # before connect, or it does not count
        if self.keys is not None:
            security.make_client(s, self.keys, server_role)
        if before is not None:
            before(s)
        s.connect(endpoint)
        return s

    def inbox(self, offset: int, hwm: int, max_bytes: int,
              sender: str = "") -> tuple[zmq.Socket, str]:
        """A PULL socket for data from the role ``sender``; returns it and its endpoint.

        A frame far larger than any valid message of this run (``max_bytes``)
        is refused by ZeroMQ itself, which drops the sender, before it is
        ever buffered whole; a message somewhat too large still arrives, and
        decode() counts and drops it.
        """
        return self.bind(zmq.PULL, offset, hwm, max_frame=2 * max_bytes + 64 * 1024,
                         data=True, admit=[sender])

    def outbox(self, endpoint: str, server_role: str, hwm: int) -> zmq.Socket:
        s = self.connect(zmq.PUSH, endpoint, server_role, hwm)
        s.linger = OUTBOX_LINGER_MS
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
        frames = recv_frames(self.sock)
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


def recv_frames(sock: zmq.Socket) -> list[zmq.Frame]:
    """The frames of one message, without copying them. Most data messages
    are one frame (``binary.PACK_BYTES``): its own flag says whether more
    follow, where ``recv_multipart`` asks the socket (a getsockopt, several
    us when the thread has just woken)."""
    first = sock.recv(copy=False)
    return [first, *sock.recv_multipart(copy=False)] if first.more else [first]


# --- one message goes out whole -------------------------------------------------------
# pyzmq runs Python's signal handlers after every frame it sends, even one that
# went (PyErr_CheckSignals in _check_rc). A handler that raises there (Ctrl-C's
# KeyboardInterrupt, a worker's Stopped) would leave a message half sent: its
# peer would take the next message's frames for the rest of it, and closing a
# socket that holds a half-written message aborts libzmq ("Resource temporarily
# unavailable (src/session_base.cpp:...)"). So every send goes through
# send_whole, and the handlers through raise_when_whole.
_sending = False
_deferred: BaseException | None = None


def send_whole(sock: zmq.Socket, frames: Sequence, copy: bool = True) -> None:
    """``send_multipart`` without blocking (zmq.Again: nothing went); an
    exception a signal handler raises meanwhile comes after the last frame."""
    global _sending, _deferred
    _sending = True
    try:
        if len(frames) == 1:  # (send_multipart's Python loop and checks cost a few us)
            sock.send(frames[0], flags=zmq.NOBLOCK, copy=copy)
        else:
            sock.send_multipart(frames, flags=zmq.NOBLOCK, copy=copy)
    finally:
        _sending = False
        exc, _deferred = _deferred, None
        if exc is not None:
            raise exc  # the signal's exception, in place of any other


def raise_when_whole(exc: BaseException) -> None:
    """For a signal handler: raise ``exc`` now or, in the middle of
    ``send_whole``, as soon as its message is whole."""
    global _deferred
    if _sending:
        _deferred = exc
        return
    raise exc


def copies(frames: Sequence) -> bool:
    """Whether to send ``wire.encode``'s frames by copying: unless one of them
    is large enough for ZeroMQ to take in place (``ZERO_COPY_BYTES``). A
    copying send makes no pyzmq Frame object per frame."""
    return all(f.nbytes < ZERO_COPY_BYTES for f in frames[1:])


def send(sock: zmq.Socket, msg: Message, control) -> None:
    """Send without blocking forever: while the peer is full (backpressure),
    keep answering the supervisor, so a stop still gets through."""
    frames = wire.encode(msg)
    copy = copies(frames)
    poller = None
    while True:
        try:
            send_whole(sock, frames, copy=copy)
            return
        except zmq.Again:
            if poller is None:
                poller = zmq.Poller()
                poller.register(sock, zmq.POLLOUT)
                poller.register(control.sock, zmq.POLLIN)
            if control.sock in dict(poller.poll(POLL_MS)):
                control.poll_stop()
            control.tick()


def max_message_bytes(cfg: Config) -> int:
    """Bytes of the largest data message of this run: a batch of the widest
    layer's activations plus its labels, and the header."""
    widest = max(cfg.dims)
    return cfg.batch_size * (widest + cfg.dims[-1]) * cfg.np_dtype.itemsize + HEADER_SLACK
