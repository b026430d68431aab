"""Tests for pipeline.nodes.driver: each node driven by hand, message by message,
against exact tables of what it sends where, and its schedule rule (what it
may read next, when it is done) as a worker and the reference see it."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.data import tasks
from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.nodes.driver import HiddenNode, OutputNode, SourceNode
from pipeline.wire.protocol import Speaker

pytestmark = pytest.mark.timeout(30)

# A 3-layer net on the addition task: layer2 has a layer above and below.
BITS = 4


def cfg(**kw) -> Config:
    base = dict(layers=3, hidden=(6, 5), bits=BITS, examples=8, batch_size=2, epochs=2,
                lockstep=True)
    base.update(kw)
    return Config(**base)


class Wire:
    """Records what a node sends: (port, kind, batch) per message."""

    def __init__(self):
        self.sent: list[tuple[str, str, int]] = []
        self.msgs: list[tuple[str, protocol.Message]] = []

    def __call__(self, port: str, msg: protocol.Message) -> None:
        self.sent.append((port, msg.kind, msg.batch))
        self.msgs.append((port, msg))

    def take(self) -> list[tuple[str, str, int]]:
        out, self.sent = self.sent, []
        return out


SOURCE = Speaker("r", "source")
LAYER1 = Speaker("r", "layer1")
LAYER3 = Speaker("r", "layer3")
OUTPUT = Speaker("r", "output")


def act(c: Config, batch: int, index: int = 2, who: Speaker = LAYER1) -> protocol.Message:
    rng = np.random.default_rng(batch)
    x = rng.standard_normal((2, c.dims[index - 1]))
    y = (rng.uniform(size=(2, BITS)) > 0.5).astype(np.float64)
    return who.act(batch, 0, x, y)


def grad(c: Config, batch: int, index: int = 2, who: Speaker = LAYER3) -> protocol.Message:
    return who.grad(batch, 0, np.full((2, c.dims[index]), 0.01))


def node2(**kw) -> tuple[HiddenNode, Wire]:
    c = cfg(**kw)
    w = Wire()
    n = HiddenNode(c, 2, w, "r")
    n.down_role = "layer3"  # a 3-layer net's layer2 sends to the output; speak as layer3 here
    return n, w


# --- a hidden layer -----------------------------------------------------------------------

def test_dni_layer_sends_its_output_down_and_dx_up_at_once_then_waits_in_lockstep():
    n, w = node2(mode="cdni", layers=4, hidden=(6, 5, 4))
    c = n.cfg
    assert n.may_take()
    n.on_activation(act(c, 0), 1.0)
    assert w.take() == [("down", "act", 0), ("up", "grad", 0)]
    assert not n.may_take()          # lockstep: the gradient of batch 0 is due and not here
    n.on_gradient(grad(c, 0), 2.0)
    assert w.take() == []            # the SG module learned; nothing to send
    assert n.may_take()
    assert n.layer.stats.sg_updates == 1


def test_backprop_layer_waits_and_passes_the_gradient_up():
    n, w = node2(mode="backprop", layers=4, hidden=(6, 5, 4))
    c = n.cfg
    n.on_activation(act(c, 0), 1.0)
    assert w.take() == [("down", "act", 0)]
    assert not n.may_take()
    n.on_gradient(grad(c, 0), 2.0)
    assert w.take() == [("up", "grad", 0)]
    assert n.may_take()


def test_a_lost_gradient_is_passed_up_as_lost_in_the_backprop_modes():
    n, w = node2(mode="async-backprop", layers=4, hidden=(6, 5, 4))
    c = n.cfg
    n.on_activation(act(c, 0), 1.0)
    w.take()
    n.on_gradient(LAYER3.lost(0, 0), 2.0)
    [(port, msg)] = w.msgs[-1:]
    assert w.take() == [("up", "grad", 0)] and protocol.is_lost(msg) and msg.arrays == ()
    assert n.layer.stats.lost_gradients == 1 and not n.layer.pending


def test_free_running_reads_grad_delay_plus_max_inflight_batches_ahead():
    for delay, inflight in ((0, 1), (0, 3), (2, 2)):
        n, w = node2(mode="dni", lockstep=False, grad_delay=delay, max_inflight=inflight)
        taken = 0
        while n.may_take():
            n.on_activation(act(n.cfg, taken), float(taken))
            taken += 1
            assert taken <= 20
        assert taken == delay + inflight


@pytest.mark.parametrize("mode, delay", [("backprop", 0), ("dni", 0), ("dni", 1), ("cdni", 2),
                                         ("async-backprop", 0), ("async-backprop", 3)])
def test_lockstep_applies_every_gradient_exactly_delay_steps_late(mode, delay):
    """Take a batch whenever the node may; otherwise deliver the oldest
    gradient it awaits; until the stream ends and nothing due is left."""
    n, w = node2(mode=mode, grad_delay=delay)
    batches, t = 12, 0
    while not n.finished:
        if t < batches and n.may_take():
            n.on_activation(act(n.cfg, t), float(t))
            t += 1
        elif t == batches and n.may_take():
            n.on_activation(LAYER1.eof(t), float(t))
        else:
            oldest = min(b for b in n.layer.pending if b not in n.layer.arrived)
            n.on_gradient(grad(n.cfg, oldest), float(t))
    assert n.layer.stats.staleness_hist == {delay: batches - delay}
    assert len(n.layer.pending) == delay  # the last ``delay`` batches never fall due
    counters, weights = n.finish(99.0)
    assert counters["expired_gradients"] == delay and "w" in weights


def test_checkpoint_barrier_waits_for_due_gradients_then_saves_and_passes_on():
    n, w = node2(mode="cdni")
    c = n.cfg
    n.on_activation(act(c, 0), 1.0)
    w.take()
    n.on_activation(LAYER1.barrier(0, epoch=0), 1.5)
    assert w.take() == [] and not n.may_take()   # the gradient of batch 0 is due, not here
    n.on_gradient(grad(c, 0), 2.0)
    assert w.take() == [("link", "checkpoint", -1), ("down", "checkpoint", 0)]
    port, state = w.msgs[-2]
    assert protocol.epoch(state) == 0 and "w" in protocol.named_arrays(state)
    assert protocol.state(state)["clock"] == 1
    assert n.may_take()


def test_eval_passes_down_with_its_test_epoch_and_changes_nothing():
    n, w = node2(mode="dni")
    c = n.cfg
    before = n.layer.w.copy()
    x = np.ones((2, c.dims[1]))
    n.on_activation(LAYER1.evaluation(3, 0, x, np.zeros((2, BITS)), 1), 1.0)
    [(port, msg)] = w.msgs
    assert (port, msg.kind, msg.batch, protocol.test_epoch(msg)) == ("down", "eval", 3, 1)
    np.testing.assert_array_equal(msg.arrays[0], n.layer.forward_eval(x))
    np.testing.assert_array_equal(n.layer.w, before)
    assert n.layer.clock == 0


def test_end_of_stream_passes_down_and_the_node_finishes_when_nothing_is_due():
    n, w = node2(mode="cdni")
    c = n.cfg
    n.on_activation(act(c, 0), 1.0)
    n.on_gradient(grad(c, 0), 1.5)
    w.take()
    n.on_activation(LAYER1.eof(1), 2.0)
    assert w.take() == [("down", "eof", 1)]
    assert n.finished and not n.may_take()


def test_layer_events_go_to_the_link_as_epochs_close():
    n, w = node2(mode="cdni", examples=4, batch_size=2)   # 2 batches an epoch
    c = n.cfg
    for t in range(3):
        n.on_activation(act(c, t), float(t))
        n.on_gradient(grad(c, t), float(t) + 0.5)
    links = [m for p, m in w.msgs if p == "link"]
    assert [protocol.event(m)["epoch"] for m in links] == [1]   # epoch 2 still open
    n.finish(9.0)
    links = [m for p, m in w.msgs if p == "link"]
    assert [(e["event"], e["epoch"], e["gradients"]) for e in map(protocol.event, links)] == \
        [("layer", 1, 2), ("layer", 2, 1)]


def test_gradient_checks_refuse_what_is_not_awaited():
    n, w = node2(mode="cdni")
    c = n.cfg
    n.on_activation(act(c, 0), 1.0)
    n.check_gradient(grad(c, 0))                     # the awaited one passes
    with pytest.raises(ValueError, match="expected 'layer3'"):
        n.check_gradient(grad(c, 0, who=OUTPUT))
    with pytest.raises(ValueError, match="not awaited"):
        n.check_gradient(grad(c, 1))
    with pytest.raises(ValueError, match="rows"):
        n.check_gradient(LAYER3.grad(0, 0, np.zeros((1, c.dims[2]))))
    with pytest.raises(ValueError, match="kind"):
        n.check_gradient(act(c, 0, who=LAYER3))
    with pytest.raises(ValueError, match="epoch"):
        n.check_activation(protocol.Message("checkpoint", "r", 0, "layer1"))


# --- the output layer ---------------------------------------------------------------------

def out_node(**kw) -> tuple[OutputNode, Wire]:
    w = Wire()
    return OutputNode(cfg(**kw), w, "r"), w


def test_output_sends_the_true_gradient_up_and_reports_each_epoch():
    n, w = out_node(examples=4, batch_size=2)
    c = n.cfg
    for t in range(4):
        n.on_activation(act(c, t, index=3, who=Speaker("r", "layer2")), float(t))
    assert [s for s in w.take() if s[0] == "up"] == [("up", "grad", t) for t in range(4)]
    events = [protocol.event(m) for p, m in w.msgs if p == "link"]
    assert [(e["event"], e["epoch"], e["batches"]) for e in events] == \
        [("epoch", 1, 2), ("epoch", 2, 2)]


def test_output_holds_an_epoch_until_its_test_split_and_reports_the_final_pass_at_eof():
    c = cfg(examples=4, batch_size=2)
    c = Config(**{**c.to_dict(), "dataset": "npz:x", "features": c.dims[0], "classes": 3,
                  "test_examples": 3, "hidden": [6, 5]})
    w = Wire()
    n = OutputNode(c, w, "r")
    up = Speaker("r", "layer2")
    y = np.eye(3)[[0, 1]]
    for t in range(2):
        n.on_activation(up.act(t, 0, np.ones((2, 5)) * t, y), float(t))
    assert [p for p, _ in w.msgs] == ["up", "up"]     # epoch 1 held for its test split
    n.on_activation(up.evaluation(0, 0, np.ones((2, 5)), y, 0), 2.0)
    assert [p for p, _ in w.msgs] == ["up", "up"]     # 2 of 3 test examples
    n.on_activation(up.evaluation(1, 0, np.ones((1, 5)), np.eye(3)[[2]], 0), 2.5)
    event = protocol.event(w.msgs[-1][1])
    assert (event["event"], event["epoch"]) == ("epoch", 1)
    assert event["test_accuracy"] in (0.0, 1 / 3, 2 / 3, 1.0)
    n.on_activation(up.evaluation(0, 0, np.ones((2, 5)), y, None), 3.0)
    n.on_activation(up.eof(2), 3.5)
    final = protocol.event(w.msgs[-1][1])
    assert final["event"] == "final" and final["batches"] == 2
    assert final["test_accuracy"] == event["test_accuracy"] and n.finished


# --- the source ---------------------------------------------------------------------------

def test_source_sends_the_epochs_barriers_final_pass_and_end_in_order():
    c = cfg(examples=5, batch_size=2, epochs=3, checkpoint_every=1)
    msgs = list(SourceNode(c, tasks.load(c), "r").messages())
    table = [(m.kind, m.batch, m.meta.get("test"), m.meta.get("epoch")) for m in msgs]
    acts = lambda first: [("act", t, None, None) for t in range(first, first + 3)]
    assert table == [*acts(0), ("checkpoint", 2, None, 0), *acts(3), ("checkpoint", 5, None, 1),
                     *acts(6), ("eval", 0, None, None), ("eval", 1, None, None),
                     ("eval", 2, None, None), ("eof", 9, None, None)]
    assert [m.arrays[0].shape[0] for m in msgs if m.kind == "act"][:3] == [2, 2, 1]
    assert all(m.arrays[0].flags.c_contiguous for m in msgs if m.arrays)


def test_a_resumed_source_starts_at_its_epoch():
    c = cfg(examples=4, batch_size=2, epochs=3, start_epoch=2)
    assert [(m.kind, m.batch) for m in SourceNode(c, tasks.load(c), "r").messages()] == \
        [("act", 4), ("act", 5), ("eval", 0), ("eval", 1), ("eof", 6)]


@pytest.mark.parametrize("kw", [dict(examples=5, batch_size=2, epochs=3, checkpoint_every=1),
                                dict(examples=8, batch_size=4, epochs=4, start_epoch=1,
                                     checkpoint_every=2, shuffle=True)])
def test_every_layer_takes_exactly_what_the_source_sends(kw):
    # The source and the layers' inbox check each spell out the stream; they
    # must agree message for message, and a second copy of any is refused.
    c = cfg(**kw)
    node = HiddenNode(c, 1, Wire(), "r")
    for msg in SourceNode(c, tasks.load(c), "r").messages():
        node.check_activation(msg)
        with pytest.raises(ValueError, match="out of turn|after the end"):
            node.check_activation(msg)
