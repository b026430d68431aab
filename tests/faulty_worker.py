"""A worker role that fails on purpose once the run has started (for the
supervisor's tests; never used by launch.py)."""
from __future__ import annotations

from pipeline.wire import protocol
from workers.serve import run


def main(link, cfg, net) -> None:
    link.send(link.say.ready({"act": "tcp://127.0.0.1:9", "grad": "tcp://127.0.0.1:9"}))
    link.wait_for(protocol.START)
    raise RuntimeError("injected failure in the layer math")


if __name__ == "__main__":
    run(main)
