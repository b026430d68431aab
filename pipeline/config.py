"""The one typed configuration of a run, with the checks that keep bad input out."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np

MODES = ("cdni", "dni", "backprop", "async-backprop")
SG_MODES = ("cdni", "dni")
ACTIVATIONS = ("sigmoid", "relu")
OPTIMIZERS = ("sgd", "adam")
DTYPES = ("float64", "float32")
DATASETS = ("addition", "mnist", "npz:PATH")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_hidden(layers: int) -> tuple[int, ...]:
    """The seed's widths, 128 then 64, the last repeated for deeper nets."""
    return tuple(([128] + [64] * max(0, layers - 2))[: max(1, layers - 1)])


# What a classification run uses where the command line or cluster file says
# nothing: the paper's feed-forward MNIST setting (256-unit ReLU layers with
# batch normalisation, Adam, batches of 256), float32, with a learning rate and
# length that fit a laptop. Batch normalisation is what keeps cDNI with Adam
# accurate when its feedback is stale (docs/staleness-mnist.md): without it,
# 8 steps of delay took 3-layer MNIST from 98.0 to 30 % test accuracy.
CLASSIFICATION_DEFAULTS = {"activation": "relu", "hidden": (256,), "epochs": 10,
                           "batch_size": 256, "lr": 1e-3, "sg_lr": 1e-3,
                           "optimizer": "adam", "dtype": "float32", "shuffle": True,
                           "batchnorm": True}


def defaults_for(dataset: str) -> dict:
    """The defaults of the options that depend on the task."""
    return {} if dataset == "addition" else dict(CLASSIFICATION_DEFAULTS)


def flag(field: str) -> str:
    """The command-line flag a Config field comes from."""
    return {"link_delay_ms": "--link-delay", "link_jitter_ms": "--link-delay",
            "features": "--dataset", "classes": "--dataset",
            "test_examples": "--dataset"}.get(field, "--" + field.replace("_", "-"))


