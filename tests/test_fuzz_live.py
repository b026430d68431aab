"""Hypothesis-made garbage on every socket of a live run: each message is
counted and dropped, the workers run on, and the weights stay the
reference's bit for bit."""
from __future__ import annotations

import msgpack
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.config import Config
from tests.test_pipeline import assert_bit_identical, reference_weights
from tests.test_wire import ALL_KINDS, WIRE_DTYPES, _msgpack_values


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


@pytest.mark.timeout(120)
@settings(max_examples=1, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(data=st.data())
def test_fuzz_on_live_sockets_changes_nothing(launch, data):
    run = launch("--lockstep", "--quiet", "--epochs", "150", "--seed", "8")
    config = run.wait_started()
    targets = [(role, ep) for role, p in config["processes"].items()
               for ep in p["endpoints"].values()]
    message = st.tuples(_headers(config["run_id"]),
                        st.lists(st.binary(max_size=96), max_size=3))
    garbage = data.draw(st.lists(st.tuples(st.sampled_from(targets), message),
                                 min_size=60, max_size=60))
    ctx = zmq.Context()
    sent: dict[str, int] = {}
    try:
        socks = {}
        for (role, endpoint), (header, bodies) in garbage:
            if endpoint not in socks:
                socks[endpoint] = ctx.socket(zmq.PUSH)
                socks[endpoint].linger = 2000
                socks[endpoint].connect(endpoint)
            socks[endpoint].send_multipart([msgpack.packb(header, use_bin_type=True), *bodies])
            sent[role] = sent.get(role, 0) + 1
        for s in socks.values():
            s.close()
    finally:
        ctx.term()
    assert run.finish() == 0, run.err
    errors = {L["role"]: L["decode_errors"] for L in run.summary()["layers"]}
    assert errors == {r: sent.get(r, 0) for r in ("layer1", "layer2", "output")}
    assert_bit_identical(run, reference_weights(Config(lockstep=True, epochs=150, seed=8)))
