"""Checkpoints and --resume: a layer's state taken and loaded back goes on
exactly as the original (with its optimiser state, running staleness, SG
drift and momentum); a run interrupted (or killed) after a checkpoint goes
on from it, to the same weights, bit for bit, as a run never stopped."""
from __future__ import annotations

import copy
import json
import math
import os
import re
import signal

import numpy as np
import pytest

from pipeline.layers.state import layer_state, load_layer_state
from pipeline.config import Config
from pipeline.layers.output import OutputLayer
from tests.conftest import Launch, assert_no_orphans, error_line, run_launch
from tests.test_layer_options import B, CLASSES, FAN_IN, onehot
from tests.test_pipeline import assert_bit_identical, reference_weights
from tests.kit import hidden_layer

pytestmark = pytest.mark.timeout(120)


def latest(run) -> int | None:
    path = run.run_dir / "checkpoints" / "latest.json"
    return json.loads(path.read_text())["epochs_done"] if path.exists() else None


ARGS = ["--lockstep", "--epochs", "60", "--checkpoint-every", "10", "--seed", "6",
        "--update-prob", "0.8", "--drop-prob", "0.1", "--quiet"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,how,delay", [
    ("cdni", signal.SIGINT, 0), ("cdni", signal.SIGKILL, 0), ("dni", signal.SIGKILL, 0),
    ("backprop", signal.SIGKILL, 0), ("async-backprop", signal.SIGINT, 0),
    ("cdni", signal.SIGKILL, 2), ("dni", signal.SIGINT, 3)])
def test_resumed_run_equals_the_uninterrupted_run_bit_for_bit(launch, mode, how, delay):
    """Every mode: what a checkpoint holds differs (SG modules and their
    versions, or none), and each must come back whole. Under --grad-delay
    the DNI modes also keep the gradients not yet due at the barrier."""
    run = launch(*ARGS, "--mode", mode, "--grad-delay", str(delay))
    run.wait_started()
    run.wait_for(lambda: (latest(run) or 0) >= 20, "a checkpoint after epoch 20")
    if how == signal.SIGKILL:   # a crash: no summary, no clean-up
        os.kill(run.proc.pid, signal.SIGKILL)
        run.proc.wait(10)
    else:
        run.proc.send_signal(how)
        assert run.finish(timeout=10) == 130
    assert_no_orphans(run)
    ck = latest(run)
    assert ck is not None and ck < 60
    # Whatever was cut short, the checkpoint in force is whole.
    d = run.run_dir / "checkpoints" / f"epoch-{ck:06d}"
    for role in ("layer1", "layer2", "output"):
        with np.load(d / f"{role}.npz") as z:
            assert "w" in z.files
        assert json.loads((d / f"{role}.json").read_text())["clock"] == ck * 10

    resumed = Launch(run.run_dir, ["--resume", str(run.run_dir), "--quiet"])
    try:
        assert resumed.finish(timeout=60) == 0, resumed.err
    finally:
        resumed.kill()
    summary = resumed.summary()
    assert summary["status"] == "completed" and summary["epochs_done"] == 60
    cfg = Config(lockstep=True, epochs=60, seed=6, update_prob=0.8, drop_prob=0.1, mode=mode,
                 grad_delay=delay)
    assert_bit_identical(resumed, reference_weights(cfg))
    # metrics.jsonl counts as the checkpoint directories do: each process's
    # events after its numbering line, a checkpoint event named by the epochs
    # done (the killed run's last one may be in force but not yet logged),
    # and the resumed run's epochs going on from ck + 1.
    events = [json.loads(line) for line in
              (run.run_dir / "metrics.jsonl").read_text().splitlines()]
    marks = [i for i, e in enumerate(events) if e["event"] == "numbering"]
    assert len(marks) == 2 and marks[0] == 0
    before, after = events[:marks[1]], events[marks[1]:]
    assert [e["epoch"] for e in before if e["event"] == "checkpoint"] in (
        list(range(10, ck + 1, 10)), list(range(10, ck, 10)))
    assert [e["epoch"] for e in after if e["event"] == "epoch"] == list(range(ck + 1, 61))
    assert [e["epoch"] for e in after if e["event"] == "checkpoint"] == \
        list(range(ck + 10, 60, 10))
    # The counters run on across the resume: every batch is there once, and
    # only the last K gradients expire (at the end of training).
    for layer in summary["layers"]:
        assert layer["forward_batches"] == cfg.total_batches
        if layer["role"] != "output":
            assert layer["expired_gradients"] == delay
    assert_no_orphans(resumed)


