"""A hidden layer: forward, synthetic-gradient update at once, true gradients
whenever they come back from downstream (or, in backprop mode, wait for them)."""
from __future__ import annotations

import time

import zmq

from pipeline import wire
from pipeline.config import Config
from pipeline.delay import DelayLine, straggle
from pipeline.model import layer_rng, make_hidden, role_name
from pipeline.nodes import load_layer_state
from pipeline.roles import run
from pipeline.schedule import may_take_batch
from pipeline.stats import Applied, LayerEpoch
from pipeline.control import ControlLink
from pipeline.transport import (POLL_MS, ActivationCheck, Inbox, Net, expect,
                                max_message_bytes, send)

def main(link: ControlLink, cfg: Config, net: Net) -> None:
    index = int(link.role.removeprefix("layer"))
    layer = make_hidden(cfg, index)
    if link.resume:
        load_layer_state(layer, *link.resume)
    d = cfg.dims
    upstream = role_name(index - 1, cfg) if index > 1 else "source"
    downstream = role_name(index + 1, cfg)
    hwm = cfg.grad_delay + cfg.max_inflight + 2
    max_bytes = max_message_bytes(cfg)
    check_act = ActivationCheck(upstream, d[index - 1], d[-1], cfg.batch_size, cfg.np_dtype,
                                first_batch=cfg.start_epoch * cfg.batches_per_epoch)

    def check_grad(msg: wire.Message) -> None:
        lost = msg.meta.get("lost") is True
        expect(msg, (wire.GRAD,), [] if lost else [(None, d[index])], cfg.np_dtype,
               cfg.batch_size)
        if msg.sender != downstream:
            raise ValueError(f"gradient from {msg.sender!r}, expected {downstream!r}")
        p = layer.pending.get(msg.batch)
        if p is None or msg.batch in layer.arrived:
            raise ValueError(f"gradient for batch {msg.batch}, which is not awaited")
        if not lost and msg.arrays[0].shape[0] != p.rows:
            raise ValueError(f"gradient for batch {msg.batch} has {msg.arrays[0].shape[0]} "
                             f"rows, the batch had {p.rows}")

    act_sock, act_ep = net.inbox(0, hwm, max_bytes)
    grad_sock, grad_ep = net.inbox(1, hwm, max_bytes)
    acts = Inbox(act_sock, link.run_id, max_bytes, check_act, link.dropped)
    grads = Inbox(grad_sock, link.run_id, max_bytes, check_grad, link.dropped)
    link.send(wire.READY, {"endpoints": {"act": act_ep, "grad": grad_ep}})
    peers = link.wait_for(wire.START).meta["peers"]
    down = net.outbox(*peers["downstream"], hwm)
    up = net.outbox(*peers["upstream_grad"], hwm) if index > 1 else None

    def put(sock: zmq.Socket, kind: str, batch: int, arrays: tuple, meta: dict | None = None
            ) -> None:
        send(sock, wire.Message(kind, link.run_id, batch=batch, sender=link.role,
                                step=layer.step, arrays=arrays, meta=meta or {}), link)

    delay_s, jitter_s = cfg.link_delay_ms / 1000, cfg.link_jitter_ms / 1000
    grad_line = (DelayLine(delay_s, jitter_s, layer_rng(cfg, index, 3))
                 if cfg.link_delay_ms > 0 else None)
    act_line = (DelayLine(delay_s, jitter_s, layer_rng(cfg, index, 4))
                if cfg.delay_activations else None)
    slowdown = cfg.slowdown(index)
    # Activations and input gradients go out the moment they are computed,
    # so the neighbours work on them while this layer finishes its step
    # (in locked backprop the layer above computes its dx while this one
    # computes its weight gradient). A straggler (--slow) sends when done,
    # as a slow layer would.
    early = slowdown == 1.0
    epoch_stats = LayerEpoch(link.role, cfg.batches_per_epoch)
    started = time.perf_counter()

    def send_up(batch: int, dx) -> None:
        put(up, wire.GRAD, batch, (dx,))

    def applied(a: Applied) -> None:
        if a.dx is not None and not early:
            send_up(a.batch, a.dx)
        event = epoch_stats.add(a, time.perf_counter() - started)
        if event:
            link.event(event)

    def settle() -> None:
        t0 = time.perf_counter()
        done = layer.apply_ready(need_dx=up is not None, send_dx=send_up if early else None)
        if done:
            straggle(t0, slowdown)
        for a in done:
            applied(a)

    def lost_upstream(batch: int) -> None:
        # Backprop modes: no gradient for this batch will go up; say so, or
        # the layer above would wait for it forever.
        if not layer.uses_sg and up is not None:
            put(up, wire.GRAD, batch, (), {"lost": True})

    def on_gradient(msg: wire.Message) -> None:
        if msg.meta.get("lost") is True:
            layer.lose(msg.batch)
            lost_upstream(msg.batch)
        elif not layer.receive(msg.batch, msg.arrays[0]):
            lost_upstream(msg.batch)
        settle()

    def on_activation(msg: wire.Message) -> bool:
        """Process one activation message; True at end of stream."""
        if msg.kind == wire.ACT:
            x, y = msg.arrays
            t0 = time.perf_counter()
            if early:
                layer.forward(msg.batch, x, y, need_dx=up is not None,
                              send_h=lambda h: put(down, wire.ACT, msg.batch, (h, y)),
                              send_dx=lambda dx: send_up(msg.batch, dx))
            else:
                h, dx = layer.forward(msg.batch, x, y, need_dx=up is not None)
                straggle(t0, slowdown)
                put(down, wire.ACT, msg.batch, (h, y))
                if dx is not None:
                    send_up(msg.batch, dx)
            settle()  # the clock moved: gradients may have become due
            return False
        if msg.kind == wire.EVAL:
            x, y = msg.arrays
            put(down, wire.EVAL, msg.batch, (layer.forward_eval(x), y), msg.meta)
            return False
        if msg.kind == wire.CHECKPOINT:
            # A barrier: take nothing more until every due gradient is in.
            barrier.append(msg)
            return False
        put(down, wire.EOF, msg.batch, ())
        return True

    barrier: list[wire.Message] = []

    def at_barrier() -> None:
        """Save this layer's state to the coordinator, then pass the barrier on."""
        if barrier and layer.due_outstanding() == 0:
            msg = barrier.pop()
            link.checkpoint(msg.meta["epoch"], layer)
            put(down, wire.CHECKPOINT, msg.batch, (), msg.meta)

    def may_take() -> bool:
        if barrier:
            return False
        return may_take_batch(mode=cfg.mode, lockstep=cfg.lockstep,
                              pending=len(layer.pending),
                              due_outstanding=layer.due_outstanding(),
                              max_inflight=cfg.max_inflight, grad_delay=cfg.grad_delay)

    poller = zmq.Poller()
    poller.register(link.sock, zmq.POLLIN)
    poller.register(grad_sock, zmq.POLLIN)
    eof = eof_read = False
    reading = False
    while not (eof and layer.due_outstanding() == 0):
        # Backpressure: leave activations queued in ZeroMQ while we may not
        # take them (with a delayed link, while its line is full).
        at_barrier()
        take = not eof_read and (may_take() if act_line is None else len(act_line) < hwm)
        if take != reading:
            if take:
                poller.register(act_sock, zmq.POLLIN)
            else:
                poller.unregister(act_sock)
            reading = take
        now = time.monotonic()
        waits = [line.wait_s(now) for line in (grad_line, act_line) if line is not None]
        waits = [w for w in waits if w is not None]
        timeout = min([POLL_MS] + [int(w * 1000) + 1 for w in waits])
        events = dict(poller.poll(timeout))
        if link.sock in events:
            link.poll_stop()
        link.tick()
        if grad_sock in events:
            while grad_sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                msg = grads.recv()
                if msg is None:
                    continue
                if grad_line is not None:
                    grad_line.push(msg, time.monotonic())
                else:
                    on_gradient(msg)
        if grad_line is not None:
            for msg in grad_line.pop_ready(time.monotonic()):
                on_gradient(msg)
        if take and act_sock in events:
            msg = acts.recv()
            if msg is not None:
                if act_line is not None:
                    act_line.push(msg, time.monotonic())
                    eof_read = msg.kind == wire.EOF
                else:
                    eof = eof_read = on_activation(msg)
        if act_line is not None:
            while act_line.wait_s(time.monotonic()) == 0 and may_take():
                eof = on_activation(act_line.pop()) or eof
    layer.expire()  # not yet due when training ended: never will be
    event = epoch_stats.flush(time.perf_counter() - started)
    if event:
        link.event(event)
    link.finish(layer.stats.as_dict(), acts.errors + grads.errors, layer.weights())


if __name__ == "__main__":
    run(main)
