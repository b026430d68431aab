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
    ctx = zmq.Context()
    sent: dict[str, int] = {}
    socks = {}
    # The senders stay connected until the run is over: one that disconnects
    # while its last messages wait behind a full inbox may lose them in
    # ZeroMQ (seen over Unix sockets), and they would go uncounted.
    try:
        for (role, inbox), (header, bodies) in garbage:
            endpoint = config["processes"][role]["endpoints"][inbox]
            if header["r"] == RUN:
                header = {**header, "r": config["run_id"]}
            if endpoint not in socks:
                socks[endpoint] = ctx.socket(zmq.PUSH)
                socks[endpoint].connect(endpoint)
            socks[endpoint].send_multipart([msgpack.packb(header, use_bin_type=True), *bodies])
            sent[role] = sent.get(role, 0) + 1
        code = run.finish()
    finally:
        for s in socks.values():
            s.close(linger=0)
        ctx.term()
    assert code == 0, run.err
    errors = {L["role"]: L["decode_errors"] for L in run.summary()["layers"]}
    assert errors == {r: sent.get(r, 0) for r in ("layer1", "layer2", "output")}
    assert_bit_identical(run, reference_weights(Config(lockstep=True, epochs=300, seed=8)))