@pytest.mark.slow
def test_resume_refuses_what_cannot_be_resumed(launch, tmp_path):
    done = launch("--in-process", "--epochs", "2", "--quiet", name="done")
    assert done.finish() == 0
    again = Launch(tmp_path / "x", ["--resume", str(done.run_dir)])
    assert again.finish() == 2 and "completed" in again.err
    nockpt = launch("--epochs", "2", "--quiet", name="nockpt")
    assert nockpt.finish() == 0
    (nockpt.run_dir / "summary.json").write_text(json.dumps({"status": "interrupted"}))
    again = Launch(tmp_path / "y", ["--resume", str(nockpt.run_dir)])
    assert again.finish() == 2 and "latest.json" in again.err
    missing = Launch(tmp_path / "z", ["--resume", str(tmp_path / "nothing")])
    assert missing.finish() == 2 and "not a run directory" in missing.err


@pytest.mark.slow
def test_a_run_directory_named_like_the_flag_is_not_a_resume(tmp_path):
    """Only the --resume option resumes; a path that merely contains the word
    once made launch.py crash looking for a checkpoint."""
    run_dir = tmp_path / "sweep--resume-1"
    done = run_launch("--in-process", "--epochs", "2", "--quiet", "--run-dir", str(run_dir))
    assert done.returncode == 0, done.stderr
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


# --- a layer's state, round trip --------------------------------------------

def make_layers():
    hid = hidden_layer(1, FAN_IN, 5, mode="cdni", activation="relu", lr=0.01, sg_lr=0.01,
                      label_dim=CLASSES, rng=np.random.default_rng(0), optimizer="adam",
                      sg_hidden=(6,), batchnorm=True)
    out = OutputLayer(2, 5, CLASSES, lr=0.01, rng=np.random.default_rng(1),
                      optimizer="adam", softmax=True)
    return hid, out


def drive(hid, out, seed, steps, start):
    rng = np.random.default_rng(seed)
    for t in range(start, start + steps):
        x = rng.standard_normal((B, FAN_IN))
        y = onehot(rng.integers(0, CLASSES, B))
        h, _ = hid.forward(t, x, y, need_dx=True)
        grad, _, _ = out.train_step(h, y, need_dx=True)
        assert hid.receive(t, grad)
        hid.apply_ready(need_dx=True)


def test_checkpoint_round_trip_restores_adam_state():
    a_hid, a_out = make_layers()
    drive(a_hid, a_out, seed=10, steps=4, start=0)
    states = [layer_state(a_hid), layer_state(a_out)]
    assert any(k.startswith("sg_opt.") for k in states[0][1])

    b_hid, b_out = make_layers()
    for layer, (meta, arrays) in zip((b_hid, b_out), states):
        load_layer_state(layer, meta, arrays)
    c_hid, c_out = make_layers()  # the plain weights only: fresh Adam moments and counts
    for layer, (_, arrays) in zip((c_hid, c_out), states):
        for k, value in arrays.items():
            if "." not in k:
                layer.weights()[k][...] = value
    for hid, out in ((a_hid, a_out), (b_hid, b_out), (c_hid, c_out)):
        drive(hid, out, seed=11, steps=3, start=4)

    differs = False
    for a, b, c in ((a_hid, b_hid, c_hid), (a_out, b_out, c_out)):
        assert set(a.weights()) == set(b.weights())
        for k in a.weights():
            assert np.array_equal(a.weights()[k], b.weights()[k]), k
            differs |= not np.array_equal(a.weights()[k], c.weights()[k])
        assert (b.clock, b.step) == (a.clock, a.step)
    assert b_hid.sg_version == a_hid.sg_version
    assert differs, "without the Adam state the runs should part"


