"""Where a small message's time goes: ``python bench/wire_parts.py [rows width]``.

The wire benchmark's one-in-flight loop (``bench.py``: a PUSH/PULL pair on
loopback, send then receive, one message at a time), timed part by part:
our encode, send, receive and decode against raw pyzmq's copying send and
receive of the same bytes in three frames; and our encode and decode again
in a tight loop, where they run warm. The difference between the two is
what running cold after each wait costs. Medians of per-message times.
``bench.py`` calls ``measure`` for the small-message target's explanation.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from pipeline.net import memory, transport  # noqa: E402
from pipeline.wire import binary, protocol  # noqa: E402
from pipeline.wire import codec as wire  # noqa: E402


def pair(ctx: zmq.Context, ours: bool = False) -> tuple[zmq.Socket, zmq.Socket]:
    """A PUSH/PULL pair on loopback: pyzmq's defaults, or ``ours`` (the
    pipeline's socket options: transport._socket)."""
    if ours:
        a, b = transport._socket(ctx, zmq.PUSH, 1000), transport._socket(ctx, zmq.PULL, 1000)
    else:
        a, b = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    a.linger = b.linger = 0
    b.bind("tcp://127.0.0.1:0")  # the kernel picks the port
    a.connect(b.getsockopt_string(zmq.LAST_ENDPOINT))
    return a, b


def message(arr: np.ndarray, labels: np.ndarray) -> tuple[wire.Message, list[bytes]]:
    """An activation message of ``arr`` and ``labels``, and raw pyzmq's
    frames of the same bytes: the binary header (batch and step zero), then
    each array in a frame of its own."""
    msg = wire.Message(protocol.ACT, "bench", batch=1, sender="layer1", arrays=(arr, labels))
    head = bytes(binary._pack_prefix(msg.kind, msg.run_id, msg.sender,
                                   [(a.dtype.str, a.shape) for a in msg.arrays]))
    return msg, [head + bytes(16), arr.tobytes(), labels.tobytes()]


def receive(sock: zmq.Socket) -> wire.Message:
    """Ours as the pipeline receives it (``transport.Inbox``, without its checks)."""
    return wire.decode(transport.recv_frames(sock), run_id="bench")


def _parts(steps: list, n: int) -> list[float]:
    """Median microseconds of each step of a message, over n messages."""
    times = np.empty((n, len(steps)))
    for i in range(n):
        t = time.perf_counter_ns()
        for j, step in enumerate(steps):
            step()
            now = time.perf_counter_ns()
            times[i, j], t = now - t, now
    return [float(x) / 1e3 for x in np.median(times, axis=0)]


def _warm(fn, n: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(n):
        fn()
    return (time.perf_counter_ns() - start) / n / 1e3


def measure(rows: int = 10, width: int = 128, n: int = 20000) -> dict[str, float]:
    """Median us a message of each part: ours (encode, send, receive,
    decode), raw pyzmq's (send, receive), and our encode and decode warm."""
    memory.tune_allocator()  # as every worker does
    ctx = zmq.Context()
    arr = np.random.default_rng(0).standard_normal((rows, width))
    labels = np.zeros((rows, 8))
    msg, raw = message(arr, labels)
    a, b = pair(ctx)
    oa, ob = pair(ctx, ours=True)
    got: list = []
    frames: list = []
    ours = [lambda: frames.__setitem__(slice(None), wire.encode(msg)),
            lambda: transport.send_whole(oa, frames, copy=transport.copies(frames)),
            lambda: got.__setitem__(slice(None), transport.recv_frames(ob)),
            lambda: wire.decode(got, run_id="bench")]
    theirs = [lambda: a.send_multipart(raw), lambda: b.recv_multipart()]
    try:
        for steps in (ours, theirs):
            _parts(steps, 500)  # warm up the connection
        mine, base = [], []
        for _ in range(10):  # taking turns, as bench.py does
            mine.append(_parts(ours, n // 10))
            base.append(_parts(theirs, n // 10))
        m, r = np.median(mine, axis=0), np.median(base, axis=0)
        out = {"encode": m[0], "send": m[1], "receive": m[2], "decode": m[3],
               "raw_send": r[0], "raw_receive": r[1],
               "warm_encode": _warm(lambda: wire.encode(msg), n)}
        oa.send_multipart(wire.encode(msg))
        sample = transport.recv_frames(ob)
        out["warm_decode"] = _warm(lambda: wire.decode(sample, run_id="bench"), n)
    finally:
        for s in (a, b, oa, ob):
            s.close()
        ctx.term()
    return {k: float(v) for k, v in out.items()}


def show(p: dict[str, float]) -> list[str]:
    ours = p["encode"] + p["send"] + p["receive"] + p["decode"]
    return [f"  ours:     encode {p['encode']:6.1f} (warm {p['warm_encode']:4.1f}), send "
            f"{p['send']:6.1f}, receive {p['receive']:6.1f}, decode {p['decode']:6.1f} "
            f"(warm {p['warm_decode']:4.1f}); total {ours:6.1f}",
            f"  raw pyzmq, three frames copied: send {p['raw_send']:6.1f}, receive "
            f"{p['raw_receive']:6.1f}; total {p['raw_send'] + p['raw_receive']:6.1f}"]


if __name__ == "__main__":
    rows, width = (int(x) for x in (sys.argv[1:3] or (10, 128)))
    print(f"{rows}x{width} f64 and {rows}x8 labels, one in flight, median us a message:")
    print("\n".join(show(measure(rows, width))))
