"""A hidden layer: its node (``pipeline.nodes.driver``) between an activation inbox,
a gradient inbox, and the sockets to its neighbours, pumped by ``pipeline.net.pump``."""
from __future__ import annotations

import time

from pipeline.wire import protocol
from pipeline.layers.state import load_layer_state
from pipeline.config import Config
from pipeline.net.control import ControlLink
from pipeline.net.delay import DelayLine
from pipeline.nodes.driver import HiddenNode
from pipeline.layers.build import Stream, layer_rng
from pipeline.net.pump import Outlet, Pump, input_inbox
from pipeline.net.transport import Inbox, Net, max_message_bytes
from workers.serve import run


def main(link: ControlLink, cfg: Config, net: Net) -> None:
    index = int(link.role.removeprefix("layer"))
    outlet = Outlet()
    node = HiddenNode(cfg, index, outlet, link.run_id, start=time.perf_counter())
    if link.resume:
        load_layer_state(node.layer, *link.resume)
    hwm = cfg.grad_delay + cfg.max_inflight + 2
    max_bytes = max_message_bytes(cfg)
    # Under CURVE only the upstream role's key may send activations here, and
    # only the downstream one's gradients.
    act_sock, act_ep = net.inbox(0, hwm, max_bytes, protocol.upstream(index, cfg.layers))
    grad_sock, grad_ep = net.inbox(1, hwm, max_bytes, protocol.downstream(index, cfg.layers))
    acts = Inbox(act_sock, link.run_id, max_bytes, node.check_activation, link.dropped)
    grads = Inbox(grad_sock, link.run_id, max_bytes, node.check_gradient, link.dropped)
    endpoints = {"act": act_ep, "grad": grad_ep}
    inputs = input_inbox(link, cfg, net, node, index, endpoints)

    def errors() -> int:
        return acts.errors + grads.errors + (inputs.errors if inputs else 0)
    # A stop that asks for the weights (the run's disk is full) gets them as they are.
    link.at_stop = lambda: (node.layer.stats.as_dict(), errors(), node.layer.weights())
    link.send(link.say.ready(endpoints))
    peers = protocol.peers(link.wait_for(protocol.START))
    outs = {"down": net.outbox(*peers["downstream"], hwm)}
    if index > 1:
        outs["up"] = net.outbox(*peers["upstream_grad"], hwm)
    delay_s, jitter_s = cfg.link_delay_ms / 1000, cfg.link_jitter_ms / 1000
    outlet.attach(link, outs)
    pump = Pump(link, node, acts, outlet, grads,
                act_line=(DelayLine(delay_s, jitter_s, layer_rng(cfg, index, Stream.ACT_LINK))
                          if cfg.delay_activations else None),
                grad_line=(DelayLine(delay_s, jitter_s, layer_rng(cfg, index, Stream.GRAD_LINK))
                           if cfg.link_delay_ms > 0 else None),
                slowdown=cfg.slowdown(index), hwm=hwm, inputs=inputs)
    pump.run()
    counters, weights = node.finish(time.perf_counter())
    counters["handling"] = pump.handling()
    link.finish(counters, errors(), weights)


if __name__ == "__main__":
    run(main)
