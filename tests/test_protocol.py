"""Tests for pipeline.wire.protocol: the roles and their order, every builder read
back by its reader (also through the wire), readers refusing missing and
mistyped fields, and the shape checks of a data inbox."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.wire import codec as wire, protocol
from pipeline.wire.checks import ActivationCheck, expect
from pipeline.wire.protocol import Message, Speaker

pytestmark = pytest.mark.timeout(10)
F64 = np.dtype(np.float64)
SAY = Speaker("run1", "layer1")


def test_roles_in_pipeline_order():
    assert protocol.roles(2) == ["source", "layer1", "output"]
    assert protocol.all_roles(4) == ["coordinator", "source", "layer1", "layer2", "layer3",
                                     "output"]
    assert [protocol.upstream(i, 4) for i in (1, 2, 4)] == ["source", "layer1", "layer3"]
    assert [protocol.downstream(i, 4) for i in (0, 1, 3)] == ["layer1", "layer2", "output"]
    assert protocol.layer_role(4, 4) == "output" and protocol.layer_role(2, 4) == "layer2"
    with pytest.raises(ValueError):
        protocol.roles(1)


def through_the_wire(msg: Message) -> Message:
    return wire.decode(wire.encode(msg))


def test_data_messages_read_back():
    x, y = np.ones((2, 4)), np.zeros((2, 3))
    a = through_the_wire(SAY.act(7, 3, x, y))
    assert (a.kind, a.batch, a.step, a.sender, a.run_id) == ("act", 7, 3, "layer1", "run1")
    lost = through_the_wire(SAY.lost(5, 1))
    assert protocol.is_lost(lost) and lost.arrays == ()
    assert not protocol.is_lost(through_the_wire(SAY.grad(5, 1, x)))
    assert protocol.test_epoch(through_the_wire(SAY.evaluation(0, 0, x, y, 4))) == 4
    assert protocol.test_epoch(through_the_wire(SAY.evaluation(0, 0, x, y, None))) is None
    assert protocol.epoch(through_the_wire(SAY.barrier(9, 2))) == 2
    assert through_the_wire(SAY.eof(10)).kind == "eof"


def test_control_messages_read_back():
    cfg = {"layers": 3}
    got = protocol.config(through_the_wire(Speaker("run1", "supervisor").config(cfg)))
    assert got == (cfg, "run1", None)
    weights = {"w": np.ones((2, 2)), "b": np.zeros(2)}
    cfg_back, run_id, (state, arrays) = protocol.config(
        through_the_wire(Speaker("run1", "supervisor").config(cfg, ({"clock": 3}, weights))))
    assert state == {"clock": 3} and sorted(arrays) == ["b", "w"]
    np.testing.assert_array_equal(arrays["w"], weights["w"])
    assert protocol.endpoints(through_the_wire(SAY.ready({"act": "tcp://a:1"}))) == \
        {"act": "tcp://a:1"}
    peers = {"downstream": ["tcp://b:2", "layer2"]}
    assert protocol.peers(through_the_wire(SAY.start(peers))) == peers
    assert protocol.event(through_the_wire(SAY.metric({"event": "epoch", "epoch": 1}))) == \
        {"event": "epoch", "epoch": 1}
    ck = through_the_wire(SAY.state(4, {"clock": 50}, weights))
    assert (protocol.epoch(ck), protocol.state(ck)) == (4, {"clock": 50})
    counters, errors, arrays = protocol.done(through_the_wire(SAY.done({"n": 1}, 2, 40.0, 1.5,
                                                                     weights)))
    assert (counters, errors, sorted(arrays)) == ({"n": 1}, 2, ["b", "w"])
    assert protocol.error_text(through_the_wire(SAY.error("boom", "tb"))) == "boom"
    assert protocol.error_text(Message("error", "run1", meta={"error": 3})) == "unknown error"


@pytest.mark.parametrize("reader, meta, says", [
    (protocol.epoch, {}, "'epoch'"),
    (protocol.epoch, {"epoch": "x"}, "'epoch'"),
    (protocol.epoch, {"epoch": -1}, "'epoch'"),
    (protocol.epoch, {"epoch": True}, "'epoch'"),
    (protocol.test_epoch, {"test": 1.5}, "'test'"),
    (protocol.state, {"state": [1]}, "'state'"),
    (protocol.peers, {"peers": {"downstream": ["only-one"]}}, "'peers'"),
    (protocol.endpoints, {"endpoints": {"act": 5}}, "'endpoints'"),
    (protocol.event, {"epoch": 1}, "'event'"),
    (protocol.done, {"counters": {}, "decode_errors": -1, "weights": []}, "'decode_errors'"),
    (protocol.named_arrays, {"weights": ["w", "b"]}, "'weights'"),
    (protocol.config, {"config": {}, "run_id": ""}, "'run_id'"),
])
def test_readers_refuse_missing_and_mistyped_fields(reader, meta, says):
    with pytest.raises(ValueError, match=says):
        reader(Message("checkpoint", "run1", sender="layer1", meta=meta))


@pytest.mark.parametrize("msg, reason", [
    (Message(protocol.GRAD, "r", arrays=(np.ones((2, 4)), np.ones((2, 3)))), "kind"),
    (Message(protocol.ACT, "r", arrays=(np.ones((2, 4)),)), "needs 2 arrays"),
    (Message(protocol.ACT, "r", arrays=(np.ones((2, 4), np.float32), np.ones((2, 3)))), "float32"),
    (Message(protocol.ACT, "r", arrays=(np.ones((2, 4)), np.ones((3, 3)))), "rows"),
    (Message(protocol.ACT, "r", arrays=(np.ones((0, 4)), np.ones((0, 3)))), "rows"),
    (Message(protocol.ACT, "r", arrays=(np.ones(4), np.ones(3))), "n, 4"),
])
def test_expect_rejects(msg, reason):
    with pytest.raises(ValueError, match=reason):
        expect(msg, (protocol.ACT, protocol.EOF), [(None, 4), (None, 3)], F64, max_rows=8)


def test_expect_accepts_eof_and_good_shapes():
    expect(Message(protocol.EOF, "r"), (protocol.ACT, protocol.EOF), [(None, 4)], F64, 8)
    expect(SAY.act(0, 0, np.ones((2, 4)), np.zeros((2, 3))), (protocol.ACT,), [(None, 4), (None, 3)], F64, 8)


IMAGES = [(None, 3, 3, 2), (None, 4)]


@pytest.mark.parametrize("arrays, reason", [
    ((np.ones((2, 18)), np.ones((2, 4))), r"is not float64\[n, 3, 3, 2\]"),      # flat rows
    ((np.ones((2, 3, 2, 3)), np.ones((2, 4))), r"\[n, 3, 3, 2\]"),                # transposed
    ((np.ones((2, 3, 3, 2, 1)), np.ones((2, 4))), r"\[n, 3, 3, 2\]"),             # 5-D
    ((np.ones((2, 3, 3, 2)), np.ones((3, 4))), "rows"),
    ((np.ones((9, 3, 3, 2)), np.ones((9, 4))), "rows"),                            # > max_rows
])
def test_image_batches_of_another_shape_are_refused(arrays, reason):
    msg = Message(protocol.ACT, "r", arrays=arrays)
    with pytest.raises(ValueError, match=reason):
        expect(msg, (protocol.ACT,), IMAGES, F64, max_rows=8)


def test_image_batches_pass_the_check_of_their_shape():
    expect(SAY.act(0, 0, np.ones((2, 3, 3, 2)), np.zeros((2, 4))), (protocol.ACT,), IMAGES, F64, 8)
    check = ActivationCheck("layer1", (3, 3, 2), 4, max_rows=8, turns=iter([("act", 0, None, 2)]))
    check(Message(protocol.ACT, "r", sender="layer1", batch=0,
                  arrays=(np.ones((2, 3, 3, 2)), np.zeros((2, 4)))))
    with pytest.raises(ValueError, match="n, 3, 3, 2"):
        check(Message(protocol.ACT, "r", sender="layer1", batch=0,
                      arrays=(np.ones((2, 18)), np.zeros((2, 4)))))


def test_activation_check_wants_the_upstream_role_and_the_stream_in_turn():
    # The turns of a tiny run resumed at batch 5: two training batches of 2
    # rows, a test batch of 1 row after epoch 2, a barrier, the final pass,
    # the end of the stream.
    turns = [("act", 5, None, 2), ("act", 6, None, 2), ("eval", 0, 2, 1),
             ("checkpoint", 6, 2, 0), ("eval", 0, None, 2), ("eof", 7, None, 0)]
    check = ActivationCheck("source", 4, 3, max_rows=8, turns=iter(turns))
    src = Speaker("run1", "source")
    x, y = np.ones((2, 4)), np.zeros((2, 3))
    check(src.act(5, 0, x, y))
    with pytest.raises(ValueError, match="out of turn: act of batch 7 .*expected act of batch 6"):
        check(src.act(7, 0, x, y))
    with pytest.raises(ValueError, match="out of turn: act of batch 5"):  # a second copy
        check(src.act(5, 0, x, y))
    with pytest.raises(ValueError, match="out of turn: eof"):           # an early end
        check(src.eof(6))
    with pytest.raises(ValueError, match="out of turn: eval"):          # an early test batch
        check(src.evaluation(0, 0, x[:1], y[:1], 2))
    with pytest.raises(ValueError, match="with 1 rows"):                # a short batch
        check(src.act(6, 0, x[:1], y[:1]))
    check(src.act(6, 0, x, y))
    with pytest.raises(ValueError, match="expected 'source'"):
        check(SAY.evaluation(0, 0, x[:1], y[:1], 2))
    with pytest.raises(ValueError, match="'test'"):
        check(Message("eval", "run1", sender="source", arrays=(x[:1], y[:1]), meta={"test": "x"}))
    with pytest.raises(ValueError, match=r"\(epoch 1\)"):               # the wrong epoch's test
        check(src.evaluation(0, 0, x[:1], y[:1], 1))
    check(src.evaluation(0, 0, x[:1], y[:1], 2))
    with pytest.raises(ValueError, match="'epoch'"):
        check(Message("checkpoint", "run1", 6, sender="source"))
    with pytest.raises(ValueError, match="epoch 999999"):
        check(src.barrier(6, 999999))
    check(src.barrier(6, 2))
    check(src.evaluation(0, 0, x, y, None))
    check(src.eof(7))
    for late in (src.eof(7), src.evaluation(0, 0, x, y, None), src.act(7, 0, x, y)):
        with pytest.raises(ValueError, match="after the end of the stream"):
            check(late)


def test_input_check_wants_the_source_and_the_training_batches_in_turn():
    # An unlocked layer's input inbox: the training batches of the stream,
    # from the source, and nothing else (no eval, barrier or end goes there).
    turns = [("input", 5, None, 2), ("input", 6, None, 1)]
    check = ActivationCheck("source", 4, 3, max_rows=8, turns=iter(turns),
                            kinds=(protocol.INPUT,))
    src = Speaker("run1", "source")
    x, y = np.ones((2, 4)), np.zeros((2, 3))
    with pytest.raises(ValueError, match="unexpected message kind 'act'"):
        check(src.act(5, 0, x, y))
    with pytest.raises(ValueError, match="expected 'source'"):
        check(SAY.input(5, x, y))
    with pytest.raises(ValueError, match="out of turn: input of batch 6"):
        check(src.input(6, x[:1], y[:1]))
    with pytest.raises(ValueError, match=r"float64\[n, 4\]"):
        check(src.input(5, np.ones((2, 5)), y))
    check(src.input(5, x, y))
    with pytest.raises(ValueError, match="unexpected message kind 'eof'"):
        check(src.eof(7))
    check(src.input(6, x[:1], y[:1]))
    with pytest.raises(ValueError, match="after the end of the stream"):
        check(src.input(7, x, y))


def test_input_message_reads_back_from_the_wire():
    x, y = np.arange(8.0).reshape(2, 4), np.eye(2, 3)
    msg = wire.decode(wire.encode(Speaker("r", "source").input(3, x, y)))
    assert (msg.kind, msg.batch, msg.sender) == (protocol.INPUT, 3, "source")
    np.testing.assert_array_equal(msg.arrays[0], x)
    np.testing.assert_array_equal(msg.arrays[1], y)
