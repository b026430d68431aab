"""The in-process reference: the pipeline's nodes in one process, driven
through plain queues under the --lockstep rules.

It runs the very node objects the workers run (``pipeline.nodes.driver``), so a
``--lockstep`` pipeline ends with its weights bit for bit; it is the oracle
the pipeline is tested against (itself checked against independent numpy
loops in ``tests/test_reference.py``) and the baseline it is timed against.
Why any fair order of deliveries gives the same bits: a layer's arithmetic
depends only on its own sequence of forward passes and applied gradients,
and under --lockstep that sequence is fixed (forward t, then every gradient
due by then, then forward t + 1), whoever else works in between. Under
``--unlock forward`` a layer above the first also reads an input queue, and
its sequence is (synthetic step t, the true input of t - K, every gradient
due by then, synthetic step t + 1): ``schedule.unlocked_reads`` and
``schedule.input_owed`` fix it the same way.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.nodes.driver import Arrays, HiddenNode, OutputNode, SourceNode
from pipeline.layers.hidden import HiddenLayer
from pipeline.layers.output import OutputLayer
from pipeline.wire.protocol import ACT, METRIC, Message

Event = dict
Emit = Callable[[Event], None]


@dataclass
class ReferenceResult:
    hidden: list[HiddenLayer]
    output: OutputLayer
    wall_s: float                        # training time, to the end of the last epoch
    batches: int
    final_loss: float
    train_accuracy: float
    test_loss: float | None = None       # after the last epoch, on the test split
    test_accuracy: float | None = None


def train_reference(cfg: Config, task: Arrays, emit: Emit | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    layers: list | None = None) -> ReferenceResult:
    """Train ``cfg`` on ``task`` (``tasks.load``) in this process: the source's messages go down the
    nodes' activation queues one batch at a time, each node reading its
    queue while its schedule lets it; gradients go up their queues and are
    delivered as they come, top layer first, so locked backprop passes its
    gradient all the way down in one sweep. ``emit`` gets every metric event
    the nodes send the coordinator (their epochs counted from 1), the
    output's ``final`` evaluation too; ``should_stop`` is asked before each
    training batch (True: KeyboardInterrupt); ``layers`` gets every layer as
    it is made (layer 1 first), for a run cut short to write them as they are."""
    emit = emit or (lambda event: None)
    start = time.perf_counter()
    final: dict = {}
    n = cfg.layers
    acts = [deque() for _ in range(n)]       # acts[i]: the activation queue of layer i + 1
    grads = [deque() for _ in range(n - 1)]  # grads[i]: the gradient queue of layer i + 1

    def link(msg: Message) -> None:
        if msg.kind == METRIC:  # "final" too, as a process run's coordinator records it
            if msg.meta["event"] == "final":
                final.update(msg.meta)
            emit(dict(msg.meta))

    def outlet(i: int):
        """Where layer i + 1's node sends: the queues of its neighbours."""
        def send(port: str, msg: Message) -> None:
            if port == "down":
                acts[i + 1].append(msg)
            elif port == "up":
                grads[i - 1].append(msg)
            else:
                link(msg)
        return send

    hidden = [HiddenNode(cfg, k, outlet(k - 1), start=start) for k in range(1, n)]
    output = OutputNode(cfg, outlet(n - 1), start=start)
    nodes: list[HiddenNode | OutputNode] = [*hidden, output]
    if layers is not None:
        layers.extend(node.layer for node in nodes)
    inputs = {protocol.input_port(protocol.layer_role(i + 1, n)): deque()
              for i, node in enumerate(nodes) if node.streams is not None}
    src = SourceNode(cfg, task)
    source = src.messages()
    sent_all = False
    down, up = list(zip(nodes, acts)), list(zip(reversed(hidden), reversed(grads)))
    side = [(node, inputs.get(protocol.input_port(protocol.layer_role(i + 1, cfg.layers))))
            for i, node in enumerate(nodes)]
    while not (sent_all and all(node.finished for node in nodes)):
        if not acts[0] and not sent_all:  # one message at a time: memory stays one batch deep
            msg = next(source, None)
            sent_all = msg is None
            if msg is not None:
                if msg.kind == ACT and should_stop is not None and should_stop():
                    raise KeyboardInterrupt
                for port, out in src.fan_out(msg):
                    (acts[0] if port == "down" else inputs[port]).append(out)
        for (node, queue), (_, inbox) in zip(down, side):
            while True:  # the node's rule picks the queue; stop when it may read neither
                if inbox and node.may_take_input():
                    node.on_input(inbox.popleft(), time.perf_counter())
                elif queue and node.may_take():
                    node.on_activation(queue.popleft(), time.perf_counter())
                else:
                    break
        for node, queue in up:
            while queue:
                node.on_gradient(queue.popleft(), time.perf_counter())
    # The stream has ended everywhere: a layer's gradients not yet due expire.
    now = time.perf_counter()
    for node in hidden:
        node.finish(now)
    return ReferenceResult([n.layer for n in hidden], output.layer, final["train_s"],
                           final["batches"], final["final_loss"], final["train_accuracy"],
                           final.get("test_loss"), final.get("test_accuracy"))
