"""A worker held in its clean-up until a SIGTERM has come, for the test that
such a signal ends it quietly (never used by launch.py):
``python -m tests.cleanup_worker ENDPOINT HANDSHAKE_FILE``. Its guard, left
once the role has ended, writes the handshake file and waits for the signal."""
from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

from pipeline.net.transport import Net, context
from workers.serve import serve_placed

WAIT_S = 60.0  # bounds a test that never sends the signal


class HeldInCleanUp:
    def __init__(self, handshake: Path):
        self.handshake = handshake

    def __enter__(self) -> "HeldInCleanUp":
        return self

    def __exit__(self, *exc) -> None:
        self.handshake.write_text("cleaning up\n")
        deadline = time.monotonic() + WAIT_S
        # The worker's SIGTERM handler gives the signal back its default
        # action when it runs: that is how we know the signal came.
        while signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
            if time.monotonic() > deadline:
                raise RuntimeError("no SIGTERM came")
            time.sleep(0.01)  # a signal ends the sleep at once


def main(link, cfg, net) -> None:
    while True:
        link.recv(100)  # raises Stopped on stop


if __name__ == "__main__":
    endpoint, handshake = sys.argv[1], Path(sys.argv[2])
    sys.exit(serve_placed(main, "layer1",
                          lambda: (Net(context()), endpoint, HeldInCleanUp(handshake)),
                          parent_supervises=False))
