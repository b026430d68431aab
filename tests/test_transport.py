"""Inboxes count and drop what they cannot use; a taken port gets one clear line."""
from __future__ import annotations

import os
import signal

import numpy as np
import pytest
import zmq

from pipeline.net import transport
from pipeline.wire import codec as wire, protocol
from pipeline.wire.checks import expect
from pipeline.wire.protocol import Message
from pipeline.net.transport import MAX_REASONS, Inbox, Net

pytestmark = pytest.mark.timeout(30)
F64 = np.dtype(np.float64)


def act(batch: int, rows: int = 2, width: int = 4, run_id: str = "run1") -> Message:
    return Message(protocol.ACT, run_id, batch=batch, sender="source",
                   arrays=(np.ones((rows, width)), np.zeros((rows, 3))))


@pytest.fixture
def pair():
    ctx = zmq.Context()
    sock, endpoint = Net(ctx).inbox(0, hwm=100, max_bytes=4096 + 2 * 7 * 8 * 4)
    out = ctx.socket(zmq.PUSH)
    out.linger = 0
    out.connect(endpoint)
    try:
        yield sock, out
    finally:
        sock.close()
        out.close()
        ctx.term()


def recv_one(inbox: Inbox) -> Message | None:
    assert inbox.sock.poll(5000), "nothing arrived"
    return inbox.recv()


def test_inbox_passes_good_and_counts_bad_messages(pair):
    sock, out = pair
    logged: list[str] = []
    check = lambda m: expect(m, (protocol.ACT,), [(None, 4), (None, 3)], F64, max_rows=8)
    inbox = Inbox(sock, "run1", 4096 + 2 * 7 * 8 * 4, check, logged.append)
    out.send_multipart(wire.encode(act(0)))
    out.send_multipart([b"\x00garbage"])
    out.send_multipart(wire.encode(act(1, run_id="run2")))       # foreign
    out.send_multipart(wire.encode(act(2, width=5)))             # wrong shape
    out.send_multipart(wire.encode(act(3, rows=9)))              # too many rows
    out.send_multipart(wire.encode(act(4)))
    got = [recv_one(inbox) for _ in range(6)]
    assert [m.batch if m else None for m in got] == [0, None, None, None, None, 4]
    assert np.array_equal(got[0].arrays[0], np.ones((2, 4)))
    assert inbox.errors == 4
    assert len(logged) == 4
    assert "run id" in logged[1] and "[2, 5]" in logged[2] and "rows" in logged[3]


def test_recv_frames_takes_one_whole_message_of_one_or_several_frames(pair):
    sock, out = pair
    sent = [[b"one"], [b"a", b"bb", b"ccc"], [b"two"]]
    for frames in sent:
        out.send_multipart(frames)
    got = []
    for _ in sent:
        assert sock.poll(5000), "nothing arrived"
        got.append([f.bytes for f in transport.recv_frames(sock)])
    assert got == sent


def test_inbox_logs_each_reason_once_and_at_most_a_few(pair):
    sock, out = pair
    logged: list[str] = []

    def check(m: Message) -> None:
        raise ValueError(f"batch {m.batch} is not wanted")

    inbox = Inbox(sock, "run1", 1 << 20, check, logged.append)
    for b in [0, 0, 0] + list(range(1, 50)):
        out.send_multipart(wire.encode(act(b)))
    for _ in range(52):
        assert recv_one(inbox) is None
    assert inbox.errors == 52
    assert logged[0] == "batch 0 is not wanted" and logged.count("batch 0 is not wanted") == 1
    assert len(logged) == MAX_REASONS + 1
    assert "no longer logged" in logged[-1]


def test_a_taken_cluster_port_gets_an_error_naming_the_port_and_the_fix():
    ctx = zmq.Context()
    holder = ctx.socket(zmq.PULL)
    holder.linger = 0
    holder.bind("tcp://127.0.0.1:0")  # the kernel picks the port
    port = int(holder.getsockopt_string(zmq.LAST_ENDPOINT).rsplit(":", 1)[1])
    try:
        with pytest.raises(OSError, match=f"127.0.0.1:{port}: another process holds that port"):
            Net(ctx, port=port).bind(zmq.PULL)
    finally:
        holder.close()
        ctx.term()


