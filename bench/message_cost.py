"""What one message costs with nothing of ours around it: raw pyzmq between
two processes over a Unix-domain socket, CPU time of both processes and their
ZeroMQ I/O threads together, one in flight (each message wakes its receiver)
or several (the receiver seldom waits).

``python bench/message_cost.py [n]`` prints it; ``bench.py`` calls
``cpu_per_message`` for the addition task's bound.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile

import numpy as np
import zmq

# The echo: receives each message and sends the same frames back.
_ECHO = """
import sys, zmq
ctx = zmq.Context()
pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
pull.connect(sys.argv[1]); push.connect(sys.argv[2])
n, every = int(sys.argv[3]), int(sys.argv[4])
for i in range(n):
    frames = pull.recv_multipart()
    if (i + 1) % every == 0:
        push.send_multipart(frames)
push.close(linger=-1); pull.close(); ctx.term()
"""


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cpu_per_message(n: int = 20000, in_flight: int = 1, rows: int = 10, width: int = 128,
                    labels: int = 8) -> float:
    """Seconds of CPU per message (both processes, all threads) of ``n``
    messages of a (rows, width) float64 array, its (rows, labels) labels and
    a 60-byte header (the addition task's activation), sent ``in_flight`` at a
    time: the echo sends every ``in_flight``-th message back, and the sender
    waits for it. One in flight, every message wakes a waiting receiver;
    many, the receiver seldom waits and ZeroMQ batches its writes."""
    frames = [bytes(60), np.ones((rows, width)).tobytes(), np.zeros((rows, labels)).tobytes()]
    n -= n % in_flight
    with tempfile.TemporaryDirectory() as tmp:
        ctx = zmq.Context()
        out, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        out.bind(f"ipc://{tmp}/out")
        back.bind(f"ipc://{tmp}/back")
        before_self, before_child = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, f"ipc://{tmp}/out",
                                 f"ipc://{tmp}/back", str(n), str(in_flight)])
        try:
            for _ in range(n // in_flight):
                for _ in range(in_flight):
                    out.send_multipart(frames)
                back.recv_multipart()
            echo.wait(timeout=60)
        finally:
            if echo.poll() is None:
                echo.kill()
                echo.wait()
            out.close(linger=0)
            back.close(linger=0)
            ctx.term()
        # The echo's start-up (an interpreter with pyzmq) counts too: small against n.
        used = (_cpu(resource.RUSAGE_SELF) - before_self
                + _cpu(resource.RUSAGE_CHILDREN) - before_child)
    return used / (n + n // in_flight)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    for k in (1, 8, 64):
        print(f"{k:>2} in flight: {cpu_per_message(n, k) * 1e6:6.1f} us of CPU per message, "
              f"both processes ({os.cpu_count()} cores)")
