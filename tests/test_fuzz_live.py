"""Hypothesis-made garbage on every socket of a live run: each message is
counted and dropped, the workers run on, and the weights stay the
reference's bit for bit."""
from __future__ import annotations

import itertools

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from pipeline.config import Config
from tests.test_pipeline import assert_bit_identical, reference_weights
from tests.test_wire import ALL_KINDS, WIRE_DTYPES, _msgpack_values

pytestmark = pytest.mark.slow  # every test here starts processes


_RUNS = itertools.count()
RUN = "<this run>"  # stands for the run id, which exists only once the run starts


def _headers(run_id: str) -> st.SearchStrategy:
    """Near-valid headers, half of them with this run's id, so the garbage
    gets past the first checks into the ones that guard the math. Senders
    are at most 4 characters: never a real role, so nothing may pass."""
    return st.fixed_dictionaries({
        "v": st.sampled_from([1, 1, 1, 2]), "k": st.sampled_from(ALL_KINDS + ["x"]),
        "r": st.sampled_from([run_id, run_id, "other"]), "b": st.integers(-2, 40),
        "s": st.text(max_size=4), "t": st.integers(0, 3),
        "a": st.lists(st.tuples(st.sampled_from(WIRE_DTYPES),
                                st.lists(st.integers(0, 12), min_size=1, max_size=3)
                                ).map(list), max_size=2),
        "m": st.dictionaries(st.text(max_size=3), _msgpack_values, max_size=2)})


SOCKETS = [("layer1", "act"), ("layer1", "grad"), ("layer2", "act"), ("layer2", "grad"),
           ("output", "act")]


def _send_while_running(run, messages) -> tuple[int, dict[str, int]]:
    """Send each (role, endpoint, socket kind, frames) to the live ``run``,
    then wait for it to end: (its exit code, messages sent per role). The
    senders stay connected until the run is over: one that disconnects while
    its last messages wait behind a full inbox may lose them in ZeroMQ (seen
    over Unix sockets), and they would go uncounted."""
    ctx = zmq.Context()
    sent: dict[str, int] = {}
    socks: dict[str, zmq.Socket] = {}
    try:
        for role, endpoint, kind, frames in messages:
            if endpoint not in socks:
                socks[endpoint] = ctx.socket(kind)
                socks[endpoint].connect(endpoint)
            socks[endpoint].send_multipart(frames)
            sent[role] = sent.get(role, 0) + 1
        code = run.finish()
    finally:
        for s in socks.values():
            s.close(linger=0)
        ctx.term()
    return code, sent


def _assert_counted_and_unchanged(run, code: int, sent: dict[str, int]) -> dict:
    """The run completed, each layer counted exactly what it was sent, and
    its weights are the reference's bit for bit; returns the summary."""
    assert code == 0, run.err
    summary = run.summary()
    errors = {L["role"]: L["decode_errors"] for L in summary["layers"]}
    assert errors == {r: sent.get(r, 0) for r in ("layer1", "layer2", "output")}
    assert_bit_identical(run, reference_weights(Config(lockstep=True, epochs=300, seed=8)))
    return summary


# One example, one live run: no replay or shrinking, which would reuse the
# run directory of the test's fixture.
@pytest.mark.timeout(120)
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(garbage=st.lists(st.tuples(st.sampled_from(SOCKETS),
                                  st.tuples(_headers(RUN), st.lists(st.binary(max_size=96),
                                                                    max_size=3))),
                        min_size=60, max_size=60))
def test_fuzz_on_live_sockets_changes_nothing(launch, garbage):
    # The garbage is drawn before the run starts, so it all arrives while the
    # workers are still reading; the run id is filled in once it is known.
    # A directory of its own: when an example fails, hypothesis runs it again
    # to report it, and that run must not trip over the first one's.
    run = launch("--lockstep", "--quiet", "--epochs", "300", "--seed", "8",
                 name=f"run-{next(_RUNS)}")
    config = run.wait_started()

    def frames():
        for (role, inbox), (header, bodies) in garbage:
            if header["r"] == RUN:
                header = {**header, "r": config["run_id"]}
            yield (role, config["processes"][role]["endpoints"][inbox], zmq.PUSH,
                   [msgpack.packb(header, use_bin_type=True), *bodies])
    _assert_counted_and_unchanged(run, *_send_while_running(run, frames()))


