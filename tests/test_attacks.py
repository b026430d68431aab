"""Attacks on a live run by a process that knows everything in its run
directory (the run id, every endpoint) but holds none of the run's secrets:
forged control messages, forged and out-of-turn data messages, and in a
cluster run, peers holding another role's key. Each is counted and dropped;
the run completes with the weights the reference computes, bit for bit.

(A process of another user cannot even connect: test_security.py.)"""
from __future__ import annotations

import time

import msgpack
import numpy as np
import pytest
import zmq

from pipeline.net import security
from pipeline.wire import codec as wire, protocol
from pipeline.config import Config
from pipeline.wire.protocol import Speaker
from tests.test_cluster import Weights, epoch_logged, roles, wait_for, write_cluster  # noqa: F401
from tests.test_pipeline import assert_bit_identical, reference_weights

pytestmark = pytest.mark.slow  # every test here starts processes

EPOCHS, SEED = 300, 8
NO_REPLY_MS = 300  # the forger listens this long for a config nobody may send it


def _dealer(ctx: zmq.Context, endpoint: str, identity: bytes | None = None) -> zmq.Socket:
    s = ctx.socket(zmq.DEALER)
    s.linger = 0
    if identity is not None:
        s.setsockopt(zmq.IDENTITY, identity)
    s.connect(endpoint)
    return s


def _raw(run_id: str, kind: str, sender: str, batch: int, meta: dict) -> list[bytes]:
    """A header as wire.encode writes one, with any meta (even mistyped)."""
    return [msgpack.packb({"v": wire.PROTOCOL_VERSION, "k": kind, "r": run_id, "b": batch, "s": sender, "t": 0,
                           "a": [], "m": meta}, use_bin_type=True)]


@pytest.mark.timeout(150)
def test_forged_control_and_data_messages_change_nothing(launch):
    run = launch("--lockstep", "--quiet", "--epochs", str(EPOCHS), "--seed", str(SEED))
    config = run.wait_started()
    run_id, procs = config["run_id"], config["processes"]
    cfg = Config(lockstep=True, epochs=EPOCHS, seed=SEED)
    ctx = zmq.Context()
    socks: list[zmq.Socket] = []
    control_sent = 0
    data_sent = {"layer1": 0, "layer2": 0, "output": 0}
    try:
        # -- the control link: a connection that names itself layer1 (the
        # identity the link used to take as the role), and one that does not
        named = _dealer(ctx, config["supervisor"]["control"], identity=b"layer1")
        plain = _dealer(ctx, config["supervisor"]["control"])
        socks += [named, plain]
        as_l1 = Speaker(run_id, "layer1")
        forged = [
            Speaker("", "layer1").hello(),                    # would kill the run: "restarted"
            Speaker("", "layer1").hello("0" * 32),            # a guessed secret
            as_l1.error("forged", "forged traceback"),        # would fail the run
            *[Speaker(run_id, r).done({}, 0, 0.0, 0.0, {"w": np.ones((3, 3))})
              for r in protocol.roles(3)],                    # would end it with these weights
            as_l1.metric({"event": "epoch", "epoch": 0, "pad": "x" * 60_000}),
            as_l1.state(999999, {}, {}),                      # would write epoch-999999
        ]
        for sock in (named, plain):
            for msg in forged:
                sock.send_multipart(wire.encode(msg))
                control_sent += 1
            for meta in ({}, {"epoch": "x"}):                 # killed roles / the coordinator
                sock.send_multipart(_raw(run_id, "checkpoint", "layer1", -1, meta))
                control_sent += 1
        for _ in range(200):                                  # a flood
            plain.send_multipart(wire.encode(as_l1.metric({"event": "epoch", "epoch": 1})))
            control_sent += 1

        # -- the data links: right run id, right sender, right shapes, out of turn
        x, y = np.zeros((cfg.batch_size, cfg.dims[-2])), np.zeros((cfg.batch_size, cfg.dims[-1]))
        l2 = Speaker(run_id, "layer2")
        to_output = [l2.eof(0), *[l2.evaluation(10**6 + i, 0, x, y, None) for i in range(50)],
                     l2.barrier(0, 999999), l2.act(10**6, 0, x, y),
                     l2.evaluation(0, 0, x, y, 10**6)]
        out = ctx.socket(zmq.PUSH)
        out.linger = 0
        out.connect(procs["output"]["endpoints"]["act"])
        socks.append(out)
        for msg in to_output:
            out.send_multipart(wire.encode(msg))
            data_sent["output"] += 1
        for meta in ({}, {"epoch": "x"}):
            out.send_multipart(_raw(run_id, "checkpoint", "layer2", 0, meta))
            data_sent["output"] += 1
        grad = ctx.socket(zmq.PUSH)
        grad.linger = 0
        grad.connect(procs["layer1"]["endpoints"]["grad"])
        socks.append(grad)
        grad.send_multipart(wire.encode(l2.grad(10**6, 0, np.zeros((2, cfg.dims[1])))))
        grad.send_multipart(wire.encode(l2.lost(10**6, 0)))
        data_sent["layer1"] += 2

        # Nobody who could not prove a role was told anything: no config.
        assert not named.poll(NO_REPLY_MS) and not plain.poll(0)
        code = run.finish()
    finally:
        for s in socks:
            s.close(linger=0)
        ctx.term()
    assert code == 0, run.err
    summary = run.summary()
    assert summary["status"] == "completed"
    assert {L["role"]: L["decode_errors"] for L in summary["layers"]} == data_sent
    assert sum(summary["control_dropped"].values()) == control_sent
    assert not (run.run_dir / "checkpoints").exists()
    assert_bit_identical(run, reference_weights(cfg))


