"""The data source: feeds every training batch (labels ride along), then the
evaluation pass, then end-of-stream, to the first layer."""
from __future__ import annotations

import numpy as np

from pipeline import data, wire
from pipeline.config import Config
from pipeline.roles import run
from pipeline.schedule import checkpoint_due
from pipeline.control import ControlLink
from pipeline.transport import Net, send


def main(link: ControlLink, cfg: Config, net: Net) -> None:
    x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
    slices = data.batch_slices(cfg.examples, cfg.batch_size)
    # Contiguous copies: each batch goes on the wire as its own zero-copy frame.
    batches = [(np.ascontiguousarray(x[s]), np.ascontiguousarray(y[s])) for s in slices]
    link.send(wire.READY, {"endpoints": {}})
    peers = link.wait_for(wire.START).meta["peers"]
    out = net.outbox(*peers["downstream"], hwm=cfg.max_inflight + 2)

    def put(kind: str, batch: int, arrays: tuple, meta: dict | None = None) -> None:
        link.tick()
        send(out, wire.Message(kind, link.run_id, batch=batch, sender=link.role,
                               arrays=arrays, meta=meta or {}), link)

    t = cfg.start_epoch * len(batches)  # a resumed run goes on where its checkpoint was
    for epoch in range(cfg.start_epoch, cfg.epochs):
        for xb, yb in batches:
            put(wire.ACT, t, (xb, yb))
            t += 1
        if checkpoint_due(epoch, cfg):
            put(wire.CHECKPOINT, t - 1, (), {"epoch": epoch})
        link.poll_stop()
    for i, (xb, yb) in enumerate(batches):
        put(wire.EVAL, i, (xb, yb))
    put(wire.EOF, t, ())
    link.finish({"forward_batches": t}, 0, {})


if __name__ == "__main__":
    run(main)
