"""A hidden layer: forward, synthetic-gradient update at once, true gradients
whenever they come back from downstream (or, in backprop mode, wait for them)."""
from __future__ import annotations

import numpy as np
import zmq

from pipeline import wire
from pipeline.config import Config
from pipeline.model import make_hidden, role_name
from pipeline.roles import run
from pipeline.schedule import ends_epoch, may_take_batch
from pipeline.stats import EpochStats
from pipeline.transport import (POLL_MS, ControlLink, Inbox, bind_inbox, connect_outbox,
                                context, expect, max_message_bytes, send)

F64 = np.dtype(np.float64)


def main(link: ControlLink, cfg: Config) -> None:
    index = int(link.role.removeprefix("layer"))
    layer = make_hidden(cfg, index)
    d = cfg.dims
    upstream = role_name(index - 1, cfg) if index > 1 else "source"
    downstream = role_name(index + 1, cfg)
    ctx = context()
    hwm = cfg.max_inflight + 2
    max_bytes = max_message_bytes(cfg)
    next_batch = 0  # training batches arrive in order; anything else is not ours

    def check_act(msg: wire.Message) -> None:
        expect(msg, (wire.ACT, wire.EVAL, wire.EOF), [(None, d[index - 1]), (None, d[-1])],
               F64, cfg.batch_size)
        if msg.sender != upstream:
            raise ValueError(f"activation from {msg.sender!r}, expected {upstream!r}")
        if msg.kind == wire.ACT and msg.batch != next_batch:
            raise ValueError(f"activation for batch {msg.batch}, expected {next_batch}")

    def check_grad(msg: wire.Message) -> None:
        expect(msg, (wire.GRAD,), [(None, d[index])], F64, cfg.batch_size)
        if msg.sender != downstream:
            raise ValueError(f"gradient from {msg.sender!r}, expected {downstream!r}")
        p = layer.pending.get(msg.batch)
        if p is None:
            raise ValueError(f"gradient for batch {msg.batch}, which is not in flight")
        rows = (p.h if p.h is not None else p.sg_in).shape[0]
        if msg.arrays[0].shape[0] != rows:
            raise ValueError(f"gradient for batch {msg.batch} has {msg.arrays[0].shape[0]} "
                             f"rows, the batch had {rows}")

    act_sock, act_ep = bind_inbox(ctx, "127.0.0.1", hwm, max_bytes)
    grad_sock, grad_ep = bind_inbox(ctx, "127.0.0.1", hwm, max_bytes)
    acts = Inbox(act_sock, link.run_id, max_bytes, check_act, link.dropped)
    grads = Inbox(grad_sock, link.run_id, max_bytes, check_grad, link.dropped)
    link.send(wire.READY, {"endpoints": {"act": act_ep, "grad": grad_ep}})
    peers = link.wait_for(wire.START).meta["peers"]
    down = connect_outbox(ctx, peers["downstream"], hwm)
    up = connect_outbox(ctx, peers["upstream_grad"], hwm) if index > 1 else None

    def put(sock: zmq.Socket, kind: str, batch: int, arrays: tuple) -> None:
        send(sock, wire.Message(kind, link.run_id, batch=batch, sender=link.role,
                                step=layer.step, arrays=arrays), link)

    sg_stats = EpochStats()
    started = _clock()

    def on_gradient(msg: wire.Message) -> None:
        dx, sg_loss = layer.receive_gradient(msg.batch, msg.arrays[0], need_dx=up is not None)
        if dx is not None:
            put(up, wire.GRAD, msg.batch, (dx,))
        if sg_loss is not None:
            sg_stats.add(sg_loss, 0, msg.arrays[0].shape[0])
            if ends_epoch(msg.batch, cfg.batches_per_epoch):
                link.event(sg_stats.sg_event(link.role, msg.batch // cfg.batches_per_epoch,
                                             _clock() - started))

    poller = zmq.Poller()
    poller.register(link.sock, zmq.POLLIN)
    poller.register(grad_sock, zmq.POLLIN)
    eof = False
    reading = False
    while not (eof and not layer.pending):
        take = not eof and may_take_batch(mode=cfg.mode, lockstep=cfg.lockstep,
                                          pending=len(layer.pending),
                                          max_inflight=cfg.max_inflight)
        if take != reading:  # backpressure: leave activations queued in ZeroMQ
            if take:
                poller.register(act_sock, zmq.POLLIN)
            else:
                poller.unregister(act_sock)
            reading = take
        events = dict(poller.poll(POLL_MS))
        if link.sock in events:
            link.poll_stop()
        link.check_parent()
        if grad_sock in events:
            while grad_sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = grads.recv()
                if msg is not None:
                    on_gradient(msg)
        if take and act_sock in events:
            msg = acts.recv()
            if msg is None:
                continue
            if msg.kind == wire.ACT:
                x, y = msg.arrays
                h, dx = layer.forward(msg.batch, x, y, need_dx=up is not None)
                next_batch += 1
                put(down, wire.ACT, msg.batch, (h, y))
                if dx is not None:
                    put(up, wire.GRAD, msg.batch, (dx,))
            elif msg.kind == wire.EVAL:
                x, y = msg.arrays
                put(down, wire.EVAL, msg.batch, (layer.forward_eval(x), y))
            else:
                eof = True
                put(down, wire.EOF, msg.batch, ())
    link.finish(layer.counters.as_dict(), acts.errors + grads.errors, layer.weights())


def _clock() -> float:
    import time
    return time.perf_counter()


if __name__ == "__main__":
    run(main)
