"""Tests for pipeline.net.control: a worker's link against a coordinator's ROUTER
socket made here; the handshake, what goes out (events with memory, the
final report, an error, heartbeats) and how stop, silence and a wrong reply
end a worker. No sleeps: the clock of the link is moved by hand."""
from __future__ import annotations

import threading
import time
import weakref

import numpy as np
import pytest
import zmq

from pipeline.wire import codec as wire, protocol
from pipeline.net.control import ControlLink
from pipeline.wire.protocol import HEARTBEAT_S, LIVENESS_S
from pipeline.wire.protocol import Speaker
from pipeline.net.transport import Net, Stopped

pytestmark = pytest.mark.timeout(30)
BOSS = Speaker("run9", "supervisor")


@pytest.fixture
def wired():
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = ControlLink(Net(ctx), f"tcp://127.0.0.1:{port}", "layer1")
    try:
        yield link, router
    finally:
        link.sock.close()
        router.close()
        ctx.term()


@pytest.fixture
def joined(wired):
    """A link past its hello: the ROUTER knows its identity (before that,
    what the coordinator sends it is dropped), and it speaks for run9."""
    link, router = wired
    link.send(link.say.hello())
    heard(router)
    link.joined_run("run9")
    return link, router


CONNECTION: "weakref.WeakKeyDictionary[zmq.Socket, bytes]" = weakref.WeakKeyDictionary()
# router -> the link's connection, as the ROUTER names it


def heard(router: zmq.Socket) -> protocol.Message:
    assert router.poll(5000), "nothing reached the coordinator"
    ident, *frames = router.recv_multipart()
    # The ROUTER names the connection (libzmq's names start with a zero
    # byte, which no client-chosen identity may): the link chooses nothing.
    assert ident[:1] == b"\x00" and CONNECTION.setdefault(router, ident) == ident
    return wire.decode(frames)


def tell(router: zmq.Socket, msg: protocol.Message) -> None:
    router.send_multipart([CONNECTION[router], *wire.encode(msg)])


def test_handshake_then_every_message_speaks_for_the_run(wired):
    link, router = wired
    link.send(link.say.hello())
    hello = heard(router)
    assert (hello.kind, hello.sender, hello.run_id) == ("hello", "layer1", "")
    tell(router, BOSS.config({"layers": 3}))
    config, run_id, resume = protocol.config(link.wait_for(protocol.CONFIG, timeout_s=5))
    assert (config, run_id, resume) == ({"layers": 3}, "run9", None)
    link.joined_run(run_id)
    link.send(link.say.ready({"act": "tcp://x:1"}))
    ready = heard(router)
    assert (ready.kind, ready.run_id, protocol.endpoints(ready)) == \
        ("ready", "run9", {"act": "tcp://x:1"})


def test_a_reply_of_another_kind_or_run_is_an_error(joined):
    link, router = joined
    tell(router, BOSS.start({}))
    with pytest.raises(RuntimeError, match="expected 'config'.*got 'start'"):
        link.wait_for(protocol.CONFIG, timeout_s=5)
    tell(router, Speaker("other", "supervisor").start({}))
    with pytest.raises(ValueError, match="foreign run id"):
        link.wait_for(protocol.START, timeout_s=5)


def test_stop_ends_the_worker_wherever_it_waits(joined):
    link, router = joined
    tell(router, BOSS.heartbeat())
    tell(router, BOSS.stop())
    assert router.poll(0) == 0
    deadline = time.monotonic() + 5
    with pytest.raises(Stopped):
        while time.monotonic() < deadline:
            if link.sock.poll(100):
                link.poll_stop()


def test_epoch_and_layer_events_carry_the_resident_memory(joined):
    link, router = joined
    link.forward(link.say.metric({"event": "layer", "epoch": 2}))
    event = protocol.event(heard(router))
    assert event["epoch"] == 2 and event["rss_mb"] > 1
    link.forward(link.say.metric({"event": "decode_error", "reason": "x"}))
    assert "rss_mb" not in protocol.event(heard(router))
    state = link.say.state(1, {"clock": 4}, {"w": np.ones(2)})
    link.forward(state)  # not a metric: passed on as it is
    got = heard(router)
    assert (got.kind, protocol.epoch(got), protocol.state(got)) == ("checkpoint", 1, {"clock": 4})