def make_remedied(mode: str, **kw):
    remedies = (dict(sg_boost=0.5, lr_staleness=0.5, sg_lookahead=1.0) if mode == "cdni"
                else dict(lr_staleness=0.5, delay_comp=0.5))
    hid = hidden_layer(1, FAN_IN, 5, mode=mode, activation="relu", lr=0.05, sg_lr=0.02,
                      label_dim=CLASSES, rng=np.random.default_rng(0), optimizer="sgd",
                      momentum=0.9, **{**remedies, **kw})
    out = OutputLayer(2, 5, CLASSES, lr=0.05, rng=np.random.default_rng(1), optimizer="sgd",
                      softmax=True, momentum=0.9)
    return hid, out


def drive_late(hid, out, seed, steps, start, late=2):
    """Each true gradient reaches the layer ``late`` steps after its batch;
    the ones still out arrive at the end, so nothing is pending after."""
    rng = np.random.default_rng(seed)
    held = []
    for t in range(start, start + steps):
        x = rng.standard_normal((B, FAN_IN))
        y = onehot(rng.integers(0, CLASSES, B))
        h, _ = hid.forward(t, x, y, need_dx=True)
        grad, _, _ = out.train_step(h, y, need_dx=True)
        held.append((t, grad))
        if len(held) > late:
            b, g = held.pop(0)
            assert hid.receive(b, g)
            hid.apply_ready(need_dx=True)
    for b, g in held:
        assert hid.receive(b, g)
        hid.apply_ready(need_dx=True)
    assert not hid.pending


@pytest.mark.parametrize("mode", ["cdni", "async-backprop"])
def test_checkpoint_round_trip_carries_the_staleness_remedies_state(mode):
    """The running staleness, the SG module's drift and the momentum buffers
    come back from a checkpoint: the restored layer goes on exactly as the
    original; one given the weights alone parts from it."""
    a_hid, a_out = make_remedied(mode)
    drive_late(a_hid, a_out, seed=20, steps=6, start=0)
    assert a_hid.tau_bar > 0
    states = [layer_state(a_hid), layer_state(a_out)]
    assert any(k.startswith("opt.") and k.endswith(".buf") for k in states[0][1])
    if mode == "cdni":
        assert any(k.startswith("sg_drift.") for k in states[0][1])
    b_hid, b_out = make_remedied(mode)
    for layer, (meta, arrays) in zip((b_hid, b_out), states):
        load_layer_state(layer, meta, arrays)
    assert b_hid.tau_bar == a_hid.tau_bar
    c_hid, c_out = make_remedied(mode)
    for layer, (_, arrays) in zip((c_hid, c_out), states):
        for k, value in arrays.items():
            if "." not in k:
                layer.weights()[k][...] = value
    for hid, out in ((a_hid, a_out), (b_hid, b_out), (c_hid, c_out)):
        drive_late(hid, out, seed=21, steps=4, start=6)
    _assert_restored_goes_on(a_hid, b_hid, c_hid)


def _assert_restored_goes_on(never_stopped, restored, without):
    """The restored layer went on bit for bit as the one never stopped; the
    one restored without what the checkpoint keeps did not (the check can fail)."""
    for k in never_stopped.weights():
        assert np.array_equal(never_stopped.weights()[k], restored.weights()[k]), k
    assert any(not np.array_equal(never_stopped.weights()[k], without.weights()[k])
               for k in never_stopped.weights())


def make_delayed():
    hid = hidden_layer(1, FAN_IN, 5, mode="cdni", activation="relu", lr=0.05, sg_lr=0.02,
                      label_dim=CLASSES, rng=np.random.default_rng(0), grad_delay=2,
                      sg_hidden=(6,))
    out = OutputLayer(2, 5, CLASSES, lr=0.05, rng=np.random.default_rng(1), softmax=True)
    return hid, out


