"""The one typed configuration of a run, with the checks that keep bad input out."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

MODES = ("cdni", "dni", "backprop")
ACTIVATIONS = ("sigmoid", "relu")


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
    # task: binary addition ------------------------------------------------------
    bits: int = 8                     # width of operands and sum (seed: 8)
    examples: int = 100               # training examples (seed: 100)
    # pipeline ------------------------------------------------------------------
    lockstep: bool = False            # deterministic schedule: bit-identical to the reference
    max_inflight: int = 8             # batches a layer may hold awaiting their true gradient
    blas_threads: int = 1             # BLAS threads per process, so processes share cores
    in_process: bool = False          # train with the in-process reference instead
    # output -----------------------------------------------------------------------
    run_dir: str = ""                 # where results go; empty: runs/<time>-<mode>
    quiet: bool = False               # no progress line

    def __post_init__(self) -> None:
        # A single width repeats for every hidden layer.
        if len(self.hidden) == 1 and self.layers > 2:
            object.__setattr__(self, "hidden", tuple(self.hidden) * (self.layers - 1))
        object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        self.validate()

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
        need(self.max_inflight >= 1, "--max-inflight", "must be at least 1")
        need(self.blas_threads >= 1, "--blas-threads", "must be at least 1")

    # derived -------------------------------------------------------------------
    @property
    def dims(self) -> list[int]:
        """Widths from input to output: [2*bits, *hidden, bits]."""
        return [2 * self.bits, *self.hidden, self.bits]

    @property
    def batches_per_epoch(self) -> int:
        return -(-self.examples // self.batch_size)

    @property
    def total_batches(self) -> int:
        return self.epochs * self.batches_per_epoch

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown config keys: {sorted(unknown)}")
        d = dict(d)
        if "hidden" in d:
            d["hidden"] = tuple(d["hidden"])
        return cls(**d)
