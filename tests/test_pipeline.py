"""The multi-process pipeline against the in-process reference, and how it
ends: completed, interrupted, failed, or pelted with garbage."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq

from pipeline.wire import codec as wire, protocol
from pipeline.config import Config, defaults_for
from tests.kit import reference
from pipeline.net.transport import LOCAL_IPC
from tests.conftest import assert_no_orphans

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROOT = Path(__file__).resolve().parent.parent


def reference_weights(cfg: Config) -> dict[str, dict[str, np.ndarray]]:
    result = reference(cfg)
    out = {protocol.layer_role(L.index, cfg.layers): L.weights() for L in result.hidden}
    out["output"] = result.output.weights()
    return out


def assert_bit_identical(run, expected: dict[str, dict[str, np.ndarray]]) -> None:
    for role, arrays in expected.items():
        got = run.weights(role)
        assert sorted(got) == sorted(arrays), role
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype
            # Compare the bits, not the values: -0.0 vs 0.0 or NaN would hide here.
            assert np.array_equal(got[name].view(np.uint64), want.view(np.uint64)), \
                f"{role}.{name} differs from the reference"


@pytest.mark.parametrize("mode", ["cdni", "dni", "backprop"])
def test_lockstep_pipeline_equals_reference_bit_for_bit(launch, mode):
    args = dict(mode=mode, epochs=15, layers=4, hidden=(32, 24, 16), seed=7, examples=37,
                batch_size=8)
    run = launch("--lockstep", "--quiet", "--mode", mode, "--epochs", "15", "--layers", "4",
                 "--hidden", "32,24,16", "--seed", "7", "--examples", "37", "--batch-size", "8")
    assert run.finish() == 0, run.err
    cfg = Config(**args)
    ref = reference(cfg)
    assert_bit_identical(run, reference_weights(cfg))
    s = run.summary()
    assert s["status"] == "completed"
    assert s["final_loss"] == ref.final_loss
    assert s["train_accuracy"] == ref.train_accuracy
    batches = cfg.total_batches
    for layer in s["layers"]:
        assert layer["forward_batches"] == batches
        assert layer["true_gradients"] == batches
        assert layer["staleness_steps"] == {"mean": 0.0, "max": 0, "count": batches}
        assert layer["staleness_hist"] == {"0": batches}
        assert layer["decode_errors"] == 0
        expect_sg = batches if mode != "backprop" and layer["role"] != "output" else 0
        assert layer["sg_updates"] == expect_sg


def assert_metrics_count_epochs_from_1(run, epochs: int) -> None:
    """metrics.jsonl: the numbering line first, the N-th epoch's event
    ``"epoch": N``, and one final evaluation, summary.json's figures."""
    events = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert events[0] == {"event": "numbering", "epoch_base": 1}
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(1, epochs + 1))
    layer1 = [e["epoch"] for e in events if e["event"] == "layer" and e["role"] == "layer1"]
    assert layer1 == list(range(1, epochs + 1))
    final = [e for e in events if e["event"] == "final"]
    s = run.summary()
    assert len(final) == 1 and final[0]["role"] == "output"
    assert (final[0]["final_loss"], final[0]["train_accuracy"]) == \
        (s["final_loss"], s["train_accuracy"])


