"""Where a small message's time goes: ``python bench/wire_parts.py [rows width]``.

The wire benchmark's one-in-flight loop (``bench.py``: a PUSH/PULL pair on
loopback, send then receive, one message at a time), timed part by part:
our encode, send, receive and decode against raw pyzmq's copying send and
receive of the same bytes in three frames; and our encode and decode again
in a tight loop, where they run warm. The difference between the two is
what running cold after each wait costs. Medians of per-message times.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import zmq  # noqa: E402

from bench.bench import _pair  # noqa: E402
from pipeline import memory, protocol, transport, wire  # noqa: E402


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


def main(rows: int = 10, width: int = 128, n: int = 20000) -> None:
    memory.tune_allocator()  # as every worker does
    ctx = zmq.Context()
    arr = np.random.default_rng(0).standard_normal((rows, width))
    labels = np.zeros((rows, 8))
    msg = wire.Message(protocol.ACT, "bench", batch=1, sender="layer1", arrays=(arr, labels))
    head = bytes(wire._pack_prefix(msg.kind, msg.run_id, msg.sender,
                                   [(a.dtype.str, a.shape) for a in msg.arrays]))
    raw = [head + bytes(16), arr.tobytes(), labels.tobytes()]
    a, b = _pair(ctx)
    oa, ob = _pair(ctx, ours=True)
    got: list = []
    frames: list = []
    ours = [lambda: frames.__setitem__(slice(None), wire.encode(msg)),
            lambda: transport.send_whole(oa, frames, copy=transport.copies(frames)),
            lambda: got.__setitem__(slice(None), ob.recv_multipart(copy=False)),
            lambda: wire.decode(got, run_id="bench")]
    theirs = [lambda: a.send_multipart(raw), lambda: b.recv_multipart()]
    for steps in (ours, theirs):
        _parts(steps, 500)  # warm up the connection
    mine, base = [], []
    for _ in range(10):  # taking turns, as bench.py does
        mine.append(_parts(ours, n // 10))
        base.append(_parts(theirs, n // 10))
    mine_med, base_med = np.median(mine, axis=0), np.median(base, axis=0)
    warm_encode = _warm(lambda: wire.encode(msg), n)
    oa.send_multipart(wire.encode(msg))
    sample = ob.recv_multipart(copy=False)
    warm_decode = _warm(lambda: wire.decode(sample, run_id="bench"), n)
    print(f"{rows}x{width} f64 and {rows}x8 labels, one in flight, median us a message:")
    print(f"  ours:     encode {mine_med[0]:6.1f} (warm {warm_encode:4.1f}), send "
          f"{mine_med[1]:6.1f}, receive {mine_med[2]:6.1f}, decode {mine_med[3]:6.1f} "
          f"(warm {warm_decode:4.1f}); total {mine_med.sum():6.1f}")
    print(f"  raw pyzmq, three frames copied: send {base_med[0]:6.1f}, receive "
          f"{base_med[1]:6.1f}; total {base_med.sum():6.1f}")
    for s in (a, b, oa, ob):
        s.close()
    ctx.term()


if __name__ == "__main__":
    main(*(int(x) for x in sys.argv[1:3]))
