"""--unlock forward end to end: the --lockstep pipeline against the
in-process reference, bit for bit, with and without an input delay and a
second step; the free-running pipeline completes; checkpoints carry the
synthetic-input models, and a resumed run ends as the uninterrupted one."""
from __future__ import annotations

import signal

import numpy as np
import pytest

from pipeline.config import Config, defaults_for
from pipeline.run.cli import parse
from tests.kit import reference
from tests.conftest import Launch, assert_no_orphans
from tests.test_checkpoint import latest
from tests.oracle import max_diff, plain_unlocked_dni
from tests.test_pipeline import assert_bit_identical, reference_weights

pytestmark = pytest.mark.timeout(120)

SMALL = dict(epochs=12, layers=4, hidden=(32, 24, 16), seed=7, examples=37, batch_size=8)


def argv(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if v is True:
            out.append(flag)
        else:
            out += [flag, ",".join(map(str, v)) if isinstance(v, tuple) else str(v)]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    dict(mode="cdni"),
    dict(mode="dni", grad_delay=2, input_delay=1, drop_prob=0.1, update_prob=0.8),
    dict(mode="cdni", grad_delay=2, input_delay=2, si_second_step=True, si_lr=0.05),
    dict(mode="cdni", unlock="hidden", grad_delay=1, input_delay=1, si_second_step=True),
    dict(mode="cdni", grad_delay=1, input_delay=1, si_second_step=True, layernorm=True),
    dict(mode="cdni", grad_delay=2, input_delay=1, si_second_step=True, batchnorm=True),
    # checkpoint barriers: the forward delay stops at each (the reference
    # takes the same barriers; nothing is saved there)
    dict(mode="cdni", grad_delay=2, input_delay=2, checkpoint_every=2),
])
def test_lockstep_unlocked_pipeline_equals_reference_bit_for_bit(launch, extra):
    kw = {**SMALL, "unlock": "forward", **extra}
    run = launch("--lockstep", "--quiet", *argv(**kw))
    assert run.finish() == 0, run.err
    cfg = Config(**{**defaults_for("addition", "forward"), **kw})  # as the command line
    ref = reference(cfg)
    expected = reference_weights(cfg)
    # every unlocked layer carries its synthetic-input model, and it learnt
    unlocked = ["layer2", "layer3"] + (["output"] if cfg.unlock == "forward" else [])
    assert [r for r, a in expected.items() if "si_u" in a] == unlocked
    assert all(expected[r]["si_u"].any() for r in unlocked)
    assert_bit_identical(run, expected)
    s = run.summary()
    assert s["status"] == "completed"
    assert (s["final_loss"], s["train_accuracy"]) == (ref.final_loss, ref.train_accuracy)
    batches, k, bpe = cfg.total_batches, cfg.input_delay, cfg.batches_per_epoch
    # Forward staleness: exactly K steps, but for the last K batches before
    # a checkpoint barrier or the end, whose true inputs are taken early.
    every = cfg.checkpoint_every
    stops = [(e + 1) * bpe - 1 for e in range(cfg.epochs - 1)
             if every and (e + 1) % every == 0] + [batches - 1]
    hist: dict[str, int] = {}
    for b in range(batches):
        tau = str(min(k, min(s for s in stops if s >= b) - b))
        hist[tau] = hist.get(tau, 0) + 1
    for layer, ref_layer in zip(s["layers"], [*ref.hidden, ref.output]):
        assert layer["forward_batches"] == batches
        assert layer["decode_errors"] == 0
        if layer["role"] not in unlocked:
            assert "si_quality" not in layer
            continue
        assert layer["true_inputs"] == batches and layer["expired_inputs"] == 0
        assert layer["input_staleness_hist"] == dict(sorted(hist.items(), key=lambda i: int(i[0])))
        # the synthetic inputs' quality: the reference's figures, to the bit
        assert layer["si_quality"] == ref_layer.stats.as_dict()["si_quality"]
        assert layer["si_quality"]["cosine"]["mean"] > 0.5


