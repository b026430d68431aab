"""Classification data through the process pipeline: a small synthetic
problem the tests make, learnt in every mode, evaluated on its test split
after every epoch, and, under --lockstep, bit-identical to the in-process
reference with every new option on (Adam, batch norm, a hidden-layer SG
module, float32, reshuffled batches, a gradient delay, the staleness
remedies, SGD with momentum)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from pipeline.run import cli
from tests.kit import reference
from tests.conftest import kill_and_resume
from tests.test_pipeline import reference_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def blobs(path, seed: int = 0, train: int = 360, test: int = 180, classes: int = 4,
          features: int = 12) -> str:
    """Gaussian clusters around random centres: a problem a small net learns
    to well over 90 % in a few epochs, with a test split drawn apart."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, features)) * 2.0
    def draw(n):
        y = rng.integers(0, classes, n)
        return (centres[y] + rng.standard_normal((n, features))).astype(np.float32), y
    x_train, y_train = draw(train)
    x_test, y_test = draw(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


def assert_bit_identical(run, expected: dict[str, dict[str, np.ndarray]]) -> None:
    for role, arrays in expected.items():
        got = run.weights(role)
        assert sorted(got) == sorted(arrays), role
        for name, want in arrays.items():
            assert got[name].dtype == want.dtype, (role, name)
            bits = f"u{want.dtype.itemsize}"
            assert np.array_equal(got[name].view(bits), want.view(bits)), \
                f"{role}.{name} differs from the reference"


def epochs_of(run) -> list[dict]:
    lines = (run.run_dir / "metrics.jsonl").read_text().splitlines()
    return [e for e in map(json.loads, lines)
            if e.get("event") == "epoch" and e.get("role") == "output"]


@pytest.mark.parametrize("mode", ["cdni", "dni", "backprop", "async-backprop"])
def test_every_mode_learns_a_small_classification_problem(launch, tmp_path, mode):
    data = blobs(tmp_path / "blobs.npz")
    run = launch("--quiet", "--dataset", data, "--mode", mode, "--layers", "3",
                 "--hidden", "32", "--epochs", "12", "--batch-size", "16", "--lr", "0.003",
                 "--sg-lr", "0.001")
    assert run.finish() == 0, run.err
    s = run.summary()
    assert s["status"] == "completed" and s["dataset"] == data
    assert s["test_accuracy"] >= 0.9, s
    assert s["train_accuracy"] >= 0.9, s
    # The test split was evaluated after every epoch, through the pipeline.
    events = epochs_of(run)
    assert [e["epoch"] for e in events] == list(range(1, 13))
    assert all(0 <= e["test_accuracy"] <= 1 and e["test_loss"] > 0 for e in events)
    assert events[-1]["test_accuracy"] == s["test_accuracy"]
    assert events[-1]["test_accuracy"] > events[0]["test_accuracy"] or \
        events[0]["test_accuracy"] >= 0.9
    assert "test accuracy" in run.out
    cfg = json.loads((run.run_dir / "config.json").read_text())["config"]
    # The classification defaults: float32, Adam, ReLU with batch norm, reshuffled batches.
    assert (cfg["dtype"], cfg["optimizer"], cfg["activation"], cfg["shuffle"],
            cfg["batchnorm"]) == ("float32", "adam", "relu", True, True)
    assert (cfg["features"], cfg["classes"], cfg["examples"], cfg["test_examples"]) == \
        (12, 4, 360, 180)
    with np.load(run.run_dir / "weights" / "layer1.npz") as z:
        assert z["w"].dtype == np.float32


LOCKSTEP = ["--layers", "4", "--hidden", "16,12,8", "--epochs", "4", "--batch-size", "10",
            "--optimizer", "adam", "--lr", "0.003", "--sg-lr", "0.001", "--batchnorm",
            "--seed", "5", "--examples", "95"]


@pytest.mark.parametrize("extra", [
    ["--mode", "cdni", "--sg-hidden", "8", "--grad-delay", "1"],
    ["--mode", "dni", "--dtype", "float64"],
    ["--mode", "backprop"],
    ["--mode", "async-backprop", "--grad-delay", "2", "--no-shuffle"],
    # the staleness remedies, which a free-running layer applies from its own
    # running staleness: under lockstep that is the reference's too
    ["--mode", "cdni", "--grad-delay", "2", "--sg-boost", "0.5", "--lr-staleness", "0.5",
     "--sg-lookahead", "1"],
    ["--mode", "async-backprop", "--grad-delay", "2", "--delay-comp", "0.5",
     "--lr-staleness", "0.5"],
    ["--mode", "dni", "--optimizer", "sgd", "--momentum", "0.9", "--lr", "0.05",
     "--sg-lr", "0.01", "--grad-delay", "1", "--sg-lookahead", "1"],
    # complete unlock (float32, Adam, shuffled, a test split after every epoch)
    ["--no-batchnorm", "--unlock", "forward", "--grad-delay", "1", "--input-delay", "1",
     "--si-second-step"],
])
def test_lockstep_classification_equals_the_reference_bit_for_bit(launch, tmp_path, extra):
    data = blobs(tmp_path / "blobs.npz", seed=2)
    args = ["--dataset", data, *LOCKSTEP, *extra]
    run = launch("--lockstep", "--quiet", *args)
    assert run.finish() == 0, run.err
    cfg = cli.parse(["--lockstep", *args])
    ref = reference(cfg)
    assert_bit_identical(run, reference_weights(cfg))
    s = run.summary()
    assert (s["final_loss"], s["train_accuracy"]) == (ref.final_loss, ref.train_accuracy)
    assert (s["test_loss"], s["test_accuracy"]) == (ref.test_loss, ref.test_accuracy)
    # Every epoch's test evaluation, not just the last, saw the reference's weights.
    events = []
    reference(cfg, emit=lambda e: events.append(e) if e["event"] == "epoch" else None)
    assert [(e["test_loss"], e["test_accuracy"]) for e in epochs_of(run)] == \
        [(e["test_loss"], e["test_accuracy"]) for e in events]


def test_resume_with_adam_and_batchnorm_equals_the_uninterrupted_run(launch, tmp_path):
    data = blobs(tmp_path / "blobs.npz", seed=3, train=2000)
    args = ["--dataset", data, "--lockstep", "--quiet", "--epochs", "40", "--batch-size", "20",
            "--hidden", "16", "--batchnorm", "--sg-hidden", "8", "--checkpoint-every", "5",
            "--lr", "0.003", "--sg-lr", "0.001"]
    resumed = kill_and_resume(launch(*args), after_epoch=10)
    assert resumed.summary()["epochs_done"] == 40
    assert_bit_identical(resumed, reference_weights(cli.parse(args)))
