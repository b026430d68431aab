"""A worker role that joins the run and then stops handling messages while it
goes on answering heartbeats: a hung node, for the watchdog's test (never used
by launch.py)."""
from __future__ import annotations

from pipeline.wire import protocol
from workers.serve import run


def main(link, cfg, net) -> None:
    link.send(link.say.ready({"act": "tcp://127.0.0.1:9", "grad": "tcp://127.0.0.1:9"}))
    link.wait_for(protocol.START)
    while True:          # alive, never progressing, until the supervisor stops it
        link.tick()
        link.recv(100)   # raises Stopped on stop


if __name__ == "__main__":
    run(main)