@pytest.mark.parametrize("kw", [
    dict(unlock="forward"),
    dict(unlock="forward", grad_delay=3, input_delay=2, si_second_step=True, si_lr=0.05),
    dict(unlock="forward", si_second_step=True, si_output_scale=0.3),  # --unlock's defaults
    dict(unlock="hidden", mode="dni", grad_delay=1, input_delay=1, activation="relu",
         lr=0.1),
    dict(unlock="forward", layers=2, hidden=(12,), grad_delay=2, input_delay=1),
])
def test_unlocked_reference_equals_plain_numpy_loop(kw):
    """The reference's nodes under --unlock against ``oracle.plain_unlocked_dni``,
    a loop over steps written without pipeline/: every weight, SG module and
    synthetic-input model."""
    cfg = Config(**{**dict(epochs=6, layers=4, hidden=(16, 12, 8), examples=25, seed=3),
                    **kw, "lockstep": True})
    layers, (wo, bo), sgs, si = plain_unlocked_dni(cfg)
    res = reference(cfg)
    for (w, b), (v, c), layer in zip(layers, sgs, res.hidden):
        for got, want in ((layer.w, w), (layer.b, b), (layer.v, v), (layer.c, c)):
            assert max_diff(got, want) <= 1e-12, layer.index
        assert np.abs(v).max() > 0
    assert max_diff(res.output.w, wo) <= 1e-12 and max_diff(res.output.b, bo) <= 1e-12
    models = {L.index: L.si.model for L in [*res.hidden, res.output] if L.si is not None}
    assert sorted(models) == sorted(si)
    for k, (u, ub) in si.items():
        assert max_diff(models[k].u, u) <= 1e-12 and max_diff(models[k].b, ub) <= 1e-12
        assert np.abs(u).max() > 0, k


def test_unlocking_changes_the_weights_of_the_layers_above_the_first_only():
    # The same seeds, locked and unlocked: layer 1 sees the same inputs but
    # different gradients (from an unlocked layer 2), so it differs too; the
    # check is that unlocking reaches every layer above and changes the run.
    locked = reference_weights(Config(**SMALL))
    unlocked = reference_weights(Config(**SMALL, unlock="forward"))
    for role in ("layer2", "layer3", "output"):
        assert not (locked[role]["w"] == unlocked[role]["w"]).all()
        assert "si_u" in unlocked[role] and "si_u" not in locked[role]
    assert "si_u" not in unlocked["layer1"]


@pytest.mark.slow  # no process, but seconds a seed
@pytest.mark.timeout(300)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_unlock_forward_learns_the_addition_task_with_its_defaults(seed):
    """--unlock forward and nothing else (so UNLOCK_DEFAULTS: the second
    step, the output layer's synthetic step at 0.3 of --lr) gets every sum
    right, under the lockstep schedule (docs/unlock.md has the search)."""
    cfg = parse(["--unlock", "forward", "--lockstep", "--seed", str(seed)])
    assert (cfg.si_second_step, cfg.si_output_scale) == (True, 0.3)
    assert reference(cfg).train_accuracy == 1.0


@pytest.mark.slow
def test_free_running_unlocked_pipeline_completes(launch):
    kw = dict(SMALL, epochs=30, unlock="forward", grad_delay=1, input_delay=1)
    run = launch("--quiet", *argv(**kw))
    assert run.finish() == 0, run.err
    assert "synthetic inputs (mean over training): layer2 cos" in run.out
    s = run.summary()
    assert s["status"] == "completed"
    for layer in s["layers"]:
        assert layer["forward_batches"] == Config(**kw).total_batches
        assert layer["decode_errors"] == 0


# --- checkpoints and resume ---------------------------------------------------------

