"""Tests for pipeline.limits: a run too big for the machine is refused naming
the option that makes it so (the estimate's own arithmetic is in
test_tasks.py; the bounds of every number, in test_config.py)."""
from __future__ import annotations

import pytest

from pipeline import limits
from pipeline.config import Config, ConfigError

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("kw, option", [
    (dict(hidden=(200_000,)), "--hidden"),
    (dict(sg_hidden=(1_000_000,)), "--sg-hidden"),
    (dict(batch_size=10 ** 7, examples=10 ** 7), "--batch-size"),
    (dict(examples=10 ** 8), "--examples"),
    (dict(max_inflight=2 ** 20), "--max-inflight"),
    (dict(mode="async-backprop", grad_delay=2 ** 20), "--grad-delay"),
    # a file dataset's test split, read from the files --dataset names
    (dict(dataset="npz:x.npz", features=20, classes=3, test_examples=10 ** 9), "--dataset"),
    (dict(layers=60, hidden=(64,)), "--layers"),
], ids=["hidden", "sg-hidden", "batch-size", "examples", "max-inflight", "grad-delay",
        "test-split", "layers"])
def test_a_run_too_big_names_the_option_that_makes_it_so(kw, option, monkeypatch):
    """Each run is the addition task's with one size made large: that option is
    the one to name, whatever the others."""
    monkeypatch.setattr(limits, "available_bytes", lambda: 2 << 30)
    limits.check(Config())  # the addition task fits
    with pytest.raises(ConfigError, match="a run this size needs about") as info:
        limits.check(Config(**kw))
    assert info.value.option == option


def test_a_batch_larger_than_the_data_is_sized_as_the_data(monkeypatch):
    """Full-batch training states its batch size as anything at least the
    examples: no batch holds more than there are."""
    monkeypatch.setattr(limits, "available_bytes", lambda: 2 << 30)
    limits.check(Config(batch_size=2 ** 53))
    assert limits.run_bytes(Config(batch_size=10 ** 12)) == limits.run_bytes(Config(batch_size=100))
