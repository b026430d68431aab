"""The one typed configuration of a run, with the checks that keep bad input out."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field

import numpy as np

from pipeline import limits
from pipeline.math.nn import ACTIVATIONS
from pipeline.math.optim import OPTIMIZERS
from pipeline.wire.protocol import layer_role
from pipeline.defaults import (  # noqa: F401  (re-exported: where a run's defaults live)
    CLASSIFICATION_DEFAULTS, UNLOCK_DEFAULTS, default_hidden, defaults_for)

MODES = ("cdni", "dni", "backprop", "async-backprop")
SG_MODES = ("cdni", "dni")
UNLOCKS = ("none", "hidden", "forward")
DTYPES = ("float64", "float32")
PAIRS = ("slow", "layer_step_ms")  # the fields of LAYER:VALUE pairs


def flag(name: str) -> str:
    """The command-line flag a Config field comes from."""
    return Config.__dataclass_fields__[name].metadata["flag"] or "--" + name.replace("_", "-")


class ConfigError(ValueError):
    """A bad setting; ``option`` names the command-line flag it came from."""

    def __init__(self, option: str, message: str):
        super().__init__(f"argument {option}: {message}")
        self.option = option


def option(default, help: str, group: str, *, kind: str = "", metavar: str | None = None,
           choices: tuple[str, ...] | None = None, task: bool = False, flag: str = "",
           cli: bool = True, sweep: bool = True, most: float | None = None):
    """A Config field with what the command line needs to offer it: the help
    text, the ``--help`` group, and ``kind`` where the plain type is not
    enough ("widths", "link_delay", "straggler", "flag": on/off with no value,
    "switch": --X / --no-X). ``task``: its default depends on the task or
    on --unlock (``defaults_for``); ``cli=False``: not an option (derived, or set by
    --resume); ``sweep=False``: a sweep varies it itself. ``most``: its
    largest value (``pipeline.limits`` says why); an integer without one is
    held to the wire's 64 bits, a float to finite values."""
    return field(default=default, metadata=dict(
        help=help, group=group, kind=kind, metavar=metavar, choices=choices, task=task,
        flag=flag, cli=cli, sweep=sweep, most=most))


NET, TRAIN, UNLOCK, DATA, PIPE, FAULTS, STALE, REMEDY, VIRTUAL, OUT = (
    "network", "training", "complete unlock: synthetic inputs (docs/unlock.md)", "data",
    "pipeline", "faults", "staleness: measure it, inject it",
    "staleness remedies (each off at 0; tau: a gradient's staleness in the layer's steps, "
    "tau_bar: the running mean of the last ~10; see docs/staleness.md)",
    "virtual time: one process, modelled step and link times (docs/simulate.md)", "output")


