"""A virtual-time run (``--simulate``): the pipeline's nodes in one process,
each on its own modelled machine, driven by a discrete-event scheduler.

Every role (the source, each layer) handles one message at a time: a
handling starts at a virtual time, takes what the timing model says
(``pipeline.nodes.timing``), and what the node sends during it leaves when it
ends, then crosses its link (delay, jitter, bandwidth) to the next role's
inbox. An idle role takes, as the worker's pump does, a waiting gradient
first, then (unlocked) an input its schedule allows, then an activation its
schedule allows (``may_take``); otherwise it waits. The source keeps at most
``grad_delay + max_inflight + 2`` batches on their way to layer 1 (the
high-water mark of a layer's inbox), and the input links' own.

The order is fixed, so the run is too: events are taken in virtual-time
order; at equal times, first every arrival and every end of a handling due
then, in the order they were scheduled; then each idle role, from the source
down the chain, starts what it may. Nothing here reads the machine's clock:
the same configuration gives the same weights bit for bit, whatever the
machine's load. With ``--lockstep`` the nodes' rules fix each layer's
sequence of updates whatever the timing (``pipeline.nodes.reference`` says
why), so any model gives the reference's weights; free-running, a source
slower than a batch's whole round trip gives the same schedule as
``--lockstep --grad-delay 0``.
"""
from __future__ import annotations

import heapq
import itertools
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from pipeline.config import Config
from pipeline.layers.state import load_layer_state
from pipeline.nodes.cores import Cores
from pipeline.nodes.driver import Arrays, HiddenNode, OutputNode, SourceNode
from pipeline.nodes.reference import Emit, ReferenceResult
from pipeline.nodes.timing import Timing
from pipeline.wire import protocol
from pipeline.wire.protocol import ACT, CHECKPOINT, METRIC, Message


@dataclass
class SimResult(ReferenceResult):
    virtual_s: float = 0.0               # the virtual time when the last role finished


class _Role:
    """One role's inboxes."""

    def __init__(self) -> None:
        self.acts: deque[Message] = deque()
        self.grads: deque[Message] = deque()
        self.inputs: deque[Message] = deque()
        self.socket: list[Message] = []  # --emulated-links: arrived, not read yet