def test_finish_reports_and_then_waits_for_stop(joined):
    link, router = joined
    tell(router, BOSS.stop())
    with pytest.raises(Stopped):
        link.finish({"forward_batches": 7}, 2, {"w": np.arange(3.0)})
    done = heard(router)
    counters, errors, weights = protocol.done(done)
    assert (counters, errors) == ({"forward_batches": 7}, 2)
    np.testing.assert_array_equal(weights["w"], np.arange(3.0))
    assert done.meta["peak_rss_mb"] > 1 and done.meta["cpu_s"] >= 0


def test_a_stop_that_asks_for_the_weights_gets_them_as_they_are_once(joined):
    """The run's disk is full: each layer sends its weights as they are
    when the stop comes, before it stops; a plain stop gets nothing, and a
    layer that has sent its final report already sends no second one."""
    link, router = joined
    w = np.arange(4.0)
    link.at_stop = lambda: ({"forward_batches": 3}, 1, {"w": w})
    w += 10  # what counts is the array when the stop comes, not when at_stop was set
    tell(router, BOSS.stop(report=True))
    with pytest.raises(Stopped):
        link.recv(5000)
    done = heard(router)
    counters, errors, weights = protocol.done(done)
    assert (done.kind, counters, errors) == ("done", {"forward_batches": 3}, 1)
    np.testing.assert_array_equal(weights["w"], np.arange(4.0) + 10)
    tell(router, BOSS.stop())
    with pytest.raises(Stopped):
        link.recv(5000)
    assert router.poll(200) == 0
    tell(router, BOSS.stop(report=True))
    with pytest.raises(Stopped):
        link.finish({"forward_batches": 9}, 0, {"w": w})
    assert protocol.done(heard(router))[0] == {"forward_batches": 9}
    assert router.poll(200) == 0  # the final report was the one


def test_a_failure_is_reported_with_its_type_and_traceback(joined):
    link, router = joined
    try:
        raise ZeroDivisionError("in the layer math")
    except ZeroDivisionError as exc:
        link.report_error(exc)
    msg = heard(router)
    assert protocol.error_text(msg) == "ZeroDivisionError: in the layer math"
    assert "Traceback" in msg.meta["traceback"]


def test_heartbeat_when_due_and_an_error_when_the_coordinator_is_silent(joined):
    link, router = joined
    link.progress = 17
    link.last_beat = time.monotonic() - HEARTBEAT_S - 0.1
    link.tick()
    beat = heard(router)
    assert beat.kind == "heartbeat" and beat.step == 17  # the watchdog's count
    link.tick()   # not due again yet
    assert not router.poll(50)
    link.last_heard = time.monotonic() - LIVENESS_S - 0.1
    with pytest.raises(RuntimeError, match="silent"):
        link.tick()


def _term_within(ctx: zmq.Context, seconds: float) -> bool:
    """ctx.term() blocks in C, where pytest-timeout's signal cannot reach it:
    run it aside and say whether it returned in time."""
    t = threading.Thread(target=ctx.term, daemon=True)
    t.start()
    t.join(seconds)
    return not t.is_alive()


@pytest.mark.parametrize("gone", ["silent", "parent"])
def test_an_error_report_to_a_coordinator_that_is_gone_does_not_hold_the_exit(gone, tmp_path):
    """The report lingers only for a coordinator that may still take it: for
    one that is gone it would hold zmq_ctx_term for the whole linger, as it
    did every worker whose supervisor died (kill -9 of the supervisor)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{tmp_path}/control")  # a TCP port could be taken once let go
    endpoint = router.getsockopt_string(zmq.LAST_ENDPOINT)
    router.close()  # the coordinator is gone: nothing listens there any more
    link = ControlLink(Net(ctx), endpoint, "layer1")
    if gone == "silent":
        link.last_heard = time.monotonic() - LIVENESS_S - 0.1
    else:
        link.parent = -1  # os.getppid() no longer names the process that started us
    link.report_error(RuntimeError("the coordinator has been silent"))
    link.sock.close()
    assert _term_within(ctx, 1.0), "closing the context waited on an undeliverable report"


def test_an_error_report_to_a_coordinator_that_is_there_gets_through(tmp_path):
    """A coordinator heard from recently gets the report even though the
    worker closes its socket right after queueing it (the report lingers)."""
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.linger = 0
    router.bind(f"ipc://{tmp_path}/control")
    link = ControlLink(Net(ctx), router.getsockopt_string(zmq.LAST_ENDPOINT), "layer1")
    link.report_error(RuntimeError("in the layer math"))
    link.sock.close()
    try:
        assert protocol.error_text(heard(router)) == "RuntimeError: in the layer math"
    finally:
        router.close()
        assert _term_within(ctx, 5.0)