def test_checkpoint_keeps_the_gradients_not_yet_due_and_the_restored_layer_goes_on_exactly():
    a_hid, a_out = make_delayed()
    drive(a_hid, a_out, seed=30, steps=5, start=0)  # every gradient in; two not yet due
    assert sorted(a_hid.arrived) == [3, 4]
    meta, arrays = layer_state(a_hid)
    assert meta["expired"] == 0 and [e[0] for e in meta["pending"]] == [3, 4]
    assert {k for k in arrays if k.startswith("pending.")} == {
        f"pending.{i}.{n}" for i in (0, 1) for n in ("act0", "act1", "pred", "grad")}
    b_hid, b_out = make_delayed()
    load_layer_state(b_hid, meta, arrays)
    load_layer_state(b_out, *layer_state(a_out))
    c_hid, c_out = make_delayed()  # without the pending batches: as a resume used to be
    load_layer_state(c_hid, {**meta, "pending": []},
                     {k: v for k, v in arrays.items() if not k.startswith("pending.")})
    load_layer_state(c_out, *layer_state(a_out))
    for hid, out in ((a_hid, a_out), (b_hid, b_out), (c_hid, c_out)):
        drive(hid, out, seed=31, steps=3, start=5)
    _assert_restored_goes_on(a_hid, b_hid, c_hid)
    assert b_hid.stats.true_gradients == a_hid.stats.true_gradients


@pytest.mark.parametrize("damage, says", [
    (lambda m, a: a.update({"pending.0.grad": a["pending.0.grad"][:, :2]}), "shapes"),
    (lambda m, a: a.update({"pending.1.pred": a["pending.1.pred"].astype(np.float32)}),
     "shapes"),
    (lambda m, a: a.update({"pending.7.grad": a["pending.0.grad"]}), "no pending batch"),
    (lambda m, a: a.pop("pending.1.act1"), "pending.1.act1"),
    (lambda m, a: m["pending"][0].__setitem__(1, 99), "pending entry 0"),
    (lambda m, a: m["pending"][1].__setitem__(0, m["pending"][0][0]), "pending entry 1"),
    (lambda m, a: m.__setitem__("pending", {"0": 1}), "must be a list"),
])
def test_a_damaged_pending_batch_is_refused(damage, says):
    hid, out = make_delayed()
    drive(hid, out, seed=32, steps=5, start=0)
    meta, arrays = layer_state(hid)
    damage(meta, arrays)
    with pytest.raises((ValueError, KeyError), match=says):
        load_layer_state(make_delayed()[0], meta, arrays)


@pytest.mark.parametrize("mode", ["backprop", "async-backprop"])
def test_checkpoint_round_trip_of_a_layer_without_sg_module(mode):
    """A backprop layer has no SG module: its checkpoint loads all the same."""
    def make():
        return hidden_layer(1, 4, 3, mode=mode, activation="relu", lr=0.1, sg_lr=0.1,
                           label_dim=2, rng=np.random.default_rng(0), optimizer="adam")
    rng = np.random.default_rng(2)
    a, b = make(), make()
    a.forward(0, rng.standard_normal((5, 4)), None, need_dx=False)
    a.receive(0, rng.standard_normal((5, 3)))
    a.apply_ready(need_dx=False)
    load_layer_state(b, *layer_state(a))
    for name, value in a.weights().items():
        assert np.array_equal(b.weights()[name], value), name
    assert (b.clock, b.step, b.sg_version) == (a.clock, a.step, 0)


# --- a checkpoint is checked whole before any process starts ---------------------------

def checkpointed_run(path, **kw):
    """A run directory with a committed checkpoint after epoch 1 of a 3-layer
    run, written as the coordinator writes one (the states of fresh layers)."""
    from pipeline.layers.state import layer_state
    from pipeline.layers.build import make_hidden, make_output
    from pipeline.run.rundir import RunDir
    cfg = Config(epochs=5, checkpoint_every=2, **kw)
    rd = RunDir(path)
    rd.write_json("config.json", {"run_id": "r", "config": cfg.to_dict()})
    for index in (1, 2, 3):
        layer = make_output(cfg) if index == 3 else make_hidden(cfg, index)
        role = "output" if index == 3 else f"layer{index}"
        rd.write_checkpoint(2, role, *layer_state(layer))
    rd.commit_checkpoint(2)
    rd.write_json("summary.json", {"status": "interrupted"})
    rd.close()
    return path


def test_a_whole_checkpoint_resumes_after_its_epoch(tmp_path):
    from pipeline.run.resume import resume_config
    cfg, states = resume_config(checkpointed_run(tmp_path / "run"), quiet=True)
    assert cfg.start_epoch == 2 and sorted(states) == ["layer1", "layer2", "output"]


def _npz(path, role):
    return path / "checkpoints" / "epoch-000002" / f"{role}.npz"


