"""The output layer: its node (``pipeline.nodes.driver``) between its activation inbox
and the gradient socket of the last hidden layer, pumped by ``pipeline.net.pump``."""
from __future__ import annotations

import time

from pipeline.wire import protocol
from pipeline.layers.state import load_layer_state
from pipeline.config import Config
from pipeline.net.control import ControlLink
from pipeline.net.delay import DelayLine
from pipeline.nodes.driver import OutputNode
from pipeline.layers.build import Stream, layer_rng
from pipeline.net.pump import Outlet, Pump, input_inbox
from pipeline.net.transport import Inbox, Net, max_message_bytes
from workers.serve import run


def main(link: ControlLink, cfg: Config, net: Net) -> None:
    outlet = Outlet()
    node = OutputNode(cfg, outlet, link.run_id, start=time.perf_counter())
    if link.resume:
        load_layer_state(node.layer, *link.resume)
    hwm = cfg.max_inflight + 2
    max_bytes = max_message_bytes(cfg)
    act_sock, act_ep = net.inbox(0, hwm, max_bytes, protocol.upstream(cfg.layers, cfg.layers))
    acts = Inbox(act_sock, link.run_id, max_bytes, node.check_activation, link.dropped)
    endpoints = {"act": act_ep}
    inputs = input_inbox(link, cfg, net, node, cfg.layers, endpoints)

    def errors() -> int:
        return acts.errors + (inputs.errors if inputs else 0)
    # A stop that asks for the weights (the run's disk is full) gets them as they are.
    link.at_stop = lambda: (node.layer.stats.as_dict(), errors(), node.layer.weights())
    link.send(link.say.ready(endpoints))
    peers = protocol.peers(link.wait_for(protocol.START))
    outlet.attach(link, {"up": net.outbox(*peers["upstream_grad"], hwm)})
    pump = Pump(link, node, acts, outlet,
                act_line=(DelayLine(cfg.link_delay_ms / 1000, cfg.link_jitter_ms / 1000,
                                    layer_rng(cfg, cfg.layers, Stream.ACT_LINK)) if cfg.delay_activations else None),
                slowdown=cfg.slowdown(cfg.layers), hwm=hwm, inputs=inputs)
    pump.run()
    counters, weights = node.finish(time.perf_counter())
    counters["handling"] = pump.handling()
    link.finish(counters, errors(), weights)


if __name__ == "__main__":
    run(main)
