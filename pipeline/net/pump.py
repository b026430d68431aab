"""The socket pump around a layer's node: one poll loop for the hidden and
the output roles.

It reads the gradient inbox whenever something is there, and the activation
inbox (and, under ``--unlock forward``, the input inbox) only while the
node's schedule lets it (otherwise the messages stay
queued in ZeroMQ, whose high-water marks then hold the sender back); it hands
each message to the node with the time, and sends what the node says, the
moment the node says it. Wall-clock injection lives here, not in the node:
with ``--link-delay`` messages wait on a delay line before the node sees
them, and a straggler (``--slow``) holds its sends until its slowed work is
done, as a slow machine would.
"""
from __future__ import annotations

import time
from typing import Callable

import zmq

from pipeline.net import transport
from pipeline.wire import protocol
from pipeline.net.control import ControlLink
from pipeline.net.delay import DelayLine, straggle
from pipeline.wire.protocol import EOF, Message
from pipeline.net.transport import POLL_MS, Inbox, Net, max_message_bytes

Handler = Callable[[Message, float], None]
DRAIN = 16  # activations taken in a row at most, before the control link is looked at again
# pyzmq's option and flag enums as plain ints: ``events & zmq.POLLIN`` goes
# through enum.Flag in Python, which costs more than the rest of the check.
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)


def waiting(sock: zmq.Socket) -> bool:
    """Whether a message is waiting in ``sock`` (without a poll)."""
    return bool(sock.getsockopt(_EVENTS) & _POLLIN)


class Outlet:
    """Where a node's messages go (``pipeline.nodes.driver``'s outlet, given to the
    node when it is made): ``down``/``up`` to the sockets of those ports,
    ``link`` to the coordinator. The sockets come once the run starts
    (``attach``); a straggler's sends are held until its slowed work is done."""

    def __init__(self) -> None:
        self.link: ControlLink | None = None
        self.outs: dict[str, zmq.Socket] = {}
        self.held: list[tuple[str, Message]] | None = None

    def attach(self, link: ControlLink, outs: dict[str, zmq.Socket]) -> None:
        self.link, self.outs = link, outs

    def __call__(self, port: str, msg: Message) -> None:
        if self.held is not None:
            self.held.append((port, msg))
        elif port == "link":
            self.link.forward(msg)
        else:
            transport.send(self.outs[port], msg, self.link)


