"""The in-process reference: the pipeline's nodes in one process, driven
through plain queues under the --lockstep rules.

It runs the very node objects the workers run (``pipeline.driver``), so a
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
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Callable, TextIO

from pipeline import memory, protocol, tasks
from pipeline.config import Config
from pipeline.driver import HiddenNode, OutputNode, SourceNode
from pipeline.layers import HiddenLayer
from pipeline.output_layer import Diverged, OutputLayer
from pipeline.protocol import ACT, METRIC, Message
from pipeline.rundir import RunDir, WriteError
from pipeline.sgwatch import SGWatch
from pipeline.summary import Progress, build_summary, close_run, layer_entry, save_weights

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


def train_reference(cfg: Config, emit: Emit | None = None,
                    should_stop: Callable[[], bool] | None = None,
                    layers: list | None = None) -> ReferenceResult:
    """Train ``cfg`` in this process: the source's messages go down the
    nodes' activation queues one batch at a time, each node reading its
    queue while its schedule lets it; gradients go up their queues and are
    delivered as they come, top layer first, so locked backprop passes its
    gradient all the way down in one sweep. ``emit`` gets every metric event
    the nodes send the coordinator; ``should_stop`` is asked before each
    training batch (True: KeyboardInterrupt); ``layers`` gets every layer as
    it is made (layer 1 first), for a run cut short to write them as they are."""
    emit = emit or (lambda event: None)
    start = time.perf_counter()
    final: dict = {}
    n = cfg.layers
    acts = [deque() for _ in range(n)]       # acts[i]: the activation queue of layer i + 1
    grads = [deque() for _ in range(n - 1)]  # grads[i]: the gradient queue of layer i + 1

    def link(msg: Message) -> None:
        if msg.kind == METRIC:
            if msg.meta["event"] == "final":
                final.update(msg.meta)
            else:
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
    src = SourceNode(cfg, tasks.load(cfg))
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


def run_in_process(cfg: Config, rd: RunDir, run_id: str, stream: TextIO,
                   shield: Callable[[], AbstractContextManager] = nullcontext) -> int:
    """``launch.py --in-process``: train with the reference and write the
    same run directory a pipeline run writes; returns the exit code.
    ``shield()`` holds signals off while the results are written. Should the
    run directory fail (its disk full), the run stops and writes the layers
    as they are."""
    progress = Progress(cfg, stream)
    watch = SGWatch(cfg)

    def emit(event: dict) -> None:
        rd.metric(event)
        if event["event"] == "epoch":
            progress.epoch(event)
        elif (warning := watch.add(event)) is not None:
            progress.warn(warning)

    start = time.perf_counter()
    status, final, layers, error = "completed", None, [], None
    live: list = []  # the layers as they train
    at_stop = False
    try:
        rd.write_json("config.json", {"run_id": run_id, "config": cfg.to_dict(),
                                      "processes": {}})
        result = train_reference(cfg, emit, layers=live)
    except KeyboardInterrupt:
        status = "interrupted"
    except Diverged as exc:
        status, error = "failed", {"role": "reference", "message": f"Diverged: {exc}"}
    except WriteError as exc:
        status, error = "failed", {"role": "reference", "message": str(exc)}
        at_stop = True
    with shield():  # a signal now is noted and ends the command after the summary
        saved = None
        if status == "completed":
            final = {"final_loss": result.final_loss, "train_accuracy": result.train_accuracy,
                     "test_loss": result.test_loss, "test_accuracy": result.test_accuracy,
                     "batches": result.batches, "train_s": result.wall_s}
        if status == "completed" or at_stop:
            layers = [layer_entry(L.index, protocol.layer_role(L.index, cfg.layers),
                                  L.stats.as_dict(), 0) for L in live]
            saved, failed = save_weights(rd, {protocol.layer_role(L.index, cfg.layers):
                                              L.weights() for L in live}, status)
            if failed is not None and error is None:
                status, error = "failed", {"role": "reference", "message": str(failed)}
        progress.finish()
        summary = build_summary(cfg, status=status, run_id=run_id, final=final, layers=layers,
                                wall_s=time.perf_counter() - start,
                                epochs_done=progress.epochs_done, error=error,
                                peak_rss_mb={"reference": memory.peak_rss_mb()},
                                cpu_s={"reference": memory.cpu_s()}, watch=watch,
                                weights=saved)
        return close_run(rd, summary, stream)
