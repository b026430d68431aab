"""The data source: feeds every epoch's training batches (labels ride along),
after each epoch the test split (when there is one), then the evaluation
pass over the training set, then end-of-stream, to the first layer."""
from __future__ import annotations

import numpy as np

from pipeline import data, tasks, wire
from pipeline.config import Config
from pipeline.roles import run
from pipeline.schedule import checkpoint_due
from pipeline.control import ControlLink
from pipeline.transport import Net, send


def main(link: ControlLink, cfg: Config, net: Net) -> None:
    task = tasks.load(cfg)
    x, y = task.x, task.y

    def cut(xs: np.ndarray, ys: np.ndarray, parts: list) -> list[tuple[np.ndarray, np.ndarray]]:
        # Contiguous copies: each batch goes on the wire as its own zero-copy frame.
        return [(np.ascontiguousarray(xs[s]), np.ascontiguousarray(ys[s])) for s in parts]

    test = (cut(task.test_x, task.test_y, tasks.test_batches(cfg))
            if task.test_x is not None else [])
    link.send(wire.READY, {"endpoints": {}})
    peers = link.wait_for(wire.START).meta["peers"]
    out = net.outbox(*peers["downstream"], hwm=cfg.max_inflight + 2)

    def put(kind: str, batch: int, arrays: tuple, meta: dict | None = None) -> None:
        link.tick()
        send(out, wire.Message(kind, link.run_id, batch=batch, sender=link.role,
                               arrays=arrays, meta=meta or {}), link)

    t = cfg.start_epoch * cfg.batches_per_epoch  # a resumed run goes on from its checkpoint
    for epoch in range(cfg.start_epoch, cfg.epochs):
        for s in tasks.epoch_batches(cfg, epoch):
            put(wire.ACT, t, (np.ascontiguousarray(x[s]), np.ascontiguousarray(y[s])))
            t += 1
        for i, (xb, yb) in enumerate(test):
            put(wire.EVAL, i, (xb, yb), {"test": epoch})
        if checkpoint_due(epoch, cfg):
            put(wire.CHECKPOINT, t - 1, (), {"epoch": epoch})
        link.poll_stop()
    for i, (xb, yb) in enumerate(cut(x, y, data.batch_slices(cfg.examples, cfg.batch_size))):
        put(wire.EVAL, i, (xb, yb))
    put(wire.EOF, t, ())
    link.finish({"forward_batches": t}, 0, {})


if __name__ == "__main__":
    run(main)