def test_free_running_pipeline_solves_the_seed_task(launch):
    run = launch()  # the defaults: cdni, --layers 3, the addition task
    assert run.finish() == 0, run.err
    s = run.summary()
    cfg = Config()
    assert s["status"] == "completed"
    assert s["train_accuracy"] == 1.0
    assert [L["role"] for L in s["layers"]] == ["layer1", "layer2", "output"]
    for layer in s["layers"]:
        assert layer["forward_batches"] == cfg.total_batches
        assert layer["true_gradients"] == cfg.total_batches
    # Decoupled: the first layer ran ahead of its true gradients, within the bound.
    first = s["layers"][0]["staleness_steps"]
    assert 0 < first["mean"] and first["max"] <= cfg.max_inflight - 1
    assert "exact sums 100.0 %" in run.out
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    assert sum('"event": "epoch"' in line for line in lines) == cfg.epochs
    assert_metrics_count_epochs_from_1(run, cfg.epochs)
    config = run.config()
    assert set(config["processes"]) == {"source", "layer1", "layer2", "output"}
    # Local links: Unix sockets in the run's private directory where there are
    # any (gone once the run is over), else loopback TCP.
    act = config["processes"]["layer1"]["endpoints"]["act"]
    control = config["supervisor"]["control"]
    if LOCAL_IPC:
        assert act.startswith("ipc:///") and control.startswith("ipc:///")
        assert os.path.dirname(act) == os.path.dirname(control)
        assert not os.path.exists(os.path.dirname(act[len("ipc://"):]))
    else:
        assert act.startswith("tcp://127.0.0.1:")
    # Memory: every process's peak, and each epoch's resident size, which
    # never exceeds that peak.
    peaks = s["peak_rss_mb"]
    assert set(peaks) == {"source", "layer1", "layer2", "output", "supervisor"}
    assert all(10 < mb < 2000 for mb in peaks.values()), peaks
    events = [json.loads(line) for line in lines]
    sizes = [(e["role"], e["rss_mb"]) for e in events if e["event"] in ("epoch", "layer")]
    assert {r for r, _ in sizes} == {"layer1", "layer2", "output"}
    assert all(0 < mb <= peaks[role] + 0.01 for role, mb in sizes)
    # CPU time of every process: none can have used more than the run's wall
    # time on every core, and the layers did work.
    cpu = s["cpu_s"]
    assert set(cpu) == set(peaks)
    assert all(0 < t <= s["wall_s"] * os.cpu_count() + 1 for t in cpu.values()), cpu


def test_max_inflight_bounds_staleness(launch):
    run = launch("--quiet", "--epochs", "40", "--max-inflight", "2")
    assert run.finish() == 0, run.err
    for layer in run.summary()["layers"]:
        assert layer["staleness_steps"]["max"] <= 1


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_ctrl_c_ends_every_process_and_writes_interrupted(launch, sig):
    run = launch("--epochs", "100000")
    run.wait_started()
    run.wait_training()
    run.proc.send_signal(sig)
    assert run.finish(timeout=5) == 128 + sig  # 130 for SIGINT, 143 for SIGTERM
    s = run.summary()
    assert s["status"] == "interrupted"
    assert 0 < s["epochs_done"] < 100000
    assert_no_orphans(run)


@pytest.mark.parametrize("extra, victim", [
    ([], "layer2"),
    # unlocked: the source mid-fan-out, and a layer with a third inbox
    (["--unlock", "forward"], "source"), (["--unlock", "forward"], "output")])
def test_killed_worker_fails_the_run_cleanly(launch, extra, victim):
    run = launch("--epochs", "100000", "--quiet", *extra)
    pids = run.wait_started()["processes"]
    run.wait_training()
    import os
    os.kill(pids[victim]["pid"], signal.SIGKILL)
    assert run.finish(timeout=10) == 1
    s = run.summary()
    assert s["status"] == "failed"
    assert s["error"]["role"] == victim
    assert "-9" in s["error"]["message"]
    assert victim in run.out
    assert_no_orphans(run)