def test_unlocked_checkpoint_round_trip_restores_the_input_models_state():
    """Layer 2 and the output layer of an unlocked Adam run, driven by the
    reference's nodes: their state taken and loaded into fresh layers goes
    on exactly; without the SI optimiser's state it parts."""
    from pipeline.math import optim
    from pipeline.layers.state import layer_state, load_layer_state
    from pipeline.layers.build import make_hidden, make_output
    from tests.kit import (synthetic_forward, synthetic_output_step, true_input_arrives,
                           true_output_input)
    cfg = Config(layers=3, hidden=(6, 5), unlock="forward", optimizer="adam", lr=0.01,
                 sg_lr=0.01, si_second_step=True, seed=3)
    rng = np.random.default_rng(4)
    d = cfg.dims

    def drive(hid, out, start, steps):
        for t in range(start, start + steps):
            x = rng.uniform(size=(4, d[0]))
            y = (rng.uniform(size=(4, d[-1])) > 0.5).astype(np.float64)
            h1 = rng.standard_normal((4, d[1]))
            synthetic_forward(hid, hid.si, t, x, y)
            synthetic_output_step(out, out.si, t, x, y)
            _, h2, _ = true_input_arrives(hid, hid.si, t, h1, y, need_dx=True, second_step=True)
            _, dz, _, _ = true_output_input(out, out.si, t, h2, y, need_dx=True,
                                            second_step=True)
            assert hid.receive(t, dz)
            hid.apply_ready(need_dx=True)

    a = (make_hidden(cfg, 2), make_output(cfg))
    drive(*a, 0, 4)
    states = [layer_state(L) for L in a]
    assert all({"si_opt.si_u.m", "si_opt.si_b.v"} <= set(arrays) for _, arrays in states)
    assert all(meta["si_version"] == 4 for meta, _ in states)
    b = (make_hidden(cfg, 2), make_output(cfg))
    c = (make_hidden(cfg, 2), make_output(cfg))
    for L, M, (meta, arrays) in zip(b, c, states):
        load_layer_state(L, meta, arrays)
        load_layer_state(M, meta, arrays)
        M.si.model.opt = optim.make("adam", M.si.model.params(), cfg.si_step)  # fresh moments
    seed = rng.bit_generator.state
    for layers in (a, b, c):
        rng.bit_generator.state = seed
        drive(*layers, 4, 3)
    for x, y, z in zip(a, b, c):
        for k in x.weights():
            assert np.array_equal(x.weights()[k], y.weights()[k]), k
        assert y.si.model.version == x.si.model.version == 7
        assert not np.array_equal(x.si.model.u, z.si.model.u)


@pytest.mark.slow
@pytest.mark.parametrize("delays", [{}, dict(grad_delay=2, input_delay=2)],
                         ids=["no-delay", "input-delay"])
def test_resumed_unlocked_run_equals_the_uninterrupted_run_bit_for_bit(launch, delays):
    """With an input delay the true inputs still owed at a barrier are taken
    there (schedule.input_stop), so a checkpoint never holds a guess; the
    gradients not yet due are kept in it (schedule.barrier_passes)."""
    args = ["--lockstep", "--epochs", "40", "--checkpoint-every", "10", "--seed", "6",
            "--update-prob", "0.8", "--unlock", "forward", "--si-second-step", "--quiet",
            *argv(**delays)]
    run = launch(*args)
    run.wait_started()
    run.wait_for(lambda: (latest(run) or 0) >= 9, "a checkpoint after epoch 10")
    run.proc.send_signal(signal.SIGINT)
    assert run.finish(timeout=10) == 130
    ck = latest(run)
    assert ck is not None and ck < 39
    d = run.run_dir / "checkpoints" / f"epoch-{ck:06d}"
    for role in ("layer2", "output"):
        with np.load(d / f"{role}.npz") as z:
            assert {"si_u", "si_b"} <= set(z.files)
    resumed = Launch(run.run_dir, ["--resume", str(run.run_dir), "--quiet"])
    try:
        assert resumed.finish(timeout=60) == 0, resumed.err
    finally:
        resumed.kill()
    s = resumed.summary()
    assert s["status"] == "completed" and s["epochs_done"] == 40
    # the reference takes the same barriers: the forward delay stops at each
    cfg = Config(**{**defaults_for("addition", "forward"), **delays}, lockstep=True, epochs=40,
                 seed=6, update_prob=0.8, unlock="forward", checkpoint_every=10)
    assert_bit_identical(resumed, reference_weights(cfg))
    for layer in s["layers"]:  # the counters run on across the resume
        assert layer["forward_batches"] == cfg.total_batches
        if layer["role"] != "layer1":
            assert layer["true_inputs"] == cfg.total_batches
            assert layer["expired_inputs"] == 0
        if layer["role"] != "output":  # the last K, at the end of training
            assert layer["expired_gradients"] == cfg.grad_delay
    assert_no_orphans(resumed)
