"""--unlock forward end to end: the --lockstep pipeline against the
in-process reference, bit for bit, with and without an input delay and a
second step; the free-running pipeline completes."""
from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.reference import train_reference
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


@pytest.mark.parametrize("extra", [
    dict(mode="cdni"),
    dict(mode="dni", grad_delay=2, input_delay=1),
    dict(mode="cdni", grad_delay=2, input_delay=2, si_second_step=True, si_lr=0.05),
])
def test_lockstep_unlocked_pipeline_equals_reference_bit_for_bit(launch, extra):
    kw = dict(SMALL, unlock="forward", **extra)
    run = launch("--lockstep", "--quiet", *argv(**kw))
    assert run.finish() == 0, run.err
    cfg = Config(**kw)
    ref = train_reference(cfg)
    expected = reference_weights(cfg)
    # every layer above the first carries its synthetic-input model, and it learnt
    assert [r for r, a in expected.items() if "si_u" in a] == ["layer2", "layer3", "output"]
    assert all(expected[r]["si_u"].any() for r in ("layer2", "layer3", "output"))
    assert_bit_identical(run, expected)
    s = run.summary()
    assert s["status"] == "completed"
    assert (s["final_loss"], s["train_accuracy"]) == (ref.final_loss, ref.train_accuracy)
    batches, k = cfg.total_batches, cfg.input_delay
    # Forward staleness: exactly K steps, but for the last K batches, whose
    # true inputs the end of training takes early (schedule.input_stop).
    hist = {str(k): batches - k, **{str(j): 1 for j in range(k)}}
    for layer, ref_layer in zip(s["layers"], [*ref.hidden, ref.output]):
        assert layer["forward_batches"] == batches
        assert layer["decode_errors"] == 0
        if layer["role"] == "layer1":
            assert "si_quality" not in layer
            continue
        assert layer["true_inputs"] == batches and layer["expired_inputs"] == 0
        assert layer["input_staleness_hist"] == dict(sorted(hist.items(), key=lambda i: int(i[0])))
        # the synthetic inputs' quality: the reference's figures, to the bit
        assert layer["si_quality"] == ref_layer.stats.as_dict()["si_quality"]
        assert layer["si_quality"]["cosine"]["mean"] > 0.5


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
