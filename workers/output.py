"""The output layer: loss, true gradient back upstream, its own update; the
test split's evaluation after every epoch; then the evaluation pass that gives
the run's final loss and accuracy."""
from __future__ import annotations

import time

import zmq

from pipeline import wire
from pipeline.config import Config
from pipeline.delay import DelayLine, straggle
from pipeline.model import layer_rng, make_output, role_name
from pipeline.nodes import load_layer_state
from pipeline.roles import run
from pipeline.schedule import ends_epoch
from pipeline.stats import EpochStats
from pipeline.control import ControlLink
from pipeline.transport import POLL_MS, ActivationCheck, Inbox, Net, max_message_bytes, send

def main(link: ControlLink, cfg: Config, net: Net) -> None:
    out = make_output(cfg)
    if link.resume:
        load_layer_state(out, *link.resume)
    d = cfg.dims
    upstream = role_name(cfg.layers - 1, cfg)
    hwm = cfg.max_inflight + 2
    max_bytes = max_message_bytes(cfg)
    next_batch = 0  # training batches done
    check_act = ActivationCheck(upstream, d[-2], d[-1], cfg.batch_size, cfg.np_dtype,
                                first_batch=cfg.start_epoch * cfg.batches_per_epoch)

    act_sock, act_ep = net.inbox(0, hwm, max_bytes)
    acts = Inbox(act_sock, link.run_id, max_bytes, check_act, link.dropped)
    link.send(wire.READY, {"endpoints": {"act": act_ep}})
    peers = link.wait_for(wire.START).meta["peers"]
    up = net.outbox(*peers["upstream_grad"], hwm)

    stats = EpochStats()
    evaluation = EpochStats()
    test = EpochStats()
    last_test: dict = {}
    held: list[dict] = []  # an epoch's event, until its test split is evaluated
    started = time.perf_counter()
    train_s = 0.0
    slowdown = cfg.slowdown(cfg.layers)
    act_line = (DelayLine(cfg.link_delay_ms / 1000, cfg.link_jitter_ms / 1000,
                          layer_rng(cfg, cfg.layers, 4)) if cfg.delay_activations else None)

    def on_activation(msg: wire.Message) -> bool:
        """Process one activation message; True at end of stream."""
        nonlocal next_batch, train_s
        if msg.kind == wire.ACT:
            x, y = msg.arrays
            t0 = time.perf_counter()
            dx, loss, correct = out.train_step(x, y, need_dx=True)
            straggle(t0, slowdown)
            next_batch += 1
            send(up, wire.Message(wire.GRAD, link.run_id, batch=msg.batch, sender=link.role,
                                  step=out.step, arrays=(dx,)), link)
            stats.add(loss, correct, len(y))
            if ends_epoch(msg.batch, cfg.batches_per_epoch):
                train_s = time.perf_counter() - started
                event = stats.epoch_event(link.role, msg.batch // cfg.batches_per_epoch, train_s)
                if cfg.test_examples:
                    held.append(event)
                else:
                    link.event(event)
        elif msg.kind == wire.EVAL and "test" in msg.meta:
            x, y = msg.arrays
            test.add(*out.evaluate(x, y), len(y))
            if test.batches == cfg.test_batches:
                loss, accuracy, _ = test.take()
                last_test.update(test_loss=loss, test_accuracy=accuracy)
                if held:  # the epoch just trained (a resumed run trains it first too)
                    link.event({**held.pop(), **last_test})
        elif msg.kind == wire.EVAL:
            x, y = msg.arrays
            evaluation.add(*out.evaluate(x, y), len(y))
        elif msg.kind == wire.CHECKPOINT:  # nothing in flight here: save at once
            link.checkpoint(msg.meta["epoch"], out)
        return msg.kind == wire.EOF

    poller = zmq.Poller()
    poller.register(link.sock, zmq.POLLIN)
    poller.register(act_sock, zmq.POLLIN)
    eof = False
    while not eof:
        wait = act_line.wait_s(time.monotonic()) if act_line else None
        events = dict(poller.poll(POLL_MS if wait is None else min(POLL_MS, int(wait * 1000) + 1)))
        if link.sock in events:
            link.poll_stop()
        link.tick()
        if act_sock in events:
            msg = acts.recv()
            if msg is not None:
                if act_line is None:
                    eof = on_activation(msg)
                else:
                    act_line.push(msg, time.monotonic())
        if act_line is not None:
            for msg in act_line.pop_ready(time.monotonic()):
                eof = on_activation(msg) or eof
    final_loss, accuracy, _ = evaluation.take()
    link.event({"event": "final", "role": link.role, "final_loss": final_loss,
                "train_accuracy": accuracy, "batches": next_batch, "train_s": train_s,
                **last_test})
    link.finish(out.stats.as_dict(), acts.errors, out.weights())


if __name__ == "__main__":
    run(main)