class ConfigError(ValueError):
    """A bad setting; ``option`` names the command-line flag it came from."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


@dataclass(frozen=True)
class Config:
    # network ---------------------------------------------------------------
    layers: int = 3                   # weight layers, output layer included (seed: 3)
    hidden: tuple[int, ...] = (128, 64)  # hidden widths; one number repeats
    activation: str = "sigmoid"       # hidden non-linearity (seed: sigmoid)
    mode: str = "cdni"                # cdni solves the seed task; plain dni learns it slowly
    # training ----------------------------------------------------------------
    epochs: int = 800                 # passes over the training set
    batch_size: int = 10              # seed: 10
    lr: float = 0.5                   # layer SGD step on the batch-mean loss (seed: 0.05 on the sum of 10)
    sg_lr: float = 0.03               # SG module step; at the layer lr it diverges
    seed: int = 1                     # data, initial weights: every random draw
    optimizer: str = "sgd"            # sgd or adam, for every layer and SG module (each its own state)
    momentum: float = 0.0             # sgd: heavy-ball momentum (0: plain SGD); Adam has its own
    sg_hidden: tuple[int, ...] = ()   # hidden ReLU widths of the SG modules; () is linear
    sg_refresh: bool = True           # recompute a stale SG prediction before training on it
    batchnorm: bool = False           # batch normalisation in the hidden layers (Linear, BN, f)
    dtype: str = "float64"            # arrays in the math and on the wire
    # staleness remedies (pipeline.staleness), each off at 0 --------------------------------
    sg_boost: float = 0.0             # two timescales: an SG step on a target tau steps stale is (1 + A*tau) x sg_lr
    lr_staleness: float = 0.0         # staleness-aware layer step: lr / (1 + B*tau) (Zhang et al. 2016)
    sg_lookahead: float = 0.0         # weight prediction: step on the SG module extrapolated S*tau_bar updates ahead
    delay_comp: float = 0.0           # async-backprop: DC-ASGD's first-order correction, lambda (Zheng et al. 2017)
    # data ------------------------------------------------------------------------
    dataset: str = "addition"         # addition (the seed task), mnist, or npz:PATH
    data_dir: str = ""                # --dataset mnist: the directory of the IDX files
    bits: int = 8                     # addition: width of operands and sum (seed: 8)
    examples: int = 100               # training examples (seed: 100; files: the first N)
    shuffle: bool = False             # reshuffle the training batches every epoch, from the seed
    # read from the data files at launch (tasks.resolve), not set by hand ---------------
    features: int = 0                 # input width of a file dataset
    classes: int = 0                  # classes of a file dataset
    test_examples: int = 0            # size of its test split (0: none)
    # pipeline ------------------------------------------------------------------
    lockstep: bool = False            # deterministic schedule: bit-identical to the reference
    max_inflight: int = 8             # batches a layer may hold awaiting gradients, beyond grad_delay
    # staleness injection ------------------------------------------------------------
    grad_delay: int = 0               # each true gradient applied exactly this many layer steps late
    link_delay_ms: float = 0.0        # wall-clock delay on gradient links (free-running)
    link_jitter_ms: float = 0.0       # +- uniform jitter on that delay (order is kept, as TCP does)
    delay_activations: bool = False   # delay the activation links too
    slow: tuple[tuple[int, float], ...] = ()  # (layer, factor): stragglers computing factor x slower
    update_prob: float = 1.0          # each layer applies each weight update with this probability
    drop_prob: float = 0.0            # each true-gradient message is lost with this probability
    blas_threads: int = 1             # BLAS threads per process, so processes share cores
    in_process: bool = False          # train with the in-process reference instead
    # faults -------------------------------------------------------------------------
    checkpoint_every: int = 0         # save every layer's state every N epochs (0: never)
    start_epoch: int = 0              # set by --resume: the first epoch still to train
    # output -----------------------------------------------------------------------
    run_dir: str = ""                 # where results go; empty: runs/<time>-<mode>
    quiet: bool = False               # no progress line

    def __post_init__(self) -> None:
        self._check_types()
        # A single width repeats for every hidden layer.
        hidden = tuple(self.hidden)
        if len(hidden) == 1 and self.layers > 2:
            hidden = hidden * (self.layers - 1)
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "sg_hidden", tuple(self.sg_hidden))
        object.__setattr__(self, "slow", tuple((int(i), float(f)) for i, f in self.slow))
        self.validate()

    def _check_types(self) -> None:
        """A config may come from the wire (a worker's handshake): wrong types
        are bad input, refused with ValueError, never coerced."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            option = flag(f.name)
            if f.name in ("hidden", "sg_hidden"):
                ok = isinstance(value, (tuple, list)) and all(_is_int(h) for h in value)
                want = "a list of integers"
            elif f.name == "slow":
                ok = isinstance(value, (tuple, list)) and all(
                    isinstance(p, (tuple, list)) and len(p) == 2 and _is_int(p[0])
                    and isinstance(p[1], (int, float)) and not isinstance(p[1], bool)
                    and math.isfinite(p[1]) for p in value)
                want = "a list of LAYER:FACTOR pairs"
            elif isinstance(f.default, bool):
                ok, want = isinstance(value, bool), "true or false"
            elif isinstance(f.default, int):
                ok, want = _is_int(value), "an integer"
            elif isinstance(f.default, float):
                ok = _is_int(value) or (isinstance(value, float) and math.isfinite(value))
                want = "a finite number"
            else:
                ok, want = isinstance(value, str), "a string"
            if not ok:
                raise ConfigError(option, f"must be {want}, got {value!r}")

    def validate(self) -> None:
        def need(ok: bool, option: str, message: str) -> None:
            if not ok:
                raise ConfigError(option, message)

        need(self.layers >= 2, "--layers", f"must be at least 2 (got {self.layers})")
        need(len(self.hidden) == self.layers - 1, "--hidden",
             f"--layers {self.layers} needs {self.layers - 1} hidden width(s) or one to repeat, "
             f"got {len(self.hidden)}")
        need(all(h >= 1 for h in self.hidden), "--hidden", "widths must be positive")
        need(self.mode in MODES, "--mode", f"must be one of {', '.join(MODES)}")
        need(self.activation in ACTIVATIONS, "--activation",
             f"must be one of {', '.join(ACTIVATIONS)}")
        need(self.epochs >= 1, "--epochs", "must be at least 1")
        need(self.batch_size >= 1, "--batch-size", "must be at least 1")
        need(self.lr > 0, "--lr", "must be positive")
        need(self.sg_lr > 0, "--sg-lr", "must be positive")
        need(0 <= self.seed < 2 ** 32, "--seed", "must be in [0, 2**32)")
        need(2 <= self.bits <= 62, "--bits", "must be in [2, 62]")
        need(self.examples >= 1, "--examples", "must be at least 1")
        need(self.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
        need(all(h >= 1 for h in self.sg_hidden), "--sg-hidden", "widths must be positive")
        need(self.dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}")
        self._validate_remedies(need)
        self._validate_data(need)
        need(self.max_inflight >= 1, "--max-inflight", "must be at least 1")
        need(self.grad_delay >= 0, "--grad-delay", "must be at least 0")
        need(self.grad_delay == 0 or self.mode != "backprop", "--grad-delay",
             "locked backprop cannot run ahead of its gradients; use --mode async-backprop")
        need(self.link_delay_ms >= 0, "--link-delay", "must be at least 0 ms")
        need(0 <= self.link_jitter_ms <= max(self.link_delay_ms, 0), "--link-delay",
             "jitter must be between 0 and the delay")
        need(not self.delay_activations or self.link_delay_ms > 0, "--delay-activations",
             "needs --link-delay")
        for index, factor in self.slow:
            need(1 <= index <= self.layers, "--slow",
                 f"layer {index} does not exist (layers are 1..{self.layers})")
            need(factor >= 1, "--slow", f"factor must be at least 1, got {factor}")
        need(len({i for i, _ in self.slow}) == len(self.slow), "--slow", "a layer is named twice")
        need(0 <= self.update_prob <= 1, "--update-prob", "must be in [0, 1]")
        need(self.checkpoint_every >= 0, "--checkpoint-every", "must be at least 0")
        need(0 <= self.start_epoch < self.epochs, "--resume",
             f"nothing left to train: the checkpoint is at epoch {self.start_epoch} "
             f"of {self.epochs}")
        need(0 <= self.drop_prob <= 1, "--drop-prob", "must be in [0, 1]")
        need(not (self.in_process and (self.checkpoint_every or self.start_epoch)),
             "--in-process", "checkpoints and --resume are the process pipeline's")
        wall_clock = self.link_delay_ms > 0 or bool(self.slow)
        need(not (wall_clock and self.in_process), "--in-process",
             "--link-delay and --slow act on real processes; the in-process reference has none")
        need(self.blas_threads >= 1, "--blas-threads", "must be at least 1")

    def _validate_remedies(self, need) -> None:
        need(0 <= self.momentum < 1, "--momentum", "must be in [0, 1)")
        need(self.momentum == 0 or self.optimizer == "sgd", "--momentum",
             "is SGD's; Adam keeps its own first moment")
        for name in ("sg_boost", "lr_staleness", "sg_lookahead", "delay_comp"):
            need(getattr(self, name) >= 0, flag(name), "must be at least 0")
        for name in ("sg_boost", "sg_lookahead"):
            need(getattr(self, name) == 0 or self.mode in SG_MODES, flag(name),
                 f"acts on the synthetic-gradient modules: --mode cdni or dni, not {self.mode}")
        need(self.lr_staleness == 0 or self.mode != "backprop", "--lr-staleness",
             "locked backprop is never stale; use --mode async-backprop, dni or cdni")
        need(self.delay_comp == 0 or self.mode == "async-backprop", "--delay-comp",
             "corrects true gradients computed at older weights: --mode async-backprop only "
             "(a DNI layer steps on synthetic gradients of its current weights)")

    def _validate_data(self, need) -> None:
        files = self.dataset != "addition"
        need(self.dataset in ("addition", "mnist")
             or (self.dataset.startswith("npz:") and len(self.dataset) > 4), "--dataset",
             f"must be addition, mnist or npz:PATH, got {self.dataset!r}")
        need(bool(self.data_dir) == (self.dataset == "mnist"), "--data-dir",
             "--dataset mnist needs --data-dir DIR (the directory of the IDX files); "
             "other datasets take none")
        need(min(self.features, self.classes, self.test_examples) >= 0, "--dataset",
             "features, classes and test examples cannot be negative")
        need(files or not (self.features or self.classes or self.test_examples), "--dataset",
             "the addition task has no data files to describe")
        need(not files or self.features == 0 or self.classes >= 2, "--dataset",
             "a classification dataset needs at least 2 classes")

    # derived -------------------------------------------------------------------
    @property
    def classification(self) -> bool:
        """A file dataset: softmax over classes, one-hot labels on the wire."""
        return self.dataset != "addition"

    @property
    def dims(self) -> list[int]:
        """Widths from input to output: [2*bits, *hidden, bits] for addition,
        [features, *hidden, classes] for a file dataset."""
        if not self.classification:
            return [2 * self.bits, *self.hidden, self.bits]
        if not self.features:
            raise ValueError(f"dataset {self.dataset} not resolved: call tasks.resolve first")
        return [self.features, *self.hidden, self.classes]

    @property
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def test_batches(self) -> int:
        return -(-self.test_examples // self.batch_size)

    @property
    def uses_sg(self) -> bool:
        return self.mode in SG_MODES

    def slowdown(self, index: int) -> float:
        """How many times slower layer ``index`` computes (1: not a straggler)."""
        return dict(self.slow).get(index, 1.0)

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.examples // self.batch_size)

    @property
    def total_batches(self) -> int:
        return self.epochs * self.batches_per_epoch

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        d["sg_hidden"] = list(self.sg_hidden)
        d["slow"] = [list(p) for p in self.slow]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)
