"""The one typed configuration of a run, with the checks that keep bad input out."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

MODES = ("cdni", "dni", "backprop")
ACTIVATIONS = ("sigmoid", "relu")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def default_hidden(layers: int) -> tuple[int, ...]:
    """The seed's widths, 128 then 64, the last repeated for deeper nets."""
    return tuple(([128] + [64] * max(0, layers - 2))[: max(1, layers - 1)])


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
        self._check_types()
        # A single width repeats for every hidden layer.
        hidden = tuple(self.hidden)
        if len(hidden) == 1 and self.layers > 2:
            hidden = hidden * (self.layers - 1)
        object.__setattr__(self, "hidden", hidden)
        self.validate()

    def _check_types(self) -> None:
        """A config may come from the wire (a worker's handshake): wrong types
        are bad input, refused with ValueError, never coerced."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            option = "--" + f.name.replace("_", "-")
            if f.name == "hidden":
                ok = isinstance(value, (tuple, list)) and all(_is_int(h) for h in value)
                want = "a list of integers"
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
        return cls(**d)