# -- well-formed messages from real role names, every kind, every meta field --

# Every meta field any kind carries (protocol.py), each drawn with a value of
# its right type or of any other, so the readers' checks are all exercised.
FIELDS = ["test", "epoch", "lost", "weights", "state", "config", "run_id", "endpoints",
          "peers", "event", "error", "traceback", "counters", "decode_errors",
          "peak_rss_mb", "cpu_s", "token"]
_RIGHT = st.one_of(st.integers(0, 5), st.booleans(), st.just(["w", "b"]), st.just({}),
                   st.just({"act": "tcp://127.0.0.1:9"}), st.just({"downstream": ["x", "y"]}),
                   st.just("epoch"), st.just({"forward_batches": 1}))
# Batch ids no turn of this run has (it has fewer than a million batches) and
# none a layer awaits a gradient for: a message may be well-formed, signed by
# the right role and shaped right, yet it is never in turn.
_OUT_OF_TURN = st.one_of(st.integers(10**6, 10**7), st.integers(-3, -1))
TARGETS = SOCKETS + [("supervisor", "control")]
# The default run's widths (dims 16, 128, 64, 8): what each socket takes.
WIDTHS = {("layer1", "act"): (16, 8), ("layer1", "grad"): (128,), ("layer2", "act"): (128, 8),
          ("layer2", "grad"): (64,), ("output", "act"): (64, 8), ("supervisor", "control"): (3,)}


@st.composite
def _message(draw) -> tuple[tuple[str, str], dict]:
    target = draw(st.sampled_from(TARGETS))
    rows = draw(st.integers(1, 4))
    arrays = [(rows, w) for w in WIDTHS[target]][:draw(st.integers(0, len(WIDTHS[target])))]
    return target, dict(
        kind=draw(st.sampled_from(ALL_KINDS)), batch=draw(_OUT_OF_TURN),
        sender=draw(st.sampled_from(["source", "layer1", "layer2", "output", "supervisor"])),
        step=draw(st.integers(0, 3)), shapes=arrays,
        meta=draw(st.dictionaries(st.sampled_from(FIELDS), st.one_of(_RIGHT, _msgpack_values),
                                  max_size=4)))


@pytest.mark.timeout(120)
@settings(max_examples=1, deadline=None, database=None, phases=[Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(messages=st.lists(_message(), min_size=120, max_size=120))
def test_every_kind_and_field_from_real_roles_is_dropped_and_changes_nothing(launch, messages):
    """Messages that get past decoding (this run's id, real role names,
    arrays of the widths each socket takes) but are out of turn, mistyped or
    from a connection that proved no role: every one is counted where it
    lands, on the data links and on the control link, and the weights stay
    the reference's."""
    import numpy as np

    from pipeline.wire import codec as wire
    from pipeline.wire.protocol import Message

    run = launch("--lockstep", "--quiet", "--epochs", "300", "--seed", "8",
                 name=f"run-{next(_RUNS)}")
    config = run.wait_started()

    def frames():
        for (role, inbox), m in messages:
            if inbox == "control":
                endpoint, kind = config["supervisor"]["control"], zmq.DEALER
            else:
                endpoint, kind = config["processes"][role]["endpoints"][inbox], zmq.PUSH
            msg = Message(m["kind"], config["run_id"], m["batch"], m["sender"], m["step"],
                          tuple(np.zeros(s) for s in m["shapes"]), m["meta"])
            yield role, endpoint, kind, wire.encode(msg)
    code, sent = _send_while_running(run, frames())
    summary = _assert_counted_and_unchanged(run, code, sent)
    assert sum(summary["control_dropped"].values()) == sent.get("supervisor", 0)
