"""Convolutional layers across processes: under --lockstep every mode ends
bit for bit with the in-process reference, a killed run resumes to the same
bits, and a free-running run learns; the wire carries the image batches."""
from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest

from pipeline.run import cli
from tests.conftest import Launch, assert_no_orphans
from tests.kit import reference
from tests.test_classification import assert_bit_identical, epochs_of
from tests.test_pipeline import reference_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]


def images(path, seed: int = 0, train: int = 240, test: int = 80, side: int = 8,
           channels: int = 2) -> str:
    """Small images whose class (0..3) is the quadrant holding a bright
    blob, with noise: a problem a convolution and a pool learn fast."""
    rng = np.random.default_rng(seed)

    def draw(n):
        y = rng.integers(0, 4, n)
        x = rng.random((n, side, side, channels)).astype(np.float32) * 0.3
        half = side // 2
        for i, label in enumerate(y):
            r, c = divmod(int(label), 2)
            x[i, r * half:(r + 1) * half, c * half:(c + 1) * half, :] += 0.7
        return x, y
    x_train, y_train = draw(train)
    x_test, y_test = draw(test)
    np.savez(path, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    return f"npz:{path}"


SMALL = ["--conv", "4,6", "--kernel", "3", "--layers", "4", "--hidden", "12", "--epochs", "4",
         "--batch-size", "16", "--lr", "0.003", "--sg-lr", "0.003", "--seed", "5"]


@pytest.mark.parametrize("extra", [
    ["--mode", "cdni"],
    ["--mode", "dni", "--no-batchnorm", "--dtype", "float64"],
    ["--mode", "backprop"],
    ["--mode", "async-backprop", "--grad-delay", "2"],
    ["--mode", "cdni", "--grad-delay", "3", "--sg-boost", "0.5", "--lr-staleness", "0.5"],
    ["--mode", "cdni", "--conv", "3", "--layers", "2"],   # conv straight into the output layer
])
def test_lockstep_conv_equals_the_reference_bit_for_bit(launch, tmp_path, extra):
    data = images(tmp_path / "images.npz")
    args = ["--dataset", data, *SMALL, *extra]
    run = launch("--lockstep", "--quiet", *args)
    assert run.finish() == 0, run.err
    cfg = cli.parse(["--lockstep", *args])
    assert cfg.conv and len(cfg.shapes[1]) == 3        # image batches went over the wire
    assert_bit_identical(run, reference_weights(cfg))
    ref = reference(cfg)
    s = run.summary()
    assert (s["final_loss"], s["train_accuracy"]) == (ref.final_loss, ref.train_accuracy)
    assert (s["test_loss"], s["test_accuracy"]) == (ref.test_loss, ref.test_accuracy)


def test_free_running_cdni_conv_learns_and_reports_its_sg_cosine(launch, tmp_path):
    data = images(tmp_path / "images.npz", train=480)
    run = launch("--quiet", "--dataset", data, *SMALL, "--epochs", "6")
    assert run.finish() == 0, run.err
    s = run.summary()
    assert s["test_accuracy"] >= 0.9, s["test_accuracy"]     # chance is 0.25
    first = next(L for L in s["layers"] if L["role"] == "layer1")
    tracking = first["sg_tracking"]
    # The convolutional layer's SG module learned to point along its targets.
    assert tracking["last_cosine"] is not None and tracking["last_cosine"] > 0.1, tracking


def test_a_killed_conv_run_resumes_to_the_uninterrupted_runs_bits(launch, tmp_path):
    data = images(tmp_path / "images.npz", seed=1, train=640)
    args = ["--dataset", data, *SMALL, "--epochs", "12", "--lockstep", "--quiet",
            "--checkpoint-every", "2", "--grad-delay", "1"]
    run = launch(*args)
    run.wait_started()
    path = run.run_dir / "checkpoints" / "latest.json"
    run.wait_for(lambda: path.exists() and json.loads(path.read_text())["epochs_done"] >= 4,
                 "a checkpoint after epoch 4")
    os.kill(run.proc.pid, signal.SIGKILL)
    run.proc.wait(10)
    assert_no_orphans(run)
    resumed = Launch(run.run_dir, ["--resume", str(run.run_dir), "--quiet"])
    try:
        assert resumed.finish(timeout=120) == 0, resumed.err
    finally:
        resumed.kill()
    assert resumed.summary()["epochs_done"] == 12
    assert_bit_identical(resumed, reference_weights(cli.parse(args)))
    assert_no_orphans(resumed)
