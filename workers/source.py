"""The data source: sends every message of the source node (``pipeline.nodes.driver``)
down to the first layer (under ``--unlock forward`` each training batch also
to every layer above it), holding while ZeroMQ's high-water mark says it is full."""
from __future__ import annotations

from pipeline.data import tasks
from pipeline.nodes import schedule
from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.net.control import ControlLink
from pipeline.nodes.driver import SourceNode
from pipeline.net.transport import Net, send
from workers.serve import run


def main(link: ControlLink, cfg: Config, net: Net) -> None:
    node = SourceNode(cfg, tasks.load(cfg), link.run_id)
    link.send(link.say.ready({}))
    peers = protocol.peers(link.wait_for(protocol.START))
    outs = {"down": net.outbox(*peers["downstream"], hwm=cfg.max_inflight + 2)}
    for role in cfg.input_roles:
        port = protocol.input_port(role)
        outs[port] = net.outbox(*peers[port], hwm=cfg.input_hwm)
    for msg in node.messages():
        link.tick()
        for port, out in node.fan_out(msg):
            send(outs[port], out, link)
        link.progress += 1
        if msg.kind != protocol.ACT or schedule.ends_epoch(msg.batch, cfg.batches_per_epoch):
            link.poll_stop()  # a stop between epochs is not held up by a free link
    link.finish({"forward_batches": node.batches}, 0, {})


if __name__ == "__main__":
    run(main)
