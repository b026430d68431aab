"""pipeline.coord.coordinator: what the coordinator does with each message and each
moment, as exact tables of the actions it returns (no socket, no clock)."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.wire import protocol
from pipeline.layers.state import layer_state
from pipeline.config import Config
from pipeline.wire.protocol import HEARTBEAT_S, LIVENESS_S
from pipeline.coord.coordinator import (METRIC_BURST, METRIC_BYTES, METRIC_PER_EPOCH, Commit,
                                        Coordinator, Record, SaveCheckpoint, Send, Warn,
                                        WorkerFailed)
from pipeline.layers.build import make_hidden, make_output
from pipeline.wire.protocol import Speaker

pytestmark = pytest.mark.timeout(30)

RUN, TOKEN = "run1", "s3cret"
ROLES = ["source", "layer1", "layer2", "output"]


def cfg(**kw) -> Config:
    return Config(**{"layers": 3, "hidden": (6, 5), "epochs": 4, **kw})


def conn(role: str) -> bytes:
    return role.encode()


def said(role: str) -> Speaker:
    return Speaker(RUN, role)


def joined(c: Config | None = None, **kw) -> Coordinator:
    """A coordinator every role has said hello and ready to (ports a, g, i)."""
    co = Coordinator(c or cfg(), RUN, token=TOKEN, **kw)
    for role in co.roles:
        co.receive(conn(role), Speaker("", role).hello(TOKEN), 10, 0.0)
        co.receive(conn(role), said(role).ready({"act": f"a-{role}", "grad": f"g-{role}",
                                                 "input": f"i-{role}"}), 10, 0.0)
    return co


def kinds(actions) -> list[tuple]:
    """Each action as a short tuple: (type, role or epoch, message kind or text)."""
    out = []
    for a in actions:
        if isinstance(a, Send):
            out.append(("send", a.role, a.msg.kind))
        elif isinstance(a, SaveCheckpoint):
            out.append(("save", a.epoch, a.role))
        elif isinstance(a, Commit):
            out.append(("commit", a.epoch))
        elif isinstance(a, Record):
            out.append(("record", a.event.get("event")))
        else:
            out.append((type(a).__name__.lower(), a.text))
    return out


# --- the handshake ----------------------------------------------------------------------------

def test_the_handshake_configures_each_proven_role_and_starts_them_with_their_peers():
    co = Coordinator(cfg(), RUN, token=TOKEN)
    assert kinds(co.receive(b"x", Speaker("", "layer1").hello("guess"), 10, 0.0)) == [
        ("say", "[supervisor] dropped a control message from unknown's connection: a hello "
                "as layer1 without this run's secret")]
    for role in ROLES:
        assert kinds(co.receive(conn(role), Speaker("", role).hello(TOKEN), 10, 0.0)) == \
            [("send", role, "config")]
        assert not co.all_ready
    for role in ROLES:
        co.receive(conn(role), said(role).ready({"act": f"a-{role}", "grad": f"g-{role}"}),
                   10, 0.0)
    assert co.all_ready and co.refused == {"unknown": 1}
    starts = co.start(1.0)
    assert [(a.role, protocol.peers(a.msg)) for a in starts] == [
        ("source", {"downstream": ["a-layer1", "layer1"]}),
        ("layer1", {"downstream": ["a-layer2", "layer2"]}),
        ("layer2", {"downstream": ["a-output", "output"], "upstream_grad": ["g-layer1", "layer1"]}),
        ("output", {"upstream_grad": ["g-layer2", "layer2"]})]


def test_unlocked_runs_wire_the_source_to_every_unlocked_layer():
    co = joined(cfg(unlock="forward"))
    source = next(a for a in co.start(0.0) if a.role == "source")
    assert protocol.peers(source.msg) == {"downstream": ["a-layer1", "layer1"],
                                          "input:layer2": ["i-layer2", "layer2"],
                                          "input:output": ["i-output", "output"]}


def test_a_resumed_role_gets_its_state_with_its_config():
    c = cfg(checkpoint_every=1)
    state = layer_state(make_hidden(c, 1))
    co = Coordinator(c, RUN, token=TOKEN, resume={"layer1": state})
    [send] = co.receive(b"l1", Speaker("", "layer1").hello(TOKEN), 10, 0.0)
    config, run_id, resume = protocol.config(send.msg)
    assert run_id == RUN and Config.from_dict(config) == c
    assert resume[0] == state[0] and sorted(resume[1]) == sorted(state[1])


def test_a_role_missing_from_the_handshake_is_named_once_the_deadline_passes():
    co = Coordinator(cfg(), RUN, token=TOKEN)
    co.receive(b"s", Speaker("", "source").hello(TOKEN), 10, 0.0)
    co.waiting_for(deadline=5.0, now=5.0)  # not yet
    with pytest.raises(WorkerFailed, match="no 'hello' from layer1 on localhost in time"):
        co.waiting_for(deadline=5.0, now=5.1)


def test_hosts_are_announced_when_asked_and_a_rejoin_takes_its_ready_back():
    co = Coordinator(cfg(), RUN, hosts={"layer1": "10.0.0.2"}, announce=True)
    assert kinds(co.receive(b"a", Speaker("", "layer1").hello(), 10, 0.0))[0] == (
        "say", "[coordinator] layer1 joined from 10.0.0.2 (1/4 roles)")
    co.receive(b"a", said("layer1").ready({}), 10, 0.0)
    assert "layer1" in co.ready
    assert kinds(co.receive(b"b", Speaker("", "layer1").hello(), 10, 0.0))[0] == (
        "say", "[coordinator] layer1 rejoined from 10.0.0.2 (1/4 roles)")
    assert "layer1" not in co.ready and co.members.role(b"b") == "layer1"


def test_a_hello_after_the_start_fails_the_run():
    co = joined()
    co.start(0.0)
    with pytest.raises(WorkerFailed, match="layer2 on localhost restarted mid-run"):
        co.receive(conn("layer2"), Speaker("", "layer2").hello(TOKEN), 10, 1.0)


# --- what is dropped, and what ends the run ---------------------------------------------------

@pytest.mark.parametrize("who, msg, why", [
    (b"nobody", said("layer1").heartbeat(), "unknown's connection: a heartbeat from a "
                                            "connection that has not said hello"),
    (conn("layer1"), Speaker("other", "layer1").heartbeat(), "foreign run id 'other'"),
    (conn("layer1"), said("output").heartbeat(), "signed 'output' on layer1's connection"),
])
def test_messages_that_may_not_be_taken_are_counted_and_the_first_three_said(who, msg, why):
    co = joined()
    out = [co.receive(who, msg, 10, 1.0) for _ in range(5)]
    assert [len(a) for a in out] == [1, 1, 1, 0, 0]
    assert why in out[0][0].text and sum(co.refused.values()) == 5


def test_a_worker_error_fails_the_run_naming_its_role_and_text():
    co = joined()
    with pytest.raises(WorkerFailed) as err:
        co.receive(conn("layer2"), said("layer2").error("ValueError: bad", "tb"), 10, 1.0)
    assert err.value.role == "layer2" and "ValueError: bad" in err.value.message


def test_metric_events_are_recorded_within_their_budget():
    co = joined()
    big = co.receive(conn("layer1"), said("layer1").metric({"event": "layer"}),
                     METRIC_BYTES + 1, 1.0)
    assert "a metric event of 65537 bytes" in big[0].text
    allowed = METRIC_BURST + METRIC_PER_EPOCH  # before any epoch has ended
    got = [kinds(co.receive(conn("layer1"), said("layer1").metric({"event": "x"}), 100, 1.0))
           for _ in range(allowed + 1)]  # (the oversized one is not counted)
    assert got[:-1] == [[("record", "x")]] * allowed
    assert "more metric events than 272 by epoch 0" in got[-1][0][1]
    epoch = co.receive(conn("output"), said("output").metric(
        {"event": "epoch", "epoch": 2, "loss": 1.0, "accuracy": 0.5, "elapsed_s": 1.0}), 100, 1.0)
    assert kinds(epoch) == [("record", "epoch")] and co.epochs_done == 2
    assert kinds(co.receive(conn("layer1"), said("layer1").metric({"event": "x"}), 100, 1.0)) \
        == [("record", "x")]  # two epochs more of budget


def test_the_final_event_is_kept_and_a_collapse_warned():
    co = joined(cfg(grad_delay=4))
    co.receive(conn("output"), said("output").metric({"event": "final", "final_loss": 0.5}),
               100, 1.0)
    assert co.final == {"event": "final", "final_loss": 0.5}
    collapse = {"event": "layer", "role": "layer1", "epoch": 1, "gradients": 400,
                "sg_cosine": 0.05, "sg_rel_err": 9.0, "staleness_steps_mean": 4.0}
    out = co.receive(conn("layer1"), said("layer1").metric(collapse), 100, 1.0)
    assert [type(a) for a in out] == [Record, Warn] and "layer1" in out[1].text


def test_done_reports_are_checked_and_taken_once():
    co = joined()
    good = make_hidden(co.cfg, 1).weights()
    bad = {**good, "w": np.zeros((2, 2))}
    out = co.receive(conn("layer1"), said("layer1").done({}, 0, 1.0, 1.0, bad), 10, 1.0)
    assert "layer1.w is float64[2, 2]" in out[0].text and not co.done
    assert co.receive(conn("layer1"), said("layer1").done({}, 0, 1.0, 1.0, good), 10, 1.0) == []
    assert "a second done" in co.receive(
        conn("layer1"), said("layer1").done({}, 0, 1.0, 1.0, good), 10, 1.0)[0].text
    co.receive(conn("source"), said("source").done({"forward_batches": 1}, 0, 1.0, 1.0, {}),
               10, 1.0)
    assert sorted(co.done) == ["layer1", "source"] and not co.finished


# --- checkpoints -------------------------------------------------------------------------------

def state_of(c: Config, role: str, epoch: int):
    layer = make_output(c) if role == "output" else make_hidden(c, int(role[-1]))
    return said(role).state(epoch, *layer_state(layer))


def test_a_checkpoint_is_saved_role_by_role_and_committed_when_every_layer_has_saved():
    c = cfg(checkpoint_every=1)
    co = joined(c)
    table = [
        ("layer1", 0, [("save", 0, "layer1")]),
        ("layer1", 0, [("say", "[supervisor] dropped a checkpoint from layer1: no checkpoint "
                               "of epoch 0 is due from layer1")]),
        ("output", 0, [("save", 0, "output")]),
        ("layer2", 0, [("save", 0, "layer2"), ("commit", 0), ("record", "checkpoint")]),
        ("layer2", 0, [("say", "[supervisor] dropped a checkpoint from layer2: no checkpoint "
                               "of epoch 0 is due from layer2")]),   # committed already
        ("layer1", 3, [("say", "[supervisor] dropped a checkpoint from layer1: no checkpoint "
                               "of epoch 3 is due from layer1")]),   # the last epoch: none
        ("layer1", 1, [("save", 1, "layer1")]),
    ]
    records = []
    for role, epoch, want in table:
        out = co.receive(conn(role), state_of(c, role, epoch), 10, 1.0)
        assert kinds(out) == want
        records += [a.event for a in out if isinstance(a, Record)]
    assert co.committed == 0
    # metrics.jsonl counts as the user does: the barrier of epoch 0 is epoch 1
    assert records == [{"event": "checkpoint", "epoch": 1}]
    assert "no checkpoint of epoch 0 is due from source" in co.receive(
        conn("source"), said("source").state(0, {}, {}), 10, 1.0)[0].text


def test_a_checkpoint_that_does_not_fit_the_run_is_dropped():
    c = cfg(checkpoint_every=1)
    co = joined(c)
    msg = said("layer1").state(0, *layer_state(make_hidden(cfg(checkpoint_every=1,
                                                                hidden=(7, 5)), 1)))
    out = co.receive(conn("layer1"), msg, 10, 1.0)
    assert "checkpoint from layer1: layer1 has arrays" in out[0].text or \
        "layer1.w is" in out[0].text
    assert co.checkpoints == {}


# --- liveness ----------------------------------------------------------------------------------

def test_heartbeats_go_out_every_interval_to_every_role_that_said_hello():
    co = joined()  # every role last heard at 0
    assert kinds(co.tick(1.0)) == [("send", r, "heartbeat") for r in ROLES]
    assert co.tick(1.0 + HEARTBEAT_S / 2) == []
    assert len(co.tick(1.0 + HEARTBEAT_S)) == 4


def test_the_role_silent_longest_is_taken_for_dead():
    co = joined()  # every role last heard at 0
    for t, role in ((1.0, "output"), (2.0, "layer1"), (3.0, "layer2")):
        co.receive(conn(role), said(role).heartbeat(), 10, t)
    co.tick(LIVENESS_S)  # not yet
    with pytest.raises(WorkerFailed) as err:
        co.tick(LIVENESS_S + 0.1)
    assert err.value.role == "source"
    assert err.value.message == f"no word from source on localhost for {LIVENESS_S:.0f} s: " \
                                "taken for dead"


def test_a_silent_role_that_said_it_was_stopped_is_named_so():
    co = joined()
    co.receive(conn("source"), said("source").stopped("signal 15"), 10, 0.0)
    for role in ROLES[1:]:
        co.receive(conn(role), said(role).heartbeat(), 10, 1.0)
    with pytest.raises(WorkerFailed, match=r"source on localhost was stopped from outside "
                                           r"the run \(signal 15\)"):
        co.tick(LIVENESS_S + 0.1)


def test_the_watchdog_names_the_role_that_stopped_first():
    co = joined(cfg(watchdog=3.0))
    co.start(0.0)
    for t in (1.0, 2.0, 3.0):
        for role in ROLES:
            step = 7 if role == "layer2" else int(t * 10)  # layer2 stopped at t=1
            co.receive(conn(role), said(role).heartbeat(step), 10, t)
    co.tick(3.0)
    for role in ROLES:  # the others stop too, for want of layer2's messages
        co.receive(conn(role), said(role).heartbeat(30 if role != "layer2" else 7), 10, 5.0)
    co.tick(6.0)
    with pytest.raises(WorkerFailed, match="layer2 on localhost stopped first, after 7 "
                                           "messages"):
        co.tick(6.1)


def test_a_process_that_exits_before_it_is_done_fails_the_run():
    co = joined()
    co.receive(conn("source"), said("source").done({}, 0, 1.0, 1.0, {}), 10, 1.0)
    co.exited("source", 0)  # done: its exit is its end
    co.receive(conn("layer1"), said("layer1").stopped("signal 15"), 10, 1.0)
    with pytest.raises(WorkerFailed, match=r"process exited with code -15 \(stopped from "
                                           r"outside the run: signal 15\)"):
        co.exited("layer1", -15)


def test_stop_goes_to_every_role_that_said_hello():
    co = Coordinator(cfg(), RUN, token=TOKEN)
    co.receive(b"o", Speaker("", "output").hello(TOKEN), 10, 0.0)
    assert kinds(co.stop()) == [("send", "output", "stop")]


# --- under an engine: closed connections --------------------------------------------------------

def test_a_rank_whose_connection_closed_silently_is_blamed_after_the_grace():
    co = joined(ranks={"layer2": 3})
    co.connection_closed("layer2", 10.0)
    co.connection_closed(None, 10.0)  # a connection of no role: nothing to blame
    assert co.lost(10.05) is None
    assert co.lost(10.2) == "layer2"
    assert co.rank_failure("layer2").message == \
        "layer2 (rank 3) on localhost is gone: its connection closed"
    assert co.after_signal().role == "layer2"


def test_after_the_engines_signal_ranks_that_said_they_were_stopped_mean_an_interrupt():
    co = joined()
    for role in ROLES:
        co.receive(conn(role), said(role).stopped("signal 15"), 10, 1.0)
        co.connection_closed(role, 1.0)
    assert co.after_signal() is None