def simulate(cfg: Config, task: Arrays, timing: Timing, emit: Emit | None = None,
             should_stop: Callable[[], bool] | None = None,
             layers: list | None = None, trace: list | None = None,
             checkpoint: Callable[[Message], None] | None = None,
             states: dict | None = None) -> SimResult:
    """Train ``cfg`` on ``task`` in virtual time under ``timing``. ``emit``,
    ``should_stop`` and ``layers`` as ``train_reference``'s (each metric event
    also gets ``wall_s``, the machine's seconds so far); ``trace`` gets
    ``(time in ns, role position, kind, batch)`` of every handling as it starts.
    ``checkpoint`` gets each layer's state message at a checkpoint barrier, as
    a process run's coordinator does; ``states``: each layer role's (state,
    arrays) of the checkpoint a resumed run (``cfg.start_epoch``) goes on
    from. A resumed run starts with every role idle and every link empty at
    virtual time 0, as a real resumed run starts its processes afresh."""
    emit = emit or (lambda event: None)
    wall0 = time.perf_counter()
    n = cfg.layers
    final: dict = {}
    sent: list[tuple[str, Message]] = []  # what the node handling now has sent
    roles = [_Role() for _ in range(n + 1)]
    heap: list = []
    order = itertools.count()
    in_flight = {}  # (position, box): messages on their way there

    def arrive(t: int, to: int, box: str, msg: Message) -> None:
        heapq.heappush(heap, (t, next(order), to, box, msg))

    def outlet(port: str, msg: Message) -> None:
        if port != "link":
            sent.append((port, msg))
        elif msg.kind == METRIC:  # "final" too, as a process run's coordinator records it
            if msg.meta["event"] == "final":
                final.update(msg.meta)
            emit({**msg.meta, "wall_s": time.perf_counter() - wall0})
        elif msg.kind == CHECKPOINT and checkpoint is not None:
            checkpoint(msg)

    hidden = [HiddenNode(cfg, k, outlet) for k in range(1, n)]
    output = OutputNode(cfg, outlet)
    nodes = [None, *hidden, output]
    for p, node in enumerate(nodes[1:] if states else [], 1):  # a resumed run goes on
        load_layer_state(node.layer, *states[protocol.layer_role(p, n)])
    if layers is not None:
        layers.extend(node.layer for node in nodes[1:])
    input_box = {protocol.input_port(protocol.layer_role(p, n)): p
                 for p in range(2, n + 1) if nodes[p].streams is not None}
    src = SourceNode(cfg, task)
    source = src.messages()
    lead = cfg.grad_delay + cfg.max_inflight + 2
    src_done = False

    def route(p: int, port: str, msg: Message, t: int) -> None:
        to, box = ((p + 1, "act") if port == "down" else (p - 1, "grad") if port == "up"
                   else (input_box[port], "input"))
        in_flight[(to, box)] = in_flight.get((to, box), 0) + 1
        at = timing.arrival_ns(t, to, box, msg)
        arrive(at, to, "socket" if timing.at_receiver and timing.delayed(box) else box, msg)

    def read(p: int, t: int) -> None:
        """--emulated-links: an idle role reads what waits in its sockets, and
        each message's delay starts now."""
        for msg in roles[p].socket:
            box = "grad" if msg.kind == protocol.GRAD else "act"
            arrive(timing.held_ns(t, p, box), p, box, msg)
        roles[p].socket.clear()

    def backlog(to: int, box: str) -> int:
        r = roles[to]
        return in_flight.get((to, box), 0) + len(r.acts if box == "act" else r.inputs)

    def pick(p: int):
        """What role ``p`` takes now: (handler, message), or None."""
        nonlocal src_done
        r = roles[p]
        if p == 0:
            if src_done or backlog(1, "act") >= lead or any(
                    backlog(q, "input") >= cfg.input_hwm for q in input_box.values()):
                return None
            msg = next(source, None)
            if msg is None:
                src_done = True
                return None
            if msg.kind == ACT and should_stop is not None and should_stop():
                raise KeyboardInterrupt
            return "source", msg
        node = nodes[p]
        if r.grads:
            return node.on_gradient, r.grads.popleft()
        if r.inputs and node.may_take_input():
            return node.on_input, r.inputs.popleft()
        if r.acts and node.may_take():
            return node.on_activation, r.acts.popleft()
        return None

    def start(p: int, t: int) -> None:
        took = pick(p)
        if took is None:
            return
        handler, msg = took
        if trace is not None:
            trace.append((t, p, msg.kind, msg.batch))
        if handler == "source":
            sent.extend(src.fan_out(msg))
        else:
            handler(msg, t / 1e9)
        busy[p] = [timing.handling_ns(p, msg.kind), list(sent), t]  # work left, sends, start
        sent.clear()

    busy: dict[int, list] = {}  # role position: [ns of work left, its sends, when it began]
    asleep: dict[int, tuple] = {}  # a straggler idling: (when it wakes, its sends)
    cpus = Cores(cfg.cores, round(cfg.quantum_ms * 1e6))
    now = 0  # nanoseconds
    while True:
        for p in range(n + 1):
            if p not in busy and p not in asleep:
                read(p, now)
                start(p, now)
        cpus.settle(busy)
        wait = cpus.next_ns(busy)
        times = [t for t in (now + wait if wait is not None else None,
                             heap[0][0] if heap else None,
                             min((w for w, _ in asleep.values()), default=None)) if t is not None]
        if not times:
            break
        t = min(times)
        cpus.advance(busy, t - now)
        now = t
        for p in sorted(busy):  # the ends first, in chain order: their sends leave now
            if busy[p][0] <= 0:
                _, out, began = busy.pop(p)
                idle = timing.idle_ns(p, now - began)
                if idle > 0:
                    asleep[p] = (now + idle, out)
                else:
                    for port, msg in out:
                        route(p, port, msg, now)
        for p in sorted(asleep):  # a straggler's idling over: its sends leave
            if asleep[p][0] == now:
                for port, msg in asleep.pop(p)[1]:
                    route(p, port, msg, now)
        while heap and heap[0][0] == now:
            _, _, to, box, msg = heapq.heappop(heap)
            r = roles[to]
            if box == "socket":  # --emulated-links: read when the role is next idle
                r.socket.append(msg)
                continue
            in_flight[(to, box)] -= 1
            (r.acts if box == "act" else r.grads if box == "grad" else r.inputs).append(msg)
    stuck = [protocol.layer_role(p, n) for p in range(1, n + 1) if not nodes[p].finished]
    if stuck or not src_done:
        raise RuntimeError(f"the virtual run stopped with {', '.join(stuck) or 'the source'} "
                           f"not finished: a schedule rule waits for a message that never comes")
    for node in hidden:
        node.finish(now / 1e9)
    return SimResult([node.layer for node in hidden], output.layer, final["train_s"],
                     final["batches"], final["final_loss"], final["train_accuracy"],
                     final.get("test_loss"), final.get("test_accuracy"), virtual_s=now / 1e9)
