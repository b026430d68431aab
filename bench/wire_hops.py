"""The benchmark's wire section (``bench.py --only wire``): one message
(encode + send + receive + decode) over our sockets against raw pyzmq
sending the same bytes (three frames zero-copy and copying, and one frame
joined beforehand), per size, one message in flight."""
from __future__ import annotations

import time

import numpy as np
import zmq

from bench import wire_parts
from pipeline.net import memory, transport
from pipeline.wire import codec as wire, protocol

WIRE_CASES = [("10x128 f64", (10, 128), np.float64),
              ("64x256 f32", (64, 256), np.float32),
              ("256x1024 f32", (256, 1024), np.float32),
              ("256x4096 f32", (256, 4096), np.float32)]


def _time_hops(ways: dict, n: int, rounds: int = 20) -> dict[str, list[float]]:
    """Seconds per message of each way to send it (a (send, recv) pair),
    sender and receiver alternating (one in flight), per round: the ways
    take turns, each first in turn, ``rounds`` times n/rounds messages
    each, so that ratios can be taken within a round, where a neighbour's
    burst on this shared machine hits both sides alike."""
    for send, recv in ways.values():
        for _ in range(min(n, 50)):  # warm up the connection and the allocator
            send()
            recv()
    per_round = max(1, n // rounds)
    times: dict[str, list[float]] = {name: [] for name in ways}
    names = list(ways)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each goes first in turn
            send, recv = ways[name]
            start = time.perf_counter()
            for _ in range(per_round):
                send()
                recv()
            times[name].append((time.perf_counter() - start) / per_round)
    return times


def _send_ours(sock: zmq.Socket, msg: protocol.Message) -> None:
    frames = wire.encode(msg)  # as transport.send, without its backpressure loop
    transport.send_whole(sock, frames, copy=transport.copies(frames))


def bench_wire(n: int) -> list[dict]:
    memory.tune_allocator()  # as every worker does (workers/serve.py)
    ctx = zmq.Context()
    rows = []
    try:
        for name, shape, dtype in WIRE_CASES:
            arr = np.random.default_rng(0).standard_normal(shape).astype(dtype)
            labels = np.zeros((shape[0], 8), dtype)
            msg, raw = wire_parts.message(arr, labels)
            one = b"".join(raw)  # the same bytes as one frame, joined beforehand
            a, b = wire_parts.pair(ctx)
            oa, ob = wire_parts.pair(ctx, ours=True)
            reps = max(100, n // max(1, arr.nbytes // 100_000))  # fewer hops of big messages
            t = _time_hops({  # ours as the pipeline sends and receives (transport.send, Inbox)
                "ours": (lambda: _send_ours(oa, msg),
                         lambda: wire_parts.receive(ob)),
                "zero": (lambda: a.send_multipart(raw, copy=False),
                         lambda: b.recv_multipart(copy=False)),
                "copied": (lambda: a.send_multipart(raw), lambda: b.recv_multipart()),
                "one": (lambda: a.send(one), lambda: b.recv())}, reps)
            for sock in (a, b, oa, ob):
                sock.close()
            # Ours over each raw way within each round, the median round; the
            # ratio to the fastest way is the largest of these. (Not to the
            # fastest way of each round: on a noisy machine that minimum of
            # three takes the luckiest run and biases the ratio up.)
            to = {way: float(np.median([o / r for o, r in zip(t["ours"], t[way])]))
                  for way in ("zero", "copied", "one")}
            ratio, to_copying = max(to.values()), to["copied"]  # to the fastest way
            to_three = max(to["zero"], to["copied"])  # the faster way as three frames
            ours, zero, copied, joined = (float(np.median(t[k]))
                                          for k in ("ours", "zero", "copied", "one"))
            nbytes = arr.nbytes + labels.nbytes
            rows.append({"case": name, "bytes": nbytes, "ours_us": ours * 1e6,
                         "raw_zero_copy_us": zero * 1e6, "raw_copy_us": copied * 1e6,
                         "raw_one_frame_us": joined * 1e6, "ratio_to_one_frame": to["one"],
                         "ratio": ratio, "ratio_to_copying": to_copying,
                         "ratio_to_three_frames": to_three,
                         "ours_MBps": nbytes / ours / 1e6})
    finally:
        ctx.term()
    return rows