@pytest.mark.skipif(not zmq.has("curve"), reason="libzmq without CURVE")
@pytest.mark.timeout(150)
def test_a_peer_with_another_roles_key_speaks_only_as_that_role(tmp_path, roles):
    """The source's key cannot open the output's activation inbox; layer2's
    key cannot speak as layer1 on the control link (nor see its config)."""
    cluster = write_cluster(tmp_path, {"epochs": 400, "lockstep": True, "seed": SEED})
    r = roles(cluster)
    run_dir = tmp_path / "run"
    host = r.start(None, "--run-dir", str(run_dir))
    wait_for(lambda: (run_dir / "config.json").exists() or host.poll() is not None,
             "the run to start", timeout=60)
    import json
    config = json.loads((run_dir / "config.json").read_text())
    keydir = tmp_path / "keys"
    ctx = zmq.Context()
    src_keys = security.load_keys(keydir, "source")
    l2_keys = security.load_keys(keydir, "layer2")
    refused: list[str] = []
    with security.Guard(ctx, src_keys):
        socks = []
        try:
            # eof to the output as layer2, with the source's key
            out = ctx.socket(zmq.PUSH)
            out.linger = 0
            security.make_client(out, src_keys, "output")
            mon = security.Refusals(out)
            out.connect(config["processes"]["output"]["endpoints"]["act"])
            socks.append(out)
            out.send_multipart(wire.encode(Speaker(config["run_id"], "layer2").eof(0)),
                               zmq.NOBLOCK)
            refused += mon.poll(5000)
            mon.close()
            # hello and error as layer1 over the control link, with layer2's key
            ctrl = ctx.socket(zmq.DEALER)
            ctrl.linger = 0
            security.make_client(ctrl, l2_keys, "coordinator")
            ctrl.connect(config["supervisor"]["control"])
            socks.append(ctrl)
            ctrl.send_multipart(wire.encode(Speaker("", "layer1").hello()))
            ctrl.send_multipart(wire.encode(Speaker(config["run_id"], "layer1").error("x", "")))
            assert not ctrl.poll(NO_REPLY_MS), "a peer got an answer as a role it is not"
        finally:
            for s in socks:
                s.close(linger=0)
    ctx.term()
    assert any("ZAP status 400" in reason for reason in refused), refused
    assert host.wait(120) == 0, r.log("host")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["control_dropped"] == {"unknown": 2}
    assert all(L["decode_errors"] == 0 for L in summary["layers"])
    assert_bit_identical(Weights(run_dir), reference_weights(
        Config(lockstep=True, epochs=400, seed=SEED)))