def _rewrite(path, role, change):
    with np.load(_npz(path, role)) as z:
        arrays = {k: z[k] for k in z.files}
    change(arrays)
    np.savez(_npz(path, role), **arrays)


@pytest.mark.parametrize("damage, says", [
    (lambda p: _npz(p, "layer1").write_bytes(_npz(p, "layer1").read_bytes()[:200]),
     "layer1: unreadable"),
    (lambda p: (p / "checkpoints" / "latest.json").write_text('{"epoch": 1}'),
     "must name an epoch and its directory"),
    (lambda p: (p / "checkpoints" / "latest.json").write_text(
        '{"epoch": 1, "dir": "../../elsewhere"}'), "must name an epoch and its directory"),
    (lambda p: (p / "checkpoints" / "latest.json").write_text("[1"), "unreadable"),
    (lambda p: _rewrite(p, "layer1", lambda a: a.update(w=a["w"][:1])), "layer1.w is"),
    (lambda p: _rewrite(p, "layer2", lambda a: a.update(b=np.float64(0.5))), "layer2.b is"),
    (lambda p: _rewrite(p, "output", lambda a: a["w"].__setitem__((0, 0), np.nan)), "inf or NaN"),
    (lambda p: _rewrite(p, "layer1", lambda a: a.pop("sg_v")), "has arrays"),
    (lambda p: _rewrite(p, "layer1", lambda a: a.update(w=a["w"].astype(np.float32))),
     "float32"),
    (lambda p: (p / "checkpoints" / "epoch-000002" / "layer2.json").write_text('{"clock": 3}'),
     "layer2.json: step is missing"),
    (lambda p: (p / "config.json").write_text("{"), "config.json: unreadable"),
])
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_what(tmp_path, damage, says):
    from pipeline.run.resume import resume_config
    path = checkpointed_run(tmp_path / "run")
    damage(path)
    with pytest.raises(ValueError, match=says):
        resume_config(path, quiet=True)


@pytest.mark.slow
def test_launch_refuses_a_damaged_checkpoint_before_starting_anything(tmp_path):
    path = checkpointed_run(tmp_path / "run")
    _rewrite(path, "layer1", lambda a: a.update(w=a["w"][:1]))
    done = run_launch("--resume", str(path))
    assert done.returncode == 2 and done.stderr.startswith("launch.py: error: argument --resume")
    assert len(done.stderr.splitlines()) == 1 and not (path / "weights").exists()


# --- a checkpoint's JSON, every field bounded and typed ---------------------------------

def _set_field(path, role: str, field: str, value) -> None:
    f = path / "checkpoints" / "epoch-000002" / f"{role}.json"
    meta = json.loads(f.read_text())
    meta[field] = value
    f.write_text(json.dumps(meta))  # NaN as JSON's NaN, as Python writes and reads it


@pytest.mark.parametrize("role, field, value, says", [
    ("layer1", "step", 1e30, "layer1.json: step must be an integer"),
    ("layer2", "tau_bar", math.nan, "layer2.json: tau_bar must be a finite number"),
    ("output", "clock", 2 ** 66, "output.json: clock must be an integer"),
    ("layer1", "update_rng", json.dumps({"bit_generator": "PCG64", "has_uint32": 0,
                                         "uinteger": 0, "state": {"state": 2 ** 200, "inc": 1}}),
     "layer1.json: update_rng.state.state must be an integer"),
    ("layer2", "expired", -1, "layer2.json: expired must be an integer"),
    ("layer1", "extra", 1, "layer1.json: extra is not a field"),
], ids=["step-1e30", "tau-bar-nan", "clock-2**66", "rng-200-bits", "expired-negative", "extra"])
def test_a_checkpoint_field_out_of_bounds_is_refused_naming_the_file_and_field(
        tmp_path, role, field, value, says):
    """The first two once started the run, which ended "taken for dead" or
    "diverged"; a generator state too large was a traceback."""
    from pipeline.run.resume import resume_config
    path = checkpointed_run(tmp_path / "run")
    _set_field(path, role, field, value)
    with pytest.raises(ValueError, match=says) as info:
        resume_config(path, quiet=True)
    assert str(path / "checkpoints" / "epoch-000002") in str(info.value)


