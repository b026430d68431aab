"""The checks that keep a bad Config out: every field of the right type (a
config may come from the wire, in a worker's handshake) and every setting
within its rules and with the others; ConfigError names the option. Run by
``Config`` itself whenever one is made."""
from __future__ import annotations

import dataclasses
import math

from pipeline import limits
from pipeline.config import DTYPES, MODES, PAIRS, SG_MODES, UNLOCKS, ConfigError, flag
from pipeline.math.nn import ACTIVATIONS
from pipeline.math.optim import OPTIMIZERS
from pipeline.wire.protocol import is_int as _is_int


def check_types(cfg) -> None:
    """A config may come from the wire (a worker's handshake): wrong types
    are bad input, refused with ValueError, never coerced."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        option = flag(f.name)
        if f.name in ("hidden", "sg_hidden", "conv", "image", "freeze"):
            ok = isinstance(value, (tuple, list)) and all(_is_int(h) for h in value)
            want = "a list of integers"
        elif f.name in PAIRS:
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

def validate(cfg) -> None:
    def need(ok: bool, option: str, message: str) -> None:
        if not ok:
            raise ConfigError(option, message)

    need(cfg.layers >= 2, "--layers", f"must be at least 2 (got {cfg.layers})")
    _conv(cfg, need)
    dense = cfg.layers - 1 - len(cfg.conv)
    need(len(cfg.hidden) == dense, "--hidden",
         f"--layers {cfg.layers} needs {dense} dense hidden width(s) or one to repeat, "
         f"got {len(cfg.hidden)}" + (f" (after {len(cfg.conv)} --conv layers)" if cfg.conv
                                     else ""))
    need(all(h >= 1 for h in cfg.hidden), "--hidden", "widths must be positive")
    need(cfg.mode in MODES, "--mode", f"must be one of {', '.join(MODES)}")
    need(cfg.activation in ACTIVATIONS, "--activation",
         f"must be one of {', '.join(ACTIVATIONS)}")
    need(cfg.epochs >= 1, "--epochs", "must be at least 1")
    need(cfg.batch_size >= 1, "--batch-size", "must be at least 1")
    need(cfg.lr > 0, "--lr", "must be positive")
    need(cfg.sg_lr > 0, "--sg-lr", "must be positive")
    need(0 <= cfg.seed < 2 ** 32, "--seed", "must be in [0, 2**32)")
    need(2 <= cfg.bits <= 62, "--bits", "must be in [2, 62]")
    need(cfg.examples >= 1, "--examples", "must be at least 1")
    need(cfg.total_batches <= limits.MAX_COUNT, "--epochs",
         f"{cfg.epochs} epochs of {cfg.batches_per_epoch} batches are more than "
         f"{limits.say(limits.MAX_COUNT)} batches (what a run's counters may reach)")
    need(cfg.optimizer in OPTIMIZERS, "--optimizer", f"must be one of {', '.join(OPTIMIZERS)}")
    need(all(h >= 1 for h in cfg.sg_hidden), "--sg-hidden", "widths must be positive")
    need(cfg.dtype in DTYPES, "--dtype", f"must be one of {', '.join(DTYPES)}")
    need(not (cfg.batchnorm and cfg.layernorm), "--layernorm",
         "does not combine with --batchnorm (one normalisation per layer); add "
         "--no-batchnorm (classification data turns batch norm on by default)")
    _remedies(cfg, need)
    _unlock(cfg, need)
    _data(cfg, need)
    need(cfg.max_inflight >= 1, "--max-inflight", "must be at least 1")
    need(cfg.grad_delay >= 0, "--grad-delay", "must be at least 0")
    need(cfg.grad_delay == 0 or cfg.mode != "backprop", "--grad-delay",
         "locked backprop cannot run ahead of its gradients; use --mode async-backprop")
    need(cfg.link_delay_ms >= 0, "--link-delay", "must be at least 0 ms")
    need(0 <= cfg.link_jitter_ms <= max(cfg.link_delay_ms, 0), "--link-delay",
         "jitter must be between 0 and the delay")
    need(not cfg.delay_activations or cfg.link_delay_ms > 0, "--delay-activations",
         "needs --link-delay")
    for index, factor in cfg.slow:
        need(1 <= index <= cfg.layers, "--slow",
             f"layer {index} does not exist (layers are 1..{cfg.layers})")
        need(factor >= 1, "--slow", f"factor must be at least 1, got {factor}")
    need(len({i for i, _ in cfg.slow}) == len(cfg.slow), "--slow", "a layer is named twice")
    need(0 <= cfg.update_prob <= 1, "--update-prob", "must be in [0, 1]")
    need(all(1 <= i <= cfg.layers for i in cfg.freeze), "--freeze",
         f"layers are 1..{cfg.layers}, got {list(cfg.freeze)}")
    need(len(set(cfg.freeze)) == len(cfg.freeze), "--freeze", "a layer is named twice")
    need(cfg.checkpoint_every >= 0, "--checkpoint-every", "must be at least 0")
    need(cfg.keep_checkpoints >= 0, "--keep-checkpoints", "must be at least 0 (0: keep all)")
    need(cfg.watchdog >= 0 and math.isfinite(cfg.watchdog), "--watchdog",
         "must be 0 (off) or a number of seconds")
    need(0 <= cfg.start_epoch < cfg.epochs, "--resume",
         f"nothing left to train: the checkpoint is at epoch {cfg.start_epoch} "
         f"of {cfg.epochs}")
    need(0 <= cfg.drop_prob <= 1, "--drop-prob", "must be in [0, 1]")
    need(not (cfg.in_process and (cfg.checkpoint_every or cfg.start_epoch)),
         "--in-process", "checkpoints and --resume are the process pipeline's")
    wall_clock = cfg.link_delay_ms > 0 or bool(cfg.slow)
    need(not (wall_clock and cfg.in_process), "--in-process",
         "--link-delay and --slow act on real processes; the in-process reference has none")
    need(cfg.blas_threads >= 1, "--blas-threads", "must be at least 1")
    _virtual(cfg, need)


def _virtual(cfg, need) -> None:
    """--simulate and its timing model."""
    need(not (cfg.simulate and cfg.in_process), "--simulate",
         "is a run of its own: not with --in-process")
    timing = {"step_ms": cfg.step_ms != 1.0, "layer_step_ms": bool(cfg.layer_step_ms),
              "bandwidth": cfg.bandwidth != 0.0, "step_jitter": cfg.step_jitter != 0.0,
              "timing_from": bool(cfg.timing_from), "cores": cfg.cores != 0,
              "quantum_ms": cfg.quantum_ms != 0.0, "emulated_links": cfg.emulated_links}
    for name, given in timing.items():
        need(cfg.simulate or not given, flag(name), "acts on virtual time: add --simulate")
    need(cfg.step_ms >= 0, "--step-ms", "must be at least 0")
    for index, ms in cfg.layer_step_ms:
        need(0 <= index <= cfg.layers, "--layer-step-ms",
             f"layers are 0 (the source) to {cfg.layers}, got {index}")
        need(ms >= 0, "--layer-step-ms", f"must be at least 0 ms, got {ms}")
    need(len({i for i, _ in cfg.layer_step_ms}) == len(cfg.layer_step_ms), "--layer-step-ms",
         "a layer is named twice")
    need(cfg.bandwidth >= 0, "--bandwidth", "must be at least 0 (0: no limit)")
    need(cfg.step_jitter >= 0, "--step-jitter", "must be at least 0")
    need(cfg.cores >= 0, "--cores", "must be at least 0 (0: each role its own machine)")
    need(cfg.quantum_ms >= 0, "--quantum", "must be at least 0 ms")
    need(not cfg.quantum_ms or cfg.cores, "--quantum", "slices cores: add --cores N")

def _conv(cfg, need) -> None:
    """--conv: image data, room for the layers, and what convolutional
    layers do not do (docs/cnn.md says why)."""
    need(len(cfg.image) in (0, 3) and all(d >= 1 for d in cfg.image), "--dataset",
         f"an image shape is (height, width, channels), got {list(cfg.image)}")
    need(cfg.kernel >= 1 and cfg.kernel % 2 == 1, "--kernel",
         f"must be an odd number of at least 1 (same padding), got {cfg.kernel}")
    if not cfg.conv:
        return
    need(all(c >= 1 for c in cfg.conv), "--conv", "channel counts must be positive")
    need(len(cfg.conv) <= cfg.layers - 1, "--conv",
         f"{len(cfg.conv)} convolutional layers need --layers {len(cfg.conv) + 1} or more "
         f"(the output layer comes after them), got --layers {cfg.layers}")
    need(cfg.classification, "--conv", "needs image data (--dataset mnist or cifar10); the "
         "addition task is a row of bits")
    if not cfg.features:
        return  # the data is read later (tasks.resolve), and its shape checked then
    need(bool(cfg.image), "--conv",
         f"{cfg.dataset} is flat data with no image shape; convolutional layers need "
         "images (mnist, cifar10, or an npz archive of (n, H, W) or (n, H, W, C) arrays)")
    h, w, _ = cfg.image
    need(h >> len(cfg.conv) >= 1 and w >> len(cfg.conv) >= 1, "--conv",
         f"{len(cfg.conv)} 2 x 2 max-pools leave nothing of a {h} x {w} image; at most "
         f"{min(h, w).bit_length() - 1} convolutional layers")
    need(not cfg.layernorm, "--layernorm",
         "is for dense layers; convolutional layers normalise per channel (batch norm)")
    need(cfg.unlock == "none", "--unlock",
         "synthetic inputs are for dense layers only: a convolutional layer's input model "
         "is not built (docs/cnn.md)")
    need(cfg.sg_lookahead == 0, "--sg-lookahead",
         "is for dense layers' SG modules only; the convolutional SG module tracks no drift")


def _remedies(cfg, need) -> None:
    need(0 <= cfg.momentum < 1, "--momentum", "must be in [0, 1)")
    need(cfg.momentum == 0 or cfg.optimizer == "sgd", "--momentum",
         "is SGD's; Adam keeps its own first moment")
    for name in ("sg_boost", "lr_staleness", "sg_lookahead", "delay_comp"):
        need(getattr(cfg, name) >= 0, flag(name), "must be at least 0")
    for name in ("sg_boost", "sg_lookahead"):
        need(getattr(cfg, name) == 0 or cfg.mode in SG_MODES, flag(name),
             f"acts on the synthetic-gradient modules: --mode cdni or dni, not {cfg.mode}")
    need(cfg.lr_staleness == 0 or cfg.mode != "backprop", "--lr-staleness",
         "locked backprop is never stale; use --mode async-backprop, dni or cdni")
    need(cfg.delay_comp == 0 or cfg.mode == "async-backprop", "--delay-comp",
         "corrects true gradients computed at older weights: --mode async-backprop only "
         "(a DNI layer steps on synthetic gradients of its current weights)")

def _unlock(cfg, need) -> None:
    need(cfg.unlock in UNLOCKS, "--unlock", f"must be one of {', '.join(UNLOCKS)}")
    need(cfg.si_lr >= 0, "--si-lr", "must be positive (or 0: --sg-lr)")
    need(cfg.input_delay >= 0, "--input-delay", "must be at least 0")
    need(math.isfinite(cfg.si_output_scale) and cfg.si_output_scale >= 0, "--si-output-scale",
         "must be at least 0")
    if cfg.unlock == "none":
        for name in ("si_lr", "si_second_step", "input_delay"):
            need(not getattr(cfg, name), flag(name), "needs --unlock forward")
        need(cfg.si_output_scale == 1.0, "--si-output-scale", "needs --unlock forward")
        return
    need(cfg.mode in SG_MODES, "--unlock",
         f"forward needs synthetic gradients: --mode cdni or dni, not {cfg.mode}")
    need(cfg.unlock != "hidden" or cfg.layers >= 3, "--unlock",
         "hidden needs a hidden layer above the first (--layers 3 or more); --unlock "
         "forward unlocks the output layer of a 2-layer net")
    need(cfg.input_delay <= cfg.grad_delay, "--input-delay",
         f"must not exceed --grad-delay ({cfg.input_delay} > {cfg.grad_delay}): a "
         "batch's true gradient can only come after its true input")

DIR_DATASETS = ("addition", "mnist", "cifar10")  # by name; the last two read --data-dir


def _data(cfg, need) -> None:
    files = cfg.dataset != "addition"
    need(cfg.dataset in DIR_DATASETS
         or (cfg.dataset.startswith("npz:") and len(cfg.dataset) > 4), "--dataset",
         f"must be addition, mnist, cifar10 or npz:PATH, got {cfg.dataset!r}")
    need(bool(cfg.data_dir) == (cfg.dataset in DIR_DATASETS[1:]), "--data-dir",
         f"--dataset {cfg.dataset} needs --data-dir DIR (the directory of its files)"
         if cfg.dataset in DIR_DATASETS[1:] else
         "--dataset mnist and cifar10 take a --data-dir; other datasets none")
    need(not cfg.image or cfg.features == math.prod(cfg.image), "--dataset",
         f"an image of shape {list(cfg.image)} is not {cfg.features} features")
    need(min(cfg.features, cfg.classes, cfg.test_examples) >= 0, "--dataset",
         "features, classes and test examples cannot be negative")
    need(files or not (cfg.features or cfg.classes or cfg.test_examples), "--dataset",
         "the addition task has no data files to describe")
    need(not files or cfg.features == 0 or cfg.classes >= 2, "--dataset",
         "a classification dataset needs at least 2 classes")
