"""Tests for pipeline.run.learned: the rules that say a run did not learn, on
exact tables, and their sentences in summary.json's warnings and the closing
table."""
from __future__ import annotations

import pytest

from pipeline.config import Config
from pipeline.run import learned
from pipeline.run.summary import build_summary, table

pytestmark = pytest.mark.timeout(30)

MNIST = dict(dataset="mnist", data_dir="data", classes=10, features=784)


@pytest.mark.parametrize("accuracy, cfg, want", [
    (0.0, {}, True), (0.049, {}, True), (0.05, {}, False), (1.0, {}, False),   # addition
    (0.10, MNIST, True), (0.189, MNIST, True), (0.19, MNIST, False),            # 10 classes
    (0.549, {**MNIST, "classes": 2}, True), (0.55, {**MNIST, "classes": 2}, False),
    (0.0, {**MNIST, "classes": 0, "features": 0}, False)])  # classes not known: nothing to judge
def test_near_chance_table(accuracy, cfg, want):
    assert learned.near_chance(accuracy, Config(**cfg)) is want


@pytest.mark.parametrize("accuracy, cfg, want", [
    (0.049, {}, False), (0.05, {}, True), (0.62, {}, True), (0.899, {}, True),
    (0.9, {}, False), (0.5, MNIST, False)])  # no known target on a dataset
def test_in_part_table(accuracy, cfg, want):
    assert learned.in_part(accuracy, Config(**cfg)) is want


def test_chance_is_guessing():
    assert learned.chance(Config(**MNIST)) == 0.1
    assert learned.chance(Config(bits=8)) == 2 ** -9


def test_against_takes_the_last_epochs_cosine_below_zero():
    layers = [{"role": "layer1", "sg_tracking": {"last_cosine": -0.12}},
              {"role": "layer2", "sg_tracking": {"last_cosine": 0.0}},
              {"role": "layer3", "sg_tracking": {"last_cosine": None}},
              {"role": "output", "sg_tracking": None}]
    assert learned.against(layers) == [("layer1", -0.12)]


@pytest.mark.parametrize("cfg, sg_against, want", [
    ({"mode": "dni"}, False, ["--mode cdni", "a smaller --sg-lr (now 0.03)"]),
    ({"unlock": "forward"}, False, ["--si-second-step"]),
    ({"unlock": "forward", "si_second_step": True}, False,
     ["more --epochs (now 800)", "a smaller --lr (now 0.5)"]),
    ({}, True, ["a smaller --sg-lr (now 0.03)"]),
    ({"mode": "backprop"}, False, ["more --epochs (now 800)", "a smaller --lr (now 0.5)"])])
def test_what_to_try_table(cfg, sg_against, want):
    assert learned.tries(Config(**cfg), sg_against) == want


def _summary(cfg, accuracy, cosines=(), status="completed"):
    layers = [{"index": i + 1, "role": f"layer{i + 1}", "forward_batches": 10,
               "sg_updates": 10, "true_gradients": 10, "decode_errors": 0,
               "staleness_steps": {"mean": 0.0, "max": 0, "count": 10}} for i in range(2)]
    tracking = {f"layer{i + 1}": {"first_cosine": 0.5, "last_cosine": c}
                for i, c in enumerate(cosines)}

    class Watch:
        warnings = ["warning: staleness"]

        def tracking(self):
            return tracking
    return build_summary(cfg, status=status, run_id="r", wall_s=1.0, layers=layers,
                         final={"final_loss": 5.9, "train_accuracy": accuracy,
                                "batches": 8000, "train_s": 1.0},
                         epochs_done=cfg.epochs, watch=Watch())


def test_the_dni_run_on_addition_that_ended_at_no_sums_says_so_with_what_to_try():
    cfg = Config(mode="dni")
    s = _summary(cfg, 0.0, cosines=(-0.12, 0.3))
    assert s["warnings"] == [
        "warning: staleness",
        "warning: exact sums ended at 0.0 %, near none of the sums: this run did not learn; "
        "try --mode cdni or a smaller --sg-lr (now 0.03)",
        "warning: layer1's synthetic gradients pointed against the true ones in the last "
        "epoch (mean cosine -0.12): a step along them climbs the loss; "
        "try --mode cdni or a smaller --sg-lr (now 0.03)"]
    closing = table(s, "RUN")
    assert all(f"  {w}" in closing.splitlines() for w in s["warnings"])


def test_unlock_forward_ending_short_names_the_second_step():
    s = _summary(Config(unlock="forward"), 0.62, cosines=(0.79, 0.86))
    assert s["warnings"][1:] == [
        "warning: exact sums ended at 62.0 %, where the addition task's default run reaches "
        "100 %: this run learned it only in part; try --si-second-step"]


def test_a_classification_run_near_chance_names_chance():
    s = _summary(Config(**MNIST, lr=0.001), 0.1135, cosines=(0.2, 0.1))
    assert s["warnings"][1:] == [
        "warning: train accuracy ended at 11.3 %, near chance, 10.0 % for 10 classes: "
        "this run did not learn; try more --epochs (now 800) or a smaller --lr (now 0.001)"]


@pytest.mark.parametrize("status, accuracy", [("completed", 1.0), ("interrupted", 0.0),
                                              ("failed", 0.0), ("completed", None)])
def test_no_word_for_a_run_that_learned_or_did_not_finish(status, accuracy):
    s = _summary(Config(), accuracy, cosines=(0.5, 0.6), status=status)
    assert s["warnings"] == ["warning: staleness"]