def _leaves(value, path=""):
    """(path, container, key) of every leaf of a layer's state, the fields of
    the generator states (JSON text) included."""
    items = value.items() if isinstance(value, dict) else (
        enumerate(value) if isinstance(value, list) else ())
    for k, v in items:
        at = f"{path}.{k}" if path else str(k)
        if isinstance(v, (dict, list)) and v:
            yield from _leaves(v, at)
        elif not isinstance(v, (dict, list)):
            yield at, value, k


def _states():
    """Every kind of state a layer writes: SGD and Adam, cDNI with pending
    batches, unlocked layers (synthetic inputs), the output layer."""
    hid, out = make_delayed()
    drive(hid, out, seed=33, steps=5, start=0)
    yield "delayed", layer_state(hid)[0]
    yield "output", layer_state(out)[0]
    from pipeline.layers.build import make_hidden, make_output
    cfg = Config(optimizer="adam", unlock="forward", sg_lookahead=1.0)
    yield "unlocked", layer_state(make_hidden(cfg, 2))[0]
    yield "unlocked-output", layer_state(make_output(cfg))[0]


BAD = [1e30, math.nan, math.inf, 2 ** 66, -1, 2.5, "x", None, True, [], {}]


@pytest.mark.parametrize("name", ["delayed", "output", "unlocked", "unlocked-output"])
def test_every_field_of_a_layer_state_is_checked(name):
    """Each leaf of a real state, set to each kind of bad value, is refused
    naming its path; inside a generator's state (JSON text) too."""
    from pipeline.layers.state import check_meta
    like = dict(_states())[name]
    check_meta(copy.deepcopy(like), like)
    leaves = list(_leaves(like))
    assert {"clock", "step", "stats.forward_batches"} <= {p for p, _, _ in leaves}
    for at, box, key in leaves:
        # an entry of a list is named by its place and then its own name
        named = at.rsplit(".", 1)[0] + "." if isinstance(box, list) else at
        for bad in BAD:
            if isinstance(box[key], float) and bad == 2.5:
                continue  # a fine value of a number
            meta = copy.deepcopy(like)
            for path, inner, k in _leaves(meta):
                if path == at:
                    inner[k] = bad
            with pytest.raises(ValueError, match=re.escape(named)):
                check_meta(meta, like)
    for key in ("update_rng", "drop_rng"):
        if key not in like:
            continue
        for at, _, _ in _leaves(json.loads(like[key]), key):
            for bad in (2 ** 200, -1, 1.5, "x", None):
                state = json.loads(like[key])
                for path, box, k in _leaves(state, key):
                    if path == at:
                        box[k] = bad
                with pytest.raises(ValueError, match=re.escape(at)):
                    check_meta({**like, key: json.dumps(state)}, like)


def test_histograms_take_any_staleness_but_bounded_counts():
    from pipeline.layers.state import check_meta
    hid, out = make_delayed()
    drive(hid, out, seed=34, steps=5, start=0)
    like = layer_state(hid)[0]
    check_meta({**like, "stats": {**like["stats"], "staleness_hist": {"0": 3, "17": 2}}}, like)
    for hist, says in [({"-1": 1}, "staleness_hist.-1"), ({"x": 1}, "staleness_hist.x"),
                       ({"\u00b2": 1}, "staleness_hist.\u00b2"),  # a digit to isdigit, not to int
                       ({b"3": 1}, "staleness_hist.b'3'"),  # msgpack from a peer: bytes keys
                       ({"3": 1.5}, "staleness_hist.3"),
                       ({str(i): 2 ** 52 for i in range(3)}, "the sum of stats.staleness_hist")]:
        with pytest.raises(ValueError, match=re.escape(says)):
            check_meta({**like, "stats": {**like["stats"], "staleness_hist": hist}}, like)
    with pytest.raises(ValueError, match="b'x' is not a field"):
        check_meta({**like, b"x": 1}, like)  # unsortable beside str keys: still one ValueError


@pytest.mark.slow
def test_launch_refuses_a_step_of_1e30_before_starting_anything(tmp_path):
    path = checkpointed_run(tmp_path / "run")
    _set_field(path, "layer1", "step", 1e30)
    line = error_line(run_launch("--resume", str(path)))
    assert line.startswith("launch.py: error: argument --resume: checkpoint ")
    assert "layer1.json: step must be an integer" in line
    assert not (path / "weights").exists()
