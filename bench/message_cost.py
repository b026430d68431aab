"""What one message costs with nothing of ours around it: raw pyzmq between
two processes over a Unix-domain socket, one in flight (each message wakes
its receiver, as in a pipeline whose layers wait for each other), CPU time of
both processes and their ZeroMQ I/O threads together.

``python bench/message_cost.py [n]`` prints it; ``bench.py`` calls
``cpu_per_message`` for the seed task's bound.
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
for _ in range(int(sys.argv[3])):
    push.send_multipart(pull.recv_multipart())
push.close(linger=-1); pull.close(); ctx.term()
"""


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def cpu_per_message(n: int = 20000, rows: int = 10, width: int = 128,
                    labels: int = 8) -> float:
    """Seconds of CPU per message (both processes, all threads) for ``n``
    round trips of a (rows, width) float64 array, its (rows, labels) labels
    and a 60-byte header: the seed task's activation message."""
    frames = [bytes(60), np.ones((rows, width)).tobytes(), np.zeros((rows, labels)).tobytes()]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = zmq.Context()
        out, back = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
        out.bind(f"ipc://{tmp}/out")
        back.bind(f"ipc://{tmp}/back")
        before_self, before_child = _cpu(resource.RUSAGE_SELF), _cpu(resource.RUSAGE_CHILDREN)
        echo = subprocess.Popen([sys.executable, "-c", _ECHO, f"ipc://{tmp}/out",
                                 f"ipc://{tmp}/back", str(n)])
        try:
            for _ in range(n):
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
        # The echo's start-up (an interpreter, numpy-free) counts too: small against n.
        used = (_cpu(resource.RUSAGE_SELF) - before_self
                + _cpu(resource.RUSAGE_CHILDREN) - before_child)
    return used / (2 * n)


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    print(f"{cpu_per_message(n) * 1e6:.1f} us of CPU per message, both processes "
          f"({os.cpu_count()} cores)")