def test_a_local_run_listens_in_a_private_directory_unless_the_bench_says_otherwise(
        monkeypatch, tmp_path):
    """By default every socket of a local run is a Unix socket in a fresh
    0700 directory; DNI_BENCH_UNPROTECTED=1 (the benchmark's baseline, never
    for real runs) gives abstract-namespace sockets, and workers follow the
    supervisor's choice from its control endpoint."""
    import argparse
    import stat
    import sys

    from pipeline.net import transport
    from workers.serve import placement

    if not transport.LOCAL_IPC or not sys.platform.startswith("linux"):
        pytest.skip("Unix-domain and abstract-namespace sockets are Linux's")
    monkeypatch.delenv("DNI_BENCH_UNPROTECTED", raising=False)
    private = transport.private_dir()
    try:
        assert stat.S_IMODE(os.stat(private).st_mode) == 0o700
        ep = Net(zmq.Context.instance(), ipc_dir=private).endpoint()
        assert ep.startswith(f"ipc://{private}/")
        worker_net = placement(argparse.Namespace(control=ep, cluster=None))[0]
        assert worker_net.ipc_dir == private
    finally:
        transport.remove_private_dir(private)
    assert not os.path.exists(private)

    monkeypatch.setenv("DNI_BENCH_UNPROTECTED", "1")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "@").mkdir()  # a directory named like the marker is not ours to remove
    unprotected = transport.private_dir()
    assert unprotected == transport.UNPROTECTED
    ep = Net(zmq.Context.instance(), ipc_dir=unprotected).endpoint()
    assert ep.startswith("ipc://@dni-")
    assert placement(argparse.Namespace(control=ep, cluster=None))[0].ipc_dir == unprotected
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PULL)
        sock.linger = 0
        sock.bind(ep)  # the kernel takes the name: no file, no directory
        assert sock.getsockopt_string(zmq.LAST_ENDPOINT) == ep
        sock.close()
    finally:
        ctx.term()
    transport.remove_private_dir(unprotected)
    assert (tmp_path / "@").is_dir()


# --- a signal never leaves a message half sent -------------------------------------------

class FrameBySocket:
    """Stands in for a socket: sends frame by frame in Python, as pyzmq does,
    and raises SIGUSR1 after the first frame has gone (pyzmq runs the
    handlers after every frame, even one that went)."""

    def __init__(self):
        self.sent = []

    def send(self, frame, flags=0, copy=True):
        self.sent.append(frame)
        if len(self.sent) == 1:
            signal.raise_signal(signal.SIGUSR1)

    def send_multipart(self, frames, flags=0, copy=True):
        for frame in frames:
            self.send(frame, flags, copy)


@pytest.fixture
def usr1_raises():
    """SIGUSR1's handler raises KeyboardInterrupt the way Ctrl-C's does."""
    old = signal.signal(signal.SIGUSR1, lambda *_: transport.raise_when_whole(KeyboardInterrupt()))
    yield
    signal.signal(signal.SIGUSR1, old)


def test_a_signal_between_two_frames_is_raised_once_the_message_is_whole(usr1_raises):
    sock = FrameBySocket()
    with pytest.raises(KeyboardInterrupt):
        transport.send_whole(sock, [b"a", b"b", b"c"])
    assert sock.sent == [b"a", b"b", b"c"]
    # outside a send it is raised at once; and nothing is left deferred
    with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGUSR1)
    quiet = FrameBySocket()
    quiet.send = lambda frame, flags=0, copy=True: quiet.sent.append(frame)
    transport.send_whole(quiet, [b"x"])  # raises nothing
    transport.send_whole(quiet, [b"y", b"z"])
    assert quiet.sent == [b"x", b"y", b"z"]


def test_a_signal_during_a_one_frame_send_is_raised_after_it(usr1_raises):
    sock = FrameBySocket()
    with pytest.raises(KeyboardInterrupt):
        transport.send_whole(sock, [b"packed"])  # (sent with send, not send_multipart)
    assert sock.sent == [b"packed"]


def test_without_send_whole_the_same_signal_cuts_the_message(usr1_raises):
    # What send_whole is for: the plain call is left with one frame of three.
    sock = FrameBySocket()
    with pytest.raises(KeyboardInterrupt):
        sock.send_multipart([b"a", b"b", b"c"])
    assert sock.sent == [b"a"]