def _garbage(run_id: str, good_header: dict) -> list[list[bytes]]:
    """One of each kind of bad message a data socket may see."""
    def frames(header: dict, *arrays: bytes) -> list[bytes]:
        return [msgpack.packb(header), *arrays]

    def h(**changes) -> dict:
        return {**good_header, **changes}

    ok8 = np.zeros((2, 8)).tobytes()
    return [
        [b"not msgpack at all \xff\xfe"],                                   # malformed
        frames(h(a=[["<f8", [2, 8]]]), ok8[:40]),                          # truncated
        frames(h(r="another-run")),                                         # foreign run
        frames(h(v=99)),                                                    # other version
        frames(h(k="grad", a=[["<f8", [2, 8]]]), ok8),                     # wrong shape/batch
        # Larger than any message of this run (max_bytes), but under the
        # socket's hard limit, so it reaches decode() and is counted there.
        frames(h(k="act", a=[["<f8", [100, 16]], ["<f8", [100, 8]]]),      # oversized
               np.zeros((100, 16)).tobytes(), np.zeros((100, 8)).tobytes()),
        frames(h(k="stop")),                                               # wrong kind here
    ]


@pytest.mark.parametrize("unlock", ["none", "forward"])
def test_garbage_on_live_sockets_is_counted_and_harmless(launch, unlock):
    """Bad messages on every data socket of a lockstep run (unlocked: the
    input inboxes too): each is counted, the run completes, and the weights
    are still the reference's, bit for bit."""
    run = launch("--lockstep", "--quiet", "--epochs", "300", "--seed", "3", "--unlock", unlock)
    config = run.wait_started()
    ctx = zmq.Context()
    sent: dict[str, int] = {}
    # The garbage senders stay connected until the run is over: a sender that
    # disconnects while its last messages wait behind a full inbox (the high-
    # water mark) may lose them in ZeroMQ (seen over Unix sockets), and then
    # they would not be counted. The pipeline's own senders never do that.
    held = []
    try:
        for role, proc in config["processes"].items():
            for name, endpoint in proc["endpoints"].items():
                sock = ctx.socket(zmq.PUSH)
                held.append(sock)
                sock.connect(endpoint)
                header = {"v": wire.PROTOCOL_VERSION, "k": "act", "r": config["run_id"],
                          "b": 123456, "s": "source", "t": 0, "a": [], "m": {}}
                for msg in _garbage(config["run_id"], header):
                    sock.send_multipart(msg)
                    sent[role] = sent.get(role, 0) + 1
                # Far past the hard limit: ZeroMQ refuses it and drops this
                # sender; it never reaches the worker, so it is not counted.
                huge = ctx.socket(zmq.PUSH)
                huge.linger = 2000
                huge.connect(endpoint)
                huge.send(bytes(4 << 20))
                huge.close()
        code = run.finish()
    finally:
        for sock in held:
            sock.close(linger=0)
        ctx.term()
    assert code == 0, run.err
    s = run.summary()
    assert s["status"] == "completed"
    errors = {L["role"]: L["decode_errors"] for L in s["layers"]}
    assert errors == {role: n for role, n in sent.items() if role != "source"}
    assert "dropped a bad message" in run.err
    events = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    reported = {e["role"] for e in events if e["event"] == "decode_error"}
    assert reported == {"layer1", "layer2", "output"}
    assert_bit_identical(run, reference_weights(Config(lockstep=True, epochs=300, seed=3,
                                                       unlock=unlock,
                                                       **defaults_for("addition", unlock))))
    if unlock == "forward":
        assert set(config["processes"]["layer2"]["endpoints"]) == {"act", "grad", "input"}


def test_two_runs_at_once_do_not_collide(launch):
    a = launch("--lockstep", "--quiet", "--epochs", "30", "--seed", "1", name="a")
    b = launch("--lockstep", "--quiet", "--epochs", "30", "--seed", "2", name="b")
    assert a.finish() == 0 and b.finish() == 0, a.err + b.err
    assert_bit_identical(a, reference_weights(Config(lockstep=True, epochs=30, seed=1)))
    assert_bit_identical(b, reference_weights(Config(lockstep=True, epochs=30, seed=2)))


