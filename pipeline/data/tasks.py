"""What a run trains on: the addition task or a classification dataset
from files, as arrays in the run's dtype (which examples make each batch is
``schedule.epoch_batches``).

Targets travel with the activations: the sum's bits for addition, one-hot
class labels for classification (cDNI conditions its SG modules on them).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from pipeline import limits
from pipeline.data import arithmetic as data, files as datasets
from pipeline.math import nn
from pipeline.config import Config, ConfigError


@dataclass(frozen=True)
class Task:
    x: np.ndarray                   # (examples, features) training inputs
    y: np.ndarray                   # (examples, outputs) training targets
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None


def _read(cfg: Config) -> dict[str, datasets.Split]:
    try:
        if cfg.dataset == "mnist":
            return datasets.load_mnist(cfg.data_dir)
        if cfg.dataset == "cifar10":
            return datasets.load_cifar10(cfg.data_dir)
        return datasets.load_npz(cfg.dataset.removeprefix("npz:"))
    except ValueError as exc:
        raise ConfigError("--dataset", str(exc)) from None


def resolve(cfg: Config, limit_examples: bool = True) -> Config:
    """Fill in what the data files say (input width, classes, split sizes),
    reading and checking them now, before any process starts, and check
    that the run fits the machine (``limits``). With
    ``limit_examples`` False, ``examples`` becomes the whole training split."""
    if not cfg.classification:
        limits.check(cfg)
        return cfg
    splits = _read(cfg)
    train, test = splits["train"], splits.get("test")
    # MNIST has ten classes whatever a file holds; an archive, as many as its labels name.
    classes = 10 if cfg.dataset in ("mnist", "cifar10") else int(
        max(train.y.max(), test.y.max() if test else 0)) + 1
    examples = cfg.examples if limit_examples else len(train.y)
    if examples > len(train.y):
        raise ConfigError("--examples", f"{cfg.dataset} has {len(train.y)} training examples, "
                                        f"asked for {examples}")
    if classes > limits.MAX_CLASSES:
        raise ConfigError("--dataset", f"{cfg.dataset}: labels name {classes} classes, more "
                                       f"than {limits.MAX_CLASSES}")
    cfg = dataclasses.replace(cfg, features=train.x.shape[1], classes=classes,
                              examples=examples, test_examples=len(test.y) if test else 0,
                              image=tuple(train.shape))
    limits.check(cfg)
    return cfg


def load(cfg: Config) -> Task:
    """The run's data, as resolved: the first ``examples`` training examples."""
    dt = cfg.np_dtype
    if not cfg.classification:
        x, y = data.addition(cfg.bits, cfg.examples, cfg.seed)
        return Task(x.astype(dt), y.astype(dt))
    splits = _read(cfg)
    train, test = splits["train"], splits.get("test")
    if train.x.shape[1] != cfg.features or len(train.y) < cfg.examples:
        raise ValueError(f"{cfg.dataset} changed since the run was configured: "
                         f"{train.x.shape} training inputs, expected {cfg.features} features "
                         f"and at least {cfg.examples} examples")
    x = train.x[:cfg.examples].astype(dt)
    y = nn.one_hot(train.y[:cfg.examples], cfg.classes, dt)
    if test is None:
        return Task(x, y)
    return Task(x, y, test.x.astype(dt), nn.one_hot(test.y, cfg.classes, dt))