class Pump:
    def __init__(self, link: ControlLink, node, acts: Inbox, outlet: Outlet,
                 grads: Inbox | None = None, act_line: DelayLine | None = None,
                 grad_line: DelayLine | None = None, slowdown: float = 1.0,
                 hwm: int = 1000, inputs: Inbox | None = None):
        self.link, self.node, self.outlet = link, node, outlet
        self.acts, self.grads, self.inputs = acts, grads, inputs
        self.act_line, self.grad_line = act_line, grad_line
        self.slowdown, self.hwm = slowdown, hwm
        self.spent: dict[str, list] = {}  # kind: [count, cpu s, cpu s^2, wall s, wall s^2]

    def _call(self, handle: Handler, msg: Message) -> None:
        self.link.progress += 1
        t0, c0 = time.perf_counter(), time.thread_time()
        if self.slowdown == 1.0:
            handle(msg, t0)
            self._timed(msg.kind, t0, c0)
            return
        self.outlet.held = []
        try:
            handle(msg, t0)
            straggle(t0, self.slowdown)
        finally:
            held, self.outlet.held = self.outlet.held, None
        self._timed(msg.kind, t0, c0)
        for port, out in held:
            self.outlet(port, out)

    def _timed(self, kind: str, t0: float, c0: float) -> None:
        """Count the handling that began at ``t0`` (wall) and ``c0`` (the
        thread's CPU time): CPU time is the work itself, without the waits for
        a core or a straggler's idling; wall time has them."""
        wall, cpu = time.perf_counter() - t0, time.thread_time() - c0
        s = self.spent.get(kind)
        if s is None:
            s = self.spent[kind] = [0, 0.0, 0.0, 0.0, 0.0]
        s[0] += 1
        s[1] += cpu
        s[2] += cpu * cpu
        s[3] += wall
        s[4] += wall * wall

    def handling(self) -> dict[str, dict]:
        """By message kind: how many were handled, and the mean and standard
        deviation of their CPU and wall milliseconds (what a virtual-time run
        takes from this one: ``--timing-from``)."""
        out = {}
        for kind, (n, c, cc, w, ww) in self.spent.items():
            out[kind] = {"count": n, "cpu_ms": 1000 * c / n, "wall_ms": 1000 * w / n,
                         "cpu_sd_ms": 1000 * max(0.0, cc / n - (c / n) ** 2) ** 0.5,
                         "wall_sd_ms": 1000 * max(0.0, ww / n - (w / n) ** 2) ** 0.5}
        return out

    @staticmethod
    def _burst(inbox: Inbox, take: Callable[[Message], None], may: Callable[[], bool],
               limit: int, grads_waiting: Callable[[], bool]) -> bool:
        """Take up to ``limit`` messages waiting in ``inbox``, each handed to
        ``take``, while ``may()`` allows and no gradient is waiting
        (gradients go first, as they would after a poll): one poll for a
        burst, not each. Returns whether it read the end of the stream."""
        for _ in range(limit):
            msg = inbox.recv()
            if msg is not None:
                take(msg)
                if msg.kind == EOF:
                    return True
            if grads_waiting() or not waiting(inbox.sock) or not may():
                break
        return False

    def run(self) -> None:
        """Until the node is finished (the stream has ended and no due
        gradient is still to come)."""
        node, link = self.node, self.link
        act_sock, act_line, grad_line = self.acts.sock, self.act_line, self.grad_line
        poller = zmq.Poller()
        poller.register(link.sock, zmq.POLLIN)
        if self.grads is not None:
            poller.register(self.grads.sock, zmq.POLLIN)
        eof_read = reading = reading_inputs = False
        in_sock = self.inputs.sock if self.inputs is not None else None
        lines = [line for line in (grad_line, act_line) if line is not None]
        grads_waiting = ((lambda: waiting(self.grads.sock))
                         if self.grads is not None else (lambda: False))
        # Without a delay line a burst of activations to the node; with one, a
        # message onto the line.
        take_act, act_burst = (((lambda m: self._call(node.on_activation, m)), DRAIN)
                               if act_line is None else
                               ((lambda m: act_line.push(m, time.monotonic())), 1))
        take_in = lambda m: self._call(node.on_input, m)  # noqa: E731
        while not node.finished:
            # Backpressure: leave activations queued in ZeroMQ while the node
            # may not take them (with a delayed link, while its line is full).
            take = not eof_read and (node.may_take() if act_line is None
                                     else len(act_line) < self.hwm)
            if take != reading:
                (poller.register(act_sock, zmq.POLLIN) if take
                 else poller.unregister(act_sock))
                reading = take
            take_input = in_sock is not None and node.may_take_input()
            if take_input != reading_inputs:
                (poller.register(in_sock, zmq.POLLIN) if take_input
                 else poller.unregister(in_sock))
                reading_inputs = take_input
            timeout = POLL_MS
            if lines:
                now = time.monotonic()
                waits = [w for w in (line.wait_s(now) for line in lines) if w is not None]
                timeout = min([POLL_MS] + [int(w * 1000) + 1 for w in waits])
            events = dict(poller.poll(timeout))
            if link.sock in events:
                link.poll_stop()
            link.tick()
            if self.grads is not None and self.grads.sock in events:
                while waiting(self.grads.sock):
                    msg = self.grads.recv()
                    if msg is None:
                        continue
                    if grad_line is not None:
                        grad_line.push(msg, time.monotonic())
                    else:
                        self._call(node.on_gradient, msg)
            if grad_line is not None:
                for msg in grad_line.pop_ready(time.monotonic()):
                    self._call(node.on_gradient, msg)
            if take_input and in_sock in events:
                # The source's inputs (the synthetic steps), while the rule allows.
                self._burst(self.inputs, take_in, node.may_take_input, DRAIN, grads_waiting)
                if act_line is None:  # the synthetic steps may have changed the rule
                    take = take and node.may_take()
            if take and act_sock in events:
                eof_read = self._burst(self.acts, take_act, node.may_take, act_burst,
                                       grads_waiting)
            if act_line is not None:
                while act_line.wait_s(time.monotonic()) == 0 and node.may_take():
                    self._call(node.on_activation, act_line.pop())


def input_inbox(link: ControlLink, cfg, net: Net, node, index: int,
                endpoints: dict[str, str]) -> Inbox | None:
    """``--unlock forward``: the inbox of the source's inputs, for a layer
    above the first (its port offset after the others'); None otherwise."""
    if node.check_input is None:
        return None
    names = protocol.data_inboxes(index, cfg.layers, True)
    max_bytes = max_message_bytes(cfg)
    sock, endpoints["input"] = net.inbox(names.index("input"), cfg.input_hwm, max_bytes,
                                         protocol.SOURCE)
    return Inbox(sock, link.run_id, max_bytes, node.check_input, link.dropped)