def test_in_process_run_writes_the_same_run_directory(launch):
    run = launch("--in-process", "--quiet", "--epochs", "20", "--mode", "backprop")
    assert run.finish() == 0, run.err
    s = run.summary()
    assert s["status"] == "completed" and s["in_process"] is True
    assert [L["role"] for L in s["layers"]] == ["layer1", "layer2", "output"]
    assert_bit_identical(run, reference_weights(Config(mode="backprop", epochs=20)))
    assert (run.run_dir / "metrics.jsonl").read_text().count('"event": "epoch"') == 20
    assert_metrics_count_epochs_from_1(run, 20)  # the final event too, as a process run's


def test_run_dir_with_a_finished_run_is_refused(launch):
    first = launch("--in-process", "--quiet", "--epochs", "2", name="same")
    assert first.finish() == 0
    before = (first.run_dir / "summary.json").read_text()
    second = launch("--quiet", "--epochs", "2", name="same")
    assert second.finish() == 2
    assert "--run-dir" in second.err and len(second.err.strip().splitlines()) == 1
    assert (first.run_dir / "summary.json").read_text() == before


def _run_args(**kw) -> list[str]:
    args = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, tuple):
            v = ",".join(map(str, v))
        args += [flag] if v is True else [flag, str(v)]
    return args


@pytest.mark.parametrize("mode, delay", [("cdni", 3), ("async-backprop", 2), ("dni", 0)])
def test_grad_delay_under_lockstep_is_exact_and_matches_reference(launch, mode, delay):
    kw = dict(mode=mode, grad_delay=delay, epochs=12, layers=4, hidden=(32, 24, 16), seed=5,
              examples=30)
    run = launch("--lockstep", "--quiet", *_run_args(**kw))
    assert run.finish() == 0, run.err
    cfg = Config(lockstep=True, **kw)
    assert_bit_identical(run, reference_weights(cfg))
    applied = cfg.total_batches - delay  # the last `delay` were not due when training ended
    for layer in run.summary()["layers"][:-1]:
        assert layer["staleness_hist"] == {str(delay): applied}, layer["role"]
        assert layer["expired_gradients"] == delay


def test_update_prob_zero_leaves_weights_untouched(launch):
    run = launch("--lockstep", "--quiet", "--update-prob", "0", "--epochs", "5")
    assert run.finish() == 0, run.err
    cfg = Config(epochs=5)
    from pipeline.layers.build import make_hidden, make_output
    initial = {protocol.layer_role(k, cfg.layers): make_hidden(cfg, k).weights() for k in range(1, cfg.layers)}
    initial["output"] = make_output(cfg).weights()
    for role, arrays in initial.items():
        got = run.weights(role)
        assert np.array_equal(got["w"], arrays["w"]) and np.array_equal(got["b"], arrays["b"])
        if role != "output":  # the SG modules still learn
            assert np.abs(got["sg_v"]).sum() > 0
    for layer in run.summary()["layers"]:
        assert layer["weight_updates"] == 0
        assert layer["skipped_updates"] == cfg.total_batches


@pytest.mark.parametrize("mode", ["cdni", "backprop"])
def test_drop_prob_runs_finish_and_report_the_drops(launch, mode):
    run = launch("--quiet", "--mode", mode, "--drop-prob", "0.25", "--epochs", "30")
    assert run.finish() == 0, run.err
    s = run.summary()
    assert s["status"] == "completed"
    total = Config(epochs=30).total_batches
    layers = s["layers"]
    assert all(L["dropped_gradients"] > 0 for L in layers[:-1])
    for L in layers[:-1]:  # every batch is accounted for, once
        assert (L["true_gradients"] + L["dropped_gradients"] + L["lost_gradients"]
                + L["expired_gradients"]) == total
    if mode == "backprop":  # a gradient lost at layer 2 never reaches layer 1
        assert layers[0]["lost_gradients"] == layers[1]["dropped_gradients"]