@dataclass(frozen=True)
class Config:
    # network ---------------------------------------------------------------
    layers: int = option(3, "weight layers, counting the output layer: 3 = two hidden layers "
                         "and the output layer, each its own process (at most 1024, and what "
                         "the machine's memory holds: estimated before anything starts)", NET,
                         most=limits.MAX_LAYERS)
    hidden: tuple[int, ...] = option(
        (128, 64), "dense hidden widths, comma-separated; one number repeats for every dense "
        "hidden layer "
        "(default: the notebook's 128,64; deeper nets repeat 64; 256 on classification data; as "
        "wide as the machine's memory holds)",
        NET, kind="widths", task=True)
    conv: tuple[int, ...] = option(
        (), "convolutional hidden layers first, C1,C2,... channels: each a K x K same-padded "
        "convolution, batch norm per channel (unless --no-batchnorm), ReLU and a 2 x 2 "
        "max-pool; the hidden layers after them are dense (--hidden); image data only "
        "(docs/cnn.md)", NET, kind="widths", metavar="C1,C2")
    kernel: int = option(5, "--conv: the convolutions' kernel size K (odd)", NET, metavar="K",
                         most=limits.MAX_KERNEL)
    activation: str = option("sigmoid", "hidden-layer non-linearity", NET,
                             choices=ACTIVATIONS, task=True)
    batchnorm: bool = option(
        False, "batch normalisation in every hidden layer (Linear, BN, non-linearity), as the "
        "paper's MNIST nets; it keeps stale synthetic gradients from blowing the activations "
        "up", NET, kind="switch", task=True)
    layernorm: bool = option(
        False, "layer normalisation in every hidden layer (Linear, LN, non-linearity): each "
        "example normalised over its own features, nothing tracked, so it combines with "
        "--unlock; exclusive with --batchnorm", NET, kind="switch")
    sg_hidden: tuple[int, ...] = option(
        (), "hidden ReLU widths of every synthetic-gradient module, comma-separated "
        "(default: none, a linear module)", NET, kind="widths")
    sg_refresh: bool = option(
        True, "when a true gradient arrives after the SG module has changed, recompute its "
        "prediction with the module as it is now before regressing it (one more matmul per "
        "batch and layer); --no-sg-refresh learns from the prediction it made, a gradient at "
        "parameters some updates old", NET, kind="switch")
    mode: str = option(
        "cdni", "cdni: synthetic gradients conditioned on the labels; dni: on the activations "
        "only; backprop: locked true gradients (the baseline); async-backprop: true gradients "
        "applied whenever they arrive, however stale", NET, choices=MODES, sweep=False)
    # training ----------------------------------------------------------------
    epochs: int = option(800, "passes over the data (at most 2**53 batches in all)", TRAIN,
                         task=True, most=limits.MAX_COUNT)
    batch_size: int = option(10, "examples per batch (the last batch of an epoch may be short)",
                             TRAIN, task=True, most=limits.MAX_COUNT)
    optimizer: str = option("sgd", "for every layer and every SG module, each with its own state",
                            TRAIN, choices=OPTIMIZERS, task=True)
    momentum: float = option(0.0, "SGD's heavy-ball momentum for every layer and SG module "
                             "(0: plain SGD; Adam keeps its own)", TRAIN)
    # the notebook's 0.05 was on the sum over 10 examples; 0.5 is on their mean
    lr: float = option(0.5, "layer learning rate, on the batch-mean loss", TRAIN, task=True)
    # at the layer's rate the SG modules diverge (tests/test_reference.py)
    sg_lr: float = option(0.03, "learning rate of the synthetic-gradient modules", TRAIN,
                          task=True)
    dtype: str = option("float64", "floating-point type of the math and the messages", TRAIN,
                        choices=DTYPES, task=True)
    seed: int = option(1, "seeds the data and every layer's initial weights (0 to 2**32 - 1)",
                       TRAIN, most=2 ** 32 - 1)
    # complete unlock ---------------------------------------------------------------
    unlock: str = option(
        "none", "forward: every layer above the first (and the output layer) also gets each "
        "training batch's input from the source, steps at once on a synthetic input predicted "
        "from it, and regresses that prediction onto its true input when it comes; hidden: "
        "the same for the hidden layers only, the output layer waits for its true input; dni "
        "and cdni only", UNLOCK, choices=UNLOCKS, sweep=False)
    si_lr: float = option(0.0, "learning rate of the synthetic-input models (0: --sg-lr)",
                          UNLOCK, metavar="LR")
    si_second_step: bool = option(
        False, "when a batch's true input arrives, the layer also updates on it with its "
        "synthetic gradient (the output layer: its loss) (default: on under --unlock)",
        UNLOCK, kind="switch", task=True)
    si_output_scale: float = option(
        1.0, "--unlock forward: the output layer's step on its synthetic input is this "
        "times --lr (its second step, on the true input, stays at --lr) (default: 0.3 under "
        "--unlock)", UNLOCK, metavar="F", task=True)
    input_delay: int = option(
        0, "take every true input exactly K of the layer's steps after its synthetic step "
        "(exact under --lockstep; at least K free-running); at most --grad-delay", UNLOCK,
        metavar="K", sweep=False, most=limits.MAX_QUEUE)
    # data ------------------------------------------------------------------------
    dataset: str = option(
        "addition", "addition (the addition task: binary addition of --bits numbers), mnist (the "
        "MNIST or Fashion-MNIST IDX files in --data-dir, plain or .gz), cifar10 (the CIFAR-10 "
        "binary version's .bin files in --data-dir) or npz:PATH (a NumPy archive with x_train, "
        "y_train and optionally x_test, y_test)", DATA, metavar="NAME")
    data_dir: str = option(
        "", "--dataset mnist: the directory holding train-images-idx3-ubyte, "
        "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte; "
        "cifar10: data_batch_1.bin ... data_batch_5.bin and test_batch.bin", DATA,
        metavar="DIR")
    bits: int = option(8, "addition: bits per operand and sum", DATA)
    examples: int = option(100, "training examples (default: 100 on addition; a dataset's "
                           "first N, default all)", DATA, task=True, most=limits.MAX_COUNT)
    shuffle: bool = option(False, "reshuffle the training batches every epoch, from --seed",
                           DATA, kind="switch", task=True)
    # read from the data files at launch (tasks.resolve), not set by hand
    features: int = option(0, "input width of a file dataset", DATA, cli=False, flag="--dataset",
                           most=limits.MAX_COUNT)
    classes: int = option(0, "classes of a file dataset", DATA, cli=False, flag="--dataset",
                          most=limits.MAX_CLASSES)
    test_examples: int = option(0, "size of its test split (0: none)", DATA, cli=False,
                                flag="--dataset", most=limits.MAX_COUNT)
    image: tuple[int, ...] = option((), "its examples' image shape (height, width, channels); "
                                    "none: flat data", DATA, cli=False, flag="--dataset",
                                    kind="widths")
    # pipeline ------------------------------------------------------------------
    lockstep: bool = option(False, "deterministic schedule: the same weights, bit for bit, as "
                            "the in-process reference", PIPE, kind="flag")
    max_inflight: int = option(8, "batches a layer may hold awaiting their true gradient, "
                               "beyond --grad-delay, before it stops taking new ones "
                               "(backpressure; at most 2**20)", PIPE, most=limits.MAX_QUEUE)
    blas_threads: int = option(1, "BLAS threads per worker process (the workers share the "
                               "cores); an --in-process run takes the environment's "
                               "(OPENBLAS_NUM_THREADS, OMP_NUM_THREADS: all cores unless "
                               "set); at most 1024", PIPE, most=limits.MAX_BLAS_THREADS)
    in_process: bool = option(False, "train the same configuration with the in-process "
                              "reference (the baseline to time against); writes the same run "
                              "directory", PIPE, kind="flag")
    # faults -------------------------------------------------------------------------
    checkpoint_every: int = option(0, "every N epochs, save every layer's weights, SG module "
                                   "and counters to RUN_DIR/checkpoints (0: never)", FAULTS,
                                   metavar="N", most=limits.MAX_COUNT)
    keep_checkpoints: int = option(3, "after each checkpoint, keep the newest N complete "
                                   "ones and remove the older ones (0: keep all)", FAULTS,
                                   metavar="N", most=limits.MAX_COUNT)
    watchdog: float = option(60.0, "end the run as failed, naming the role that stopped, when "
                             "no role has handled a message for S seconds though every "
                             "process still answers (0: never; at most a week, 604800)", FAULTS, metavar="S",
                             most=limits.MAX_WAIT_S)
    start_epoch: int = option(0, "the first epoch still to train", FAULTS, cli=False,
                              flag="--resume", most=limits.MAX_COUNT)
    # staleness injection ------------------------------------------------------------
    grad_delay: int = option(0, "apply every true gradient exactly K of the layer's steps late "
                             "(exact under --lockstep; at least K free-running; at most 2**20)",
                             STALE, sweep=False, most=limits.MAX_QUEUE)
    link_delay_ms: float = option(0.0, "wall-clock delay on the gradient links, with optional "
                                  "+-jitter (order is kept); free-running only (virtual under --simulate); at most "
                                  "a week",
                                  STALE, kind="link_delay", metavar="MS[:JITTER]",
                                  flag="--link-delay", most=limits.MAX_WAIT_S * 1000)
    link_jitter_ms: float = option(0.0, "+- uniform jitter on that delay", STALE, cli=False,
                                   flag="--link-delay", most=limits.MAX_WAIT_S * 1000)
    delay_activations: bool = option(False, "put the --link-delay on the activation links too",
                                     STALE, kind="flag")
    slow: tuple[tuple[int, float], ...] = option(
        (), "layer LAYER (1..N) computes FACTOR times slower (1 to 1000); repeatable", STALE,
        kind="straggler", metavar="LAYER:FACTOR", most=limits.MAX_SLOWDOWN)
    freeze: tuple[int, ...] = option(
        (), "these layers (1..N, comma-separated) never update their weights: a control for "
        "what the others learn without them (their SG modules still learn)", STALE,
        kind="widths", metavar="LAYERS")
    update_prob: float = option(1.0, "each layer applies each weight update only with this "
                                "probability (the paper's update-decoupling experiment)", STALE)
    drop_prob: float = option(0.0, "each true-gradient message is lost with this probability",
                              STALE)
    # staleness remedies (pipeline.math.staleness) --------------------------------------------
    sg_boost: float = option(0.0, "two timescales: an SG module regressing a target tau steps "
                             "stale steps (1 + A*tau) times --sg-lr", REMEDY, metavar="A")
    lr_staleness: float = option(
        0.0, "staleness-aware layer step, lr / (1 + B*tau): tau of the true gradient applied "
        "(async-backprop), tau_bar of the SG module's feedback (dni, cdni)", REMEDY,
        metavar="B")
    sg_lookahead: float = option(
        0.0, "weight prediction: a layer steps on its SG module extrapolated S*tau_bar of the "
        "module's updates ahead along its recent drift", REMEDY, metavar="S")
    delay_comp: float = option(
        0.0, "async-backprop: DC-ASGD's correction g + LAMBDA*g*g*(w_now - w_then) of a true "
        "gradient computed at older weights", REMEDY, metavar="LAMBDA")
    # virtual time (pipeline.nodes.virtual) ---------------------------------------------
    simulate: bool = option(
        False, "train in this process on a virtual clock: every role's step and every "
        "message take a modelled time, events are taken in virtual-time order, and the same "
        "command gives the same weights bit for bit on any machine; --slow, --link-delay "
        "act on virtual time", VIRTUAL, kind="flag")
    step_ms: float = option(1.0, "--simulate: a layer's time for one training batch, "
                            "forward and gradient together (ms)", VIRTUAL, metavar="MS",
                            most=limits.MAX_WAIT_S * 1000)
    layer_step_ms: tuple[tuple[int, float], ...] = option(
        (), "--simulate: layer LAYER's step time instead (0: the source, whose default is "
        "0 ms); repeatable", VIRTUAL, kind="straggler", metavar="LAYER:MS",
        most=limits.MAX_WAIT_S * 1000)
    bandwidth: float = option(0.0, "--simulate: every link's megabytes per second, so a "
                              "message's size counts (0: no limit)", VIRTUAL, metavar="MB_S")
    step_jitter: float = option(0.0, "--simulate: each handling's time is lognormal with "
                                "this sigma and its mean at the modelled time, drawn from "
                                "--timing-seed (0: none)", VIRTUAL, metavar="S", most=10.0)
    cores: int = option(0, "--simulate: the roles share this many cores (0: each its own "
                        "machine)", VIRTUAL, metavar="N", most=limits.MAX_BLAS_THREADS)
    quantum_ms: float = option(0.0, "--cores: a role computes for slices of this much work, "
                               "taking turns (0: all at once, each at cores/busy of its "
                               "speed)", VIRTUAL, metavar="MS", flag="--quantum")
    emulated_links: bool = option(False, "--simulate: a --link-delay starts when the "
                                  "receiver reads the message, as a real run's emulated "
                                  "one does, not at the send", VIRTUAL, kind="flag")
    timing_seed: int = option(1, "--simulate: the seed of the jitter draws, steps and links "
                              "(0 to 2**32 - 1)", VIRTUAL, most=2 ** 32 - 1)
    timing_from: str = option("", "--simulate: each role's handling times as measured in "
                              "this real run's directory", VIRTUAL, metavar="RUN_DIR")
    # output -----------------------------------------------------------------------
    run_dir: str = option("", "directory for config.json, metrics.jsonl, summary.json and "
                          "weights (default: runs/<time>-<mode>-<id>)", OUT, sweep=False)
    overwrite: bool = option(
        False, "replace the run already in --run-dir: remove the files a run writes there "
        "(saying which) before this one starts; a directory holding anything else is refused",
        OUT, kind="flag", sweep=False)
    quiet: bool = option(False, "no progress line", OUT, kind="flag")
    tensorboard: bool = option(
        False, "also write TensorBoard event files to RUN_DIR/tensorboard/ (pip install -e "
        "'.[tb]'; docs/design.md#tensorboard)", OUT, kind="flag")

    def __post_init__(self) -> None:
        from pipeline import validation  # (it reads this module's ConfigError and flags)
        validation.check_types(self)
        limits.check_most(self)
        # A single width repeats for every hidden layer.
        hidden = tuple(self.hidden)
        dense = self.layers - 1 - len(self.conv)
        if len(hidden) == 1 and dense > 1:
            hidden = hidden * dense
        elif dense == 0 and self.conv and self.classification:
            hidden = ()  # every hidden layer convolutional: the task's default width unused
        object.__setattr__(self, "hidden", hidden)
        object.__setattr__(self, "conv", tuple(self.conv))
        object.__setattr__(self, "image", tuple(self.image))
        object.__setattr__(self, "freeze", tuple(self.freeze))
        object.__setattr__(self, "sg_hidden", tuple(self.sg_hidden))
        for name in PAIRS:
            object.__setattr__(self, name, tuple((int(i), float(f)) for i, f in getattr(self, name)))
        validation.validate(self)
        limits.check_wire(self)

    def validate(self) -> None:
        """ConfigError naming the option of the first setting that breaks a rule."""
        from pipeline import validation
        validation.validate(self)

    @property
    def si_step(self) -> float:
        """The synthetic-input models' learning rate."""
        return self.si_lr or self.sg_lr

    @property
    def unlocked(self) -> bool:
        return self.unlock != "none"

    def unlocks(self, index: int) -> bool:
        """Does weight layer ``index`` step on synthetic inputs? Every layer
        above the first under forward; under hidden, not the output layer."""
        top = self.layers if self.unlock == "forward" else self.layers - 1
        return self.unlocked and 1 < index <= top

    @property
    def input_hwm(self) -> int:
        """High-water mark of the source's input links, at both ends: the
        synthetic steps an unlocked layer may take ahead, and two more."""
        return self.input_delay + self.max_inflight + 2

    @property
    def input_roles(self) -> list[str]:
        """The roles the source also sends each training batch to, as INPUT."""
        return [layer_role(i, self.layers) for i in range(2, self.layers + 1) if self.unlocks(i)]

    # derived -------------------------------------------------------------------
    @property
    def classification(self) -> bool:
        """A file dataset: softmax over classes, one-hot labels on the wire."""
        return self.dataset != "addition"

    @property
    def dims(self) -> list[int]:
        """Widths from input to output, each layer's output as a row of
        numbers: [2*bits, *hidden, bits] for addition, [features, *conv
        outputs, *hidden, classes] for a file dataset."""
        return [math.prod(s) for s in self.shapes]

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Each layer's output shape per example, from the input (as the
        source sends it: a row of features) to the output: (H, W, C) after
        a convolutional layer (``conv_shapes``), (width,) after a dense one."""
        if not self.classification:
            return [(w,) for w in (2 * self.bits, *self.hidden, self.bits)]
        if not self.features:
            raise ValueError(f"dataset {self.dataset} not resolved: call tasks.resolve first")
        return [(self.features,), *self.conv_shapes()[1:], *((w,) for w in self.hidden),
                (self.classes,)]

    def conv_shapes(self) -> list[tuple[int, int, int]]:
        """The image, then each convolutional layer's output (H, W, C): a
        same-padded convolution keeps H and W, its 2 x 2 max-pool halves
        them (a last odd row or column dropped)."""
        if not self.conv:
            return [tuple(self.image)] if self.image else []
        out = [tuple(self.image)]
        for channels in self.conv:
            h, w, _ = out[-1]
            out.append((h // 2, w // 2, channels))
        return out

    @functools.cached_property  # read for every message a layer checks
    def np_dtype(self) -> np.dtype:
        return np.dtype(self.dtype)

    @property
    def test_batches(self) -> int:
        return -(-self.test_examples // self.batch_size)

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
        d["conv"] = list(self.conv)
        d["image"] = list(self.image)
        d["freeze"] = list(self.freeze)
        d["sg_hidden"] = list(self.sg_hidden)
        for name in PAIRS:
            d[name] = [list(p) for p in getattr(self, name)]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        return cls(**d)
