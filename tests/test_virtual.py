"""Tests for the virtual-time run (pipeline.nodes.virtual, pipeline.nodes.timing):
the scheduler's order on exact tables worked out by hand, the --lockstep
weights bit for bit whatever the timing, a slow source's free run equal to
--lockstep, bit-reproducible runs, 24 layers, the timing model's numbers."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from pipeline.config import MODES, Config
from pipeline.data import tasks
from pipeline.nodes.reference import train_reference
from pipeline.nodes.timing import Timing, measured, split
from pipeline.nodes.virtual import simulate
from pipeline.run.cli import parse_run
from pipeline.wire.protocol import ACT, EVAL, GRAD, INPUT, Message

pytestmark = pytest.mark.timeout(120)
MS = 1_000_000  # nanoseconds


def run(trace: list | None = None, **kw):
    cfg = tasks.resolve(Config(simulate=True, **kw))
    return simulate(cfg, tasks.load(cfg), Timing.of(cfg), trace=trace)


def table(**kw) -> list[tuple]:
    """(ms, role position, kind, batch) of every handling, as it starts."""
    trace: list = []
    run(trace, **{"epochs": 1, "examples": 3, "batch_size": 1, "step_ms": 3.0, **kw})
    return [(t / MS, p, kind, b) for t, p, kind, b in trace]


def weights(result) -> list[dict]:
    return [L.weights() for L in result.hidden] + [result.output.weights()]


def same(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)
               for x, y in zip(a, b, strict=True))


# --- the scheduler's order, on tables worked out by hand -----------------------------
# A step of 3 ms: async-backprop spends 1 ms on an activation, 2 on a gradient,
# 1 on an evaluation batch; the output layer 3 ms on an activation, 1 on an
# evaluation batch. Positions: 0 the source, then the layers.

def test_two_links_with_equal_times_gradient_first():
    # The source takes 4 ms a batch: layer 1's gradient of batch 0 (sent by
    # the output layer at 8) and the source's batch 1 (sent at 8) reach it
    # at the same time, and it takes the gradient first, as the pump does.
    got = table(layers=2, hidden=(8,), mode="async-backprop", examples=2,
                layer_step_ms=((0, 4.0),))
    assert got == [
        (0, 0, ACT, 0),
        (4, 0, ACT, 1), (4, 1, ACT, 0),
        (5, 2, ACT, 0),
        (8, 0, EVAL, 0), (8, 1, GRAD, 0),      # the tie: the gradient first
        (10, 1, ACT, 1),
        (11, 2, ACT, 1),
        (12, 0, EVAL, 1), (12, 1, EVAL, 0),
        (14, 1, GRAD, 1), (14, 2, EVAL, 0),    # the output was busy until 14
        (16, 0, "eof", 2), (16, 1, EVAL, 1),   # the source first, then down the chain
        (17, 1, "eof", 2), (17, 2, EVAL, 1),
        (18, 2, "eof", 2)]


def test_a_straggler_holds_the_layers_around_it():
    # Layer 2 at twice the step: 2 ms an activation or evaluation, 4 a gradient.
    got = table(layers=3, mode="async-backprop", slow=((2, 2.0),))
    source = [(0, 0, k, b) for k, b in [(ACT, 0), (ACT, 1), (ACT, 2), (EVAL, 0), (EVAL, 1),
                                        (EVAL, 2), ("eof", 3)]]
    layer1 = [(0, 1, ACT, 0), (1, 1, ACT, 1), (2, 1, ACT, 2), (3, 1, EVAL, 0), (4, 1, EVAL, 1),
              (5, 1, EVAL, 2), (6, 1, "eof", 3), (11, 1, GRAD, 0), (15, 1, GRAD, 1),
              (19, 1, GRAD, 2)]
    layer2 = [(1, 2, ACT, 0), (3, 2, ACT, 1), (5, 2, ACT, 2), (7, 2, GRAD, 0), (11, 2, GRAD, 1),
              (15, 2, GRAD, 2), (19, 2, EVAL, 0), (21, 2, EVAL, 1), (23, 2, EVAL, 2),
              (25, 2, "eof", 3)]
    output = [(3, 3, ACT, 0), (6, 3, ACT, 1), (9, 3, ACT, 2), (21, 3, EVAL, 0),
              (23, 3, EVAL, 1), (25, 3, EVAL, 2), (26, 3, "eof", 3)]
    for role in (source, layer1, layer2, output):
        p = role[0][1]
        assert [e for e in got if e[1] == p] == role
    assert len(got) == 7 + 10 + 10 + 7


def test_a_dropped_gradient_goes_up_as_lost_and_is_handled_in_its_turn():
    trace: list = []
    result = run(trace, layers=3, mode="async-backprop", epochs=1, examples=3, batch_size=1,
                 step_ms=3.0, drop_prob=1.0)
    got = [(t / MS, p, k, b) for t, p, k, b in trace if p in (1, 2) and k == GRAD]
    # The output's dx of batch b leaves at 5, 8, 11 and is dropped by layer 2
    # (2 ms a gradient), which tells layer 1 it is lost.
    assert got == [(5, 2, GRAD, 0), (7, 1, GRAD, 0), (8, 2, GRAD, 1), (10, 1, GRAD, 1),
                   (11, 2, GRAD, 2), (13, 1, GRAD, 2)]
    first, second = (L.stats for L in result.hidden)
    assert second.dropped_gradients == 3 and first.lost_gradients == 3
    assert result.virtual_s == pytest.approx(0.015)


def test_locked_backprop_waits_for_each_round_trip():
    got = table(layers=3, mode="backprop")
    training = [e for e in got if e[2] in (ACT, GRAD)]
    assert training == [
        (0, 0, ACT, 0), (0, 0, ACT, 1), (0, 1, ACT, 0), (0, 0, ACT, 2), (1, 2, ACT, 0),
        (2, 3, ACT, 0), (5, 2, GRAD, 0), (7, 1, GRAD, 0),
        (9, 1, ACT, 1), (10, 2, ACT, 1), (11, 3, ACT, 1), (14, 2, GRAD, 1), (16, 1, GRAD, 1),
        (18, 1, ACT, 2), (19, 2, ACT, 2), (20, 3, ACT, 2), (23, 2, GRAD, 2), (25, 1, GRAD, 2)]


def test_roles_sharing_one_core_each_go_at_half_speed():
    # One core: layer 1's evaluation batch (1 ms of work) and the output
    # layer's step (3 ms) run side by side from 1 ms at half speed each, so
    # the evaluation ends at 3 and the step at 5 (at 3 and 4 with a machine each).
    got = table(layers=2, hidden=(8,), mode="async-backprop", examples=1, cores=1)
    assert got == [(0, 0, ACT, 0), (0, 0, EVAL, 0), (0, 1, ACT, 0), (0, 0, "eof", 1),
                   (1, 1, EVAL, 0), (1, 2, ACT, 0),
                   (3, 1, "eof", 1),
                   (5, 1, GRAD, 0), (5, 2, EVAL, 0),   # 2 ms and 1 ms of work, shared
                   (7, 2, "eof", 1)]                    # the gradient's last 1 ms: 7 to 8
    kw = dict(layers=2, hidden=(8,), mode="async-backprop", examples=1, epochs=1,
              batch_size=1, step_ms=3.0)
    assert run(cores=1, **kw).virtual_s == pytest.approx(0.008)
    assert run(cores=2, **kw).virtual_s == run(**kw).virtual_s == pytest.approx(0.006)


@pytest.mark.parametrize("quantum,eof1,eof2", [(1.0, 3, 7), (3.0, 2, 8)])
def test_roles_taking_turns_on_one_core_in_slices(quantum, eof1, eof2):
    # One core in slices. Quantum 1 ms: at 1 ms the output layer's step
    # (3 ms) and layer 1's evaluation batch (1 ms) take turns, a slice each,
    # so layer 1 reaches its end of stream at 3; the output's step ends at 5
    # and its evaluation batch at 7 (after a slice of layer 1's gradient).
    # Quantum 3 ms: layer 1 keeps the core for its slice's 2 ms left, ends
    # its stream at 2, and the output's step runs 2 to 5 in one slice; then
    # layer 1's gradient (waiting first) runs 5 to 7, the output's evaluation 7 to 8.
    got = table(layers=2, hidden=(8,), mode="async-backprop", examples=1, cores=1,
                quantum_ms=quantum)
    assert got == [(0, 0, ACT, 0), (0, 0, EVAL, 0), (0, 1, ACT, 0), (0, 0, "eof", 1),
                   (1, 1, EVAL, 0), (1, 2, ACT, 0), (eof1, 1, "eof", 1),
                   (5, 1, GRAD, 0), (5, 2, EVAL, 0), (eof2, 2, "eof", 1)]


def test_a_stragglers_idling_needs_no_core():
    # Layer 1 at --slow 3 on one shared core idles twice as long as each
    # handling took, waits for the core included, as the real straggler
    # sleeps. Its activation: 1 ms of work alone, idle to 3. At 3 its
    # evaluation batch (1 ms of work) and the output's step (3 ms) share the
    # core, half speed each: layer 1's took 2 ms, so it idles 4 (to 9) while
    # the output finishes alone at 7. At 9 its gradient (2 ms of work) and
    # the output's evaluation share the core to 11, alone to 12: took 3,
    # idles 6; the end of the stream at 18.
    got = table(layers=2, hidden=(8,), mode="async-backprop", examples=1, cores=1,
                slow=((1, 3.0),))
    assert got == [(0, 0, ACT, 0), (0, 0, EVAL, 0), (0, 1, ACT, 0), (0, 0, "eof", 1),
                   (3, 1, EVAL, 0), (3, 2, ACT, 0), (9, 1, GRAD, 0), (9, 2, EVAL, 0),
                   (18, 1, "eof", 1), (18, 2, "eof", 1)]


@pytest.mark.parametrize("emulated,first", [(False, 6.5), (True, 7.0)])
def test_a_link_delay_from_the_send_or_from_the_read(emulated, first):
    # The output layer (4.5 ms a step) sends dx of batch 0 at 5.5 ms over a
    # 1 ms link. A network delivers it at 6.5, when layer 1 is idle. The
    # emulated link starts the delay when layer 1 reads its socket: it is
    # busy with an evaluation batch (5 to 6), reads at 6, gets it at 7. The
    # later gradients find it idle: 11 and 15.5 either way.
    got = table(layers=2, hidden=(8,), mode="async-backprop", layer_step_ms=((2, 4.5),),
                link_delay_ms=1.0, emulated_links=emulated)
    assert [e for e in got if e[2] == GRAD] == [(first, 1, GRAD, 0), (11, 1, GRAD, 1),
                                                (15.5, 1, GRAD, 2)]
    assert (5, 1, EVAL, 2) in got and (6, 1, "eof", 3) in got


# --- what any timing gives ---------------------------------------------------------

TIMINGS = [dict(layer_step_ms=((2, 7.0),), step_jitter=0.5, link_delay_ms=3.0,
                link_jitter_ms=1.0),
           dict(slow=((1, 5.0),), bandwidth=0.5, delay_activations=True, link_delay_ms=0.5)]


@pytest.mark.parametrize("timing", TIMINGS, ids=["jitter-links", "straggler-bandwidth"])
@pytest.mark.parametrize("mode,delay", [(m, k) for m in MODES for k in (0, 2)
                                        if not (m == "backprop" and k)])
def test_lockstep_gives_the_reference_weights_whatever_the_timing(mode, delay, timing):
    cfg = tasks.resolve(Config(mode=mode, epochs=8, lockstep=True, grad_delay=delay))
    want = weights(train_reference(cfg, tasks.load(cfg)))
    got = weights(run(mode=mode, epochs=8, lockstep=True, grad_delay=delay, **timing))
    assert same(want, got)


@pytest.mark.parametrize("mode", MODES)
def test_a_source_slower_than_the_round_trip_gives_the_lockstep_schedule(mode):
    # Free-running, but each batch's gradients are all back before the next
    # batch leaves the source (100 ms against a round trip of 3 ms).
    cfg = tasks.resolve(Config(mode=mode, epochs=8, lockstep=True))
    want = weights(train_reference(cfg, tasks.load(cfg)))
    got = weights(run(mode=mode, epochs=8, layer_step_ms=((0, 100.0),)))
    assert same(want, got)
    fast = weights(run(mode=mode, epochs=8))
    assert mode == "backprop" or not same(want, fast)  # free-running proper differs


def test_unlocked_lockstep_gives_the_reference_weights():
    kw = dict(mode="cdni", unlock="forward", si_second_step=True, si_output_scale=0.3,
              epochs=6, lockstep=True, grad_delay=2, input_delay=1)
    cfg = tasks.resolve(Config(**kw))
    want = weights(train_reference(cfg, tasks.load(cfg)))
    assert same(want, weights(run(step_jitter=0.3, link_delay_ms=2.0, **kw)))


def test_a_run_is_bit_reproducible_and_its_timing_seed_matters():
    kw = dict(epochs=30, step_jitter=0.4, link_delay_ms=2.0, link_jitter_ms=1.5)
    a, b = run(**kw), run(**kw)
    assert same(weights(a), weights(b)) and a.virtual_s == b.virtual_s
    assert [L.stats.as_dict() for L in a.hidden] == [L.stats.as_dict() for L in b.hidden]
    c = run(timing_seed=2, **kw)
    assert not same(weights(a), weights(c)) and c.virtual_s != a.virtual_s


def test_24_layers_free_running_where_staleness_comes_from():
    # 5 ms links both ways against 1 ms steps. async-backprop: a gradient
    # crosses every layer above, so the first layer is the most stale; dni:
    # each layer's feedback is the next layer's synthetic gradient, one link
    # away, so every layer but the last (fed by the output) sees the same.
    def stale(mode):
        result = run(layers=24, hidden=(16,), epochs=10, mode=mode, link_delay_ms=5.0,
                     delay_activations=True, max_inflight=64)
        assert result.batches == 100
        return [L.stats.as_dict()["staleness_steps"]["mean"] for L in result.hidden]
    backprop = stale("async-backprop")
    assert len(backprop) == 23
    assert backprop == sorted(backprop, reverse=True) and backprop[0] > 1.5 * backprop[-1]
    dni = stale("dni")
    assert len(set(dni[:-1])) == 1 and dni[0] < backprop[0]


# --- the timing model's numbers ----------------------------------------------------

def test_the_step_splits_as_each_mode_works():
    for mode, act, grad in [("cdni", 2, 1), ("dni", 2, 1), ("backprop", 1, 2),
                            ("async-backprop", 1, 2)]:
        cfg = Config(mode=mode, layers=3)
        assert split(cfg, 1, 3.0) == pytest.approx({ACT: act, INPUT: act, GRAD: grad, EVAL: 1})
        assert split(cfg, 3, 3.0) == pytest.approx({ACT: 3, INPUT: 1, EVAL: 1})
        assert split(cfg, 0, 3.0) == {ACT: 3.0, EVAL: 3.0}


def _msg(nbytes: int) -> Message:
    return Message(GRAD, "r", arrays=(np.zeros(nbytes, np.uint8),))


def test_a_link_delays_carries_at_its_bandwidth_and_keeps_order():
    cfg = Config(simulate=True, link_delay_ms=2.0, bandwidth=1000.0)  # 1000 MB/s: 1 ns a byte
    t = Timing.of(cfg)
    assert t.arrival_ns(0, 1, "grad", _msg(936)) == 1000 + 2 * MS
    # the wire is busy until 1000: the next one starts then
    assert t.arrival_ns(500, 1, "grad", _msg(936)) == 2000 + 2 * MS
    # an activation link has no delay without --delay-activations
    assert t.arrival_ns(0, 1, "act", _msg(936)) == 1000
    jittery = Timing.of(Config(simulate=True, link_delay_ms=2.0, link_jitter_ms=2.0))
    arrivals = [jittery.arrival_ns(i * MS, 1, "grad", _msg(8)) for i in range(200)]
    assert arrivals == sorted(arrivals) and len(set(arrivals)) > 100


def test_the_step_jitter_is_lognormal_around_the_step_from_its_own_seed():
    t = Timing.of(Config(simulate=True, step_jitter=0.5, timing_seed=7))
    draws = np.array([t.handling_ns(1, ACT) for _ in range(20000)]) / (2 * MS / 3)
    assert np.mean(draws) == pytest.approx(1.0, abs=0.02)          # its mean: the step's share
    assert np.std(np.log(draws)) == pytest.approx(0.5, abs=0.02)
    again = Timing.of(Config(simulate=True, step_jitter=0.5, timing_seed=7))
    assert [again.handling_ns(1, ACT) for _ in range(5)] == list(
        (draws[:5] * (2 * MS / 3)).round().astype(int))


def _handled(count, cpu_ms, cpu_sd_ms):
    return {"count": count, "cpu_ms": cpu_ms, "cpu_sd_ms": cpu_sd_ms, "wall_ms": 2 * cpu_ms,
            "wall_sd_ms": 0.0}


def test_timing_from_a_run_directory(tmp_path):
    # layer1 handled 400 activations at 0.5 ms and 400 gradients at 0.25 ms
    # of CPU: 0.3 s, of the 0.6 s its worker used: each handling counts double.
    summary = {"batches": 400, "cpu_s": {"source": 0.2, "layer1": 0.6}, "layers": [
        {"index": 1, "role": "layer1", "handling": {
            "act": _handled(400, 0.5, 0.0), "grad": _handled(400, 0.25, 0.25),
            "eof": _handled(1, 0.1, 0.0)}},
        {"index": 2, "role": "output", "handling": {"act": _handled(400, 2.0, 0.0),
                                                      "eval": _handled(10, 0.75, 0.0)}}]}
    (tmp_path / "summary.json").write_text(json.dumps(summary))
    got = measured(tmp_path)
    sigma = np.sqrt(np.log(2.0))  # a coefficient of variation of 1
    assert got == {0: {ACT: (0.0005, 0.0)},
                   1: {ACT: (0.001, 0.0), GRAD: (pytest.approx(0.0005), pytest.approx(sigma))},
                   2: {ACT: (0.002, 0.0), EVAL: (0.00075, 0.0)}}
    cfg = Config(simulate=True, layers=2, hidden=(8,), timing_from=str(tmp_path),
                 slow=((2, 2.0),))
    t = Timing.of(cfg, got)
    assert t.handling_ns(1, ACT) == MS
    assert t.handling_ns(0, ACT) == 500_000 and t.handling_ns(0, EVAL) == 0
    assert t.handling_ns(1, EVAL) == MS // 3        # not measured: the model's
    assert t.handling_ns(2, ACT) == 2 * MS          # the work measured, and --slow's
    assert t.idle_ns(2, 2 * MS) == 2 * MS           # idling as long again
    grads = np.array([t.handling_ns(1, GRAD) for _ in range(20000)]) / 500_000
    assert np.mean(grads) == pytest.approx(1.0, abs=0.03)
    assert np.std(grads) == pytest.approx(1.0, abs=0.15)
    (tmp_path / "summary.json").write_text(json.dumps({"layers": [{"index": 1}]}))
    with pytest.raises(ValueError, match="holds no handling times"):
        measured(tmp_path)
    with pytest.raises(ValueError, match="no summary.json"):
        measured(tmp_path / "nowhere")


@pytest.mark.parametrize("args,says", [
    (["--step-ms", "2"], "argument --step-ms: acts on virtual time: add --simulate"),
    (["--simulate", "--in-process"], "argument --simulate: is a run of its own"),
    (["--simulate", "--layer-step-ms", "5:1"], "argument --layer-step-ms: layers are 0"),
    (["--simulate", "--bandwidth", "-1"], "argument --bandwidth: must be at least 0"),
    (["--cores", "2"], "argument --cores: acts on virtual time"),
    (["--simulate", "--quantum", "2"], "argument --quantum: slices cores: add --cores N"),
])
def test_bad_timing_options_are_one_line(args, says, capsys):
    with pytest.raises(SystemExit) as exc:
        parse_run(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1]


def test_the_run_directory_says_virtual_and_wall_seconds(tmp_path):
    from pipeline.run.in_process import run_in_process
    from pipeline.run.rundir import RunDir
    import io
    cfg = tasks.resolve(Config(simulate=True, epochs=20, step_ms=2.0, quiet=True,
                               run_dir=str(tmp_path / "r")))
    rd = RunDir(tmp_path / "r")
    assert run_in_process(cfg, rd, "abc", io.StringIO()) == 0
    s = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert s["simulate"] is True and s["virtual_s"] > 0 and s["wall_s"] > 0
    # 200 batches through 2 layers and the output, 2 ms a step each: at least 0.4 s
    assert s["virtual_s"] >= 0.4
    events = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").open()]
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, 21))
    assert all("wall_s" in e and e["elapsed_s"] <= s["virtual_s"] for e in epochs)
    final = [e for e in events if e["event"] == "final"]
    assert len(final) == 1 and final[0]["final_loss"] == s["final_loss"]


# --- checkpoints and resume -----------------------------------------------------------
def _run_dir(tmp_path, name: str, should_stop=None, **kw) -> int:
    from pipeline.run.in_process import run_in_process
    from pipeline.run.rundir import RunDir
    import io
    kw = {"simulate": True, "epochs": 40, "step_ms": 2.0, "quiet": True,
          "checkpoint_every": 10, "keep_checkpoints": 0, **kw}
    cfg = tasks.resolve(Config(run_dir=str(tmp_path / name), **kw))
    return run_in_process(cfg, RunDir(tmp_path / name), name, io.StringIO(),
                          should_stop=should_stop)


def _stop_after(path, epochs: int):
    """True once the run at ``path`` has committed the checkpoint of ``epochs``."""
    latest = path / "checkpoints" / "latest.json"
    return lambda: latest.is_file() and json.loads(latest.read_text())["epochs_done"] >= epochs


def _resume(path) -> int:
    from commands.supervisor import run
    from pipeline.run.resume import resume_config
    import io
    cfg, states = resume_config(path, True)
    assert cfg.start_epoch == 20 and cfg.simulate
    return run(cfg, io.StringIO(), resume=states)


def _final_weights(path) -> list[dict]:
    out = []
    for role in ("layer1", "layer2", "output"):
        with np.load(path / "weights" / f"{role}.npz") as z:
            out.append({k: z[k] for k in z.files})
    return out


def test_a_lockstep_run_stopped_and_resumed_ends_as_the_whole_run_bit_for_bit(tmp_path):
    assert _run_dir(tmp_path, "whole", lockstep=True) == 0
    cut = tmp_path / "cut"
    assert _run_dir(tmp_path, "cut", _stop_after(cut, 20), lockstep=True) == 130
    s = json.loads((cut / "summary.json").read_text())
    assert s["status"] == "interrupted"
    assert sorted(p.name for p in (cut / "checkpoints").iterdir()) == [
        "epoch-000010", "epoch-000020", "latest.json"]
    assert _resume(cut) == 0
    assert same(_final_weights(cut), _final_weights(tmp_path / "whole"))
    events = [json.loads(line) for line in (cut / "metrics.jsonl").open()]
    assert [e["epoch"] for e in events if e["event"] == "checkpoint"] == [10, 20, 30]
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == list(range(1, 41))


def test_a_free_running_resume_starts_afresh_and_is_reproducible(tmp_path):
    import shutil
    assert _run_dir(tmp_path, "whole") == 0
    cut = tmp_path / "cut"
    assert _run_dir(tmp_path, "cut", _stop_after(cut, 20)) == 130
    shutil.copytree(cut, tmp_path / "again")
    assert _resume(cut) == 0 and _resume(tmp_path / "again") == 0
    assert same(_final_weights(cut), _final_weights(tmp_path / "again"))
    # Its pipeline restarts empty at the checkpoint, as a real resumed run's
    # processes do: the staleness after it is not the whole run's, nor the weights.
    assert not same(_final_weights(cut), _final_weights(tmp_path / "whole"))
    s = json.loads((cut / "summary.json").read_text())
    assert s["status"] == "completed" and s["start_epoch"] == 20 and s["virtual_s"] > 0


def test_checkpoints_are_kept_as_keep_checkpoints_says(tmp_path):
    assert _run_dir(tmp_path, "r", keep_checkpoints=1) == 0
    assert sorted(p.name for p in (tmp_path / "r" / "checkpoints").iterdir()) == [
        "epoch-000030", "latest.json"]