def test_link_delay_and_straggler_free_running(launch):
    run = launch("--quiet", "--epochs", "20", "--link-delay", "3:1", "--slow", "2:2",
                 "--mode", "async-backprop")
    assert run.finish() == 0, run.err
    s = run.summary()
    assert s["status"] == "completed"
    first = s["layers"][0]
    # Two gradient hops of at least 2 ms each stand between layer 1 and its gradients.
    assert first["staleness_s"]["mean"] >= 0.004
    assert first["staleness_steps"]["max"] >= 1
    events = [json.loads(line) for line in (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    layer_events = [e for e in events if e["event"] == "layer" and e["role"] == "layer1"]
    assert len(layer_events) == 20 and all(e["staleness_s_mean"] >= 0.004 for e in layer_events)


def test_sg_quality_is_reported(launch):
    run = launch("--quiet", "--epochs", "100", "--lockstep")
    assert run.finish() == 0, run.err
    q = run.summary()["layers"][1]["sg_quality"]
    assert q["cosine"]["count"] > 0 and -1 <= q["cosine"]["p10"] <= q["cosine"]["p90"] <= 1
    assert q["rel_err"]["mean"] > 0 and q["sg_loss"]["count"] == Config(epochs=100).total_batches


@pytest.mark.parametrize("where", ["pipeline", "in-process"])
def test_a_diverging_run_stops_with_a_clear_error_and_saves_no_weights(launch, where):
    """ReLU layers at a step of 50 blow up to inf within a few batches: the run
    fails naming the cause, instead of training on NaN to the end. Under
    --lockstep, so that the pipeline's arithmetic is the reference's: free-
    running, about one run in three on a loaded machine killed every ReLU
    unit before the loss overflowed, and ended with a finite loss of 54."""
    run = launch("--quiet", "--activation", "relu", "--lr", "50", "--epochs", "50",
                 "--in-process" if where == "in-process" else "--lockstep")
    assert run.finish() == 1, run.err
    s = run.summary()
    assert s["status"] == "failed"
    assert s["error"]["role"] == ("output" if where == "pipeline" else "reference")
    assert "diverged" in s["error"]["message"] and "--lr" in s["error"]["message"]
    assert s["epochs_done"] < 50
    assert not (run.run_dir / "weights").exists() or not any((run.run_dir / "weights").iterdir())


@pytest.mark.parametrize("first, second", [(signal.SIGTERM, signal.SIGTERM),
                                           (signal.SIGINT, signal.SIGTERM),
                                           (signal.SIGTERM, signal.SIGINT)])
def test_a_second_signal_does_not_cut_the_clean_up_short(launch, first, second):
    """The first signal ends the run, a second while it stops its workers is
    noted and nothing more: no traceback, the summary written, the first
    signal's exit code."""
    run = launch("--epochs", "100000", "--quiet")
    run.wait_started()
    run.wait_training()
    run.proc.send_signal(first)
    run.proc.send_signal(second)
    # Sent together, both may be pending at once; Python then handles the
    # lower-numbered first. Either way one ends the run and the other waits.
    assert run.finish(timeout=10) in (128 + first, 128 + second)
    assert "Traceback" not in run.err
    assert run.summary()["status"] == "interrupted"
    assert_no_orphans(run)


@pytest.mark.parametrize("after_s", [0.1, 0.25, 0.5])
def test_ctrl_c_while_starting_up_is_a_clean_exit(tmp_path, after_s):
    """Ctrl-C while launch.py is still importing or starting its workers. The
    delay is the moment the signal is sent (the variable under test), not a
    synchronisation."""
    # Python's own start-up, before launch.py's first line, is no program's
    # to handle: the signal is blocked until then (launch.py unblocks it), so
    # that it lands in launch.py's imports however slow the machine is.
    def block() -> None:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    proc = subprocess.Popen([sys.executable, "launch.py", "--quiet", "--epochs", "3",
                             "--run-dir", str(tmp_path / "run")], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=block)
    time.sleep(after_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode in (0, 130), err     # 0: it had finished already
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    if proc.returncode == 130 and (tmp_path / "run" / "config.json").exists():
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert summary["status"] == "interrupted"
