"""The command line: argv -> Config, rejecting what it does not know in one line."""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import sys
from dataclasses import dataclass

from pipeline import files, limits
from pipeline.data import tasks
from pipeline.run import runfiles
from pipeline.run.sweep import expand_axes, parse_axis
from pipeline.nodes.timing import measured
from pipeline.config import (CLASSIFICATION_DEFAULTS, MODES, UNLOCKS, Config, ConfigError,
                             default_hidden, defaults_for)

D = Config.__dataclass_fields__


def _default(name: str):
    return D[name].default


def _task_default(name: str) -> str:
    """Help text for an option whose default depends on the task."""
    def say(value) -> str:
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value
    return (f" (default: {say(_default(name))} on addition, {say(CLASSIFICATION_DEFAULTS[name])} "
            "on classification data)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones, on/off flags and those the help
    already states."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if (action.default in (None, "", False, []) or isinstance(action.default, bool)
                or "(default:" in (action.help or "")):
            return action.help or ""
        return super()._get_help_string(action)


# What else launch.py does, for the foot of ``launch.py -h``.
COMMANDS = ("other commands, each with its own -h: "
            "'launch.py data mnist DIR' (MNIST, fashion-mnist or cifar10, downloaded and "
            "checked); "
            "'launch.py sweep' (a grid of runs: modes x gradient delays x seeds x variants, "
            "with a table and a plot); "
            "'launch.py report RUN_DIR' (one run's figures and plots; several run "
            "directories: side by side, their curves in one figure); "
            "'launch.py keys --out DIR' (CURVE keys for a cluster); "
            "'launch.py --cluster FILE' (a run across machines without an engine, "
            "docs/clusters.md); and under mpiexec, srun or a Kubernetes Indexed Job "
            "this same command runs one rank of a run.")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit code 2
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def _widths(text: str) -> tuple[int, ...]:
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected widths like 128,64, got {text!r}") from None
    return widths


def _link_delay(text: str) -> tuple[float, float]:
    try:
        parts = [float(v) for v in text.split(":")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2):
        raise argparse.ArgumentTypeError(f"expected MS or MS:JITTER in milliseconds, got {text!r}")
    return parts[0], parts[1] if len(parts) == 2 else 0.0


def _straggler(text: str) -> tuple[int, float]:
    layer, _, factor = text.partition(":")
    try:
        return int(layer), float(factor)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LAYER:FACTOR like 2:3, got {text!r}") from None


def _names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    bad = [n for n in names if n not in MODES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"expected modes from {', '.join(MODES)}, got {text!r}")
    return names


def _unlocks(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    if not names or set(names) - set(UNLOCKS):
        raise argparse.ArgumentTypeError(f"expected {' or '.join(UNLOCKS)}, got {text!r}")
    return names


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2,4, got {text!r}") from None
    return values


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, options = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]{0,63}", name):
        raise argparse.ArgumentTypeError(
            f"expected NAME: OPTIONS like 'bn: --batchnorm' (NAME of at most 64 letters, "
            f"digits, _ . + = -), got {text[:80]!r}")
    try:
        return name, shlex.split(options)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"variant {name}: {exc}") from None


def _axis(text: str) -> tuple[str, list[str]]:
    try:
        return parse_axis(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


PARSE = {"widths": lambda text: _widths(text), "link_delay": lambda text: _link_delay(text),
         "straggler": lambda text: _straggler(text)}


def _add_option(group: argparse._ArgumentGroup, f: dataclasses.Field) -> None:
    """The option of one Config field, from the field alone."""
    m, name = f.metadata, f.name
    flag = m["flag"] or "--" + name.replace("_", "-")
    help_ = m["help"] + (_task_default(name) if m["task"] and name in CLASSIFICATION_DEFAULTS
                         and "(default:" not in m["help"] else "")
    kw: dict = {"dest": name, "help": help_}
    if m["metavar"]:
        kw["metavar"] = m["metavar"]
    if m["kind"] == "flag":
        kw.update(action="store_true")
    elif m["kind"] == "switch":
        kw.update(action=argparse.BooleanOptionalAction, default=None if m["task"] else f.default)
    elif m["kind"] == "straggler":
        kw.update(type=PARSE["straggler"], action="append", default=[])
    else:
        kw.update(type=PARSE.get(m["kind"], type(f.default)),
                  default=None if m["task"] or m["kind"] else f.default)
        if m["choices"]:
            kw["choices"] = m["choices"]
    group.add_argument(flag, **kw)


def build_parser(sweep: bool = False) -> argparse.ArgumentParser:
    """The run's options; with ``sweep``, the grid's axes take lists instead."""
    if sweep:
        p = _Parser(prog="launch.py sweep", formatter_class=_Help,
                    description="Run a grid of modes x gradient delays x seeds (x unlocks x "
                                "variants), one run directory per point, then write "
                                "results.csv, results.md and a plot of final accuracy against "
                                "staleness. Points already completed are not run again, so an "
                                "interrupted sweep resumes. Every run option below applies to "
                                "every point.",
                    epilog="For example: launch.py sweep --modes cdni,dni --grad-delay 0,4 "
                           "--seeds 2 --out sweeps/small (docs/staleness.md)")
        g = p.add_argument_group("sweep")
        # Lists are given as the user types them: argparse parses a string
        # default with ``type``, and -h shows it as written.
        g.add_argument("--modes", type=_names, default="cdni,async-backprop", metavar="M1,M2",
                       help="comma-separated modes (backprop runs at delay 0 only)")
        g.add_argument("--grad-delay", type=_ints, default="0,1,2,4,8,16", metavar="K1,K2",
                       help="comma-separated injected gradient delays K")
        g.add_argument("--unlock", type=_unlocks, default="none", metavar="U1,U2",
                       help="comma-separated: none, forward (--unlock forward runs the SG "
                            "modes only)")
        g.add_argument("--input-delay", type=_ints, default="0", metavar="K1,K2",
                       help="comma-separated forward delays K of the unlocked runs (each at "
                            "most the point's gradient delay; others are left out)")
        g.add_argument("--seeds", type=int, default=3, metavar="N",
                       help=f"seeds per point: --seed, --seed+1, ... (at most {MAX_SEEDS})")
        g.add_argument("--variant", type=_variant, action="append", default=[],
                       metavar="'NAME: OPTIONS'",
                       help="a named set of run options added to the others, e.g. "
                            "'sgd: --optimizer sgd --lr 0.05 --momentum 0.9'; repeatable: "
                            "every variant runs the whole grid (default: one, unnamed)")
        g.add_argument("--axis", type=_axis, action="append", default=[],
                       metavar="'OPTION=V1 V2'", help="a run option as one more axis, every "
                       "value with every variant, e.g. 'link-delay=0 5 20'; repeatable")
        g.add_argument("--out", default="", metavar="DIR",
                       help="sweep directory (default: sweeps/<time>)")
    else:
        p = _Parser(prog="launch.py", formatter_class=_Help,
                    description="Train a network with Decoupled Neural Interfaces (synthetic "
                                "gradients), one operating-system process per layer, over "
                                "ZeroMQ. The task is binary addition, as in the original notebook, or "
                                "classification data from MNIST-format or NumPy files.",
                    epilog=COMMANDS[0].upper() + COMMANDS[1:])
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(Config):
        m = f.metadata
        if not m["cli"] or (sweep and not m["sweep"]):
            continue
        if m["group"] not in groups:
            groups[m["group"]] = p.add_argument_group(m["group"])
        _add_option(groups[m["group"]], f)
        if f.name == "checkpoint_every" and not sweep:
            groups[m["group"]].add_argument(
                "--resume", metavar="RUN_DIR",
                help="go on with an interrupted or failed run from its last checkpoint (its "
                     "own settings; other options are ignored but --quiet)")
    if not sweep:
        add_engine_options(p)
    return p


LAUNCHERS = ("auto", "local", "mpi", "slurm", "k8s", "env")  # as pipeline.net.engines knows them


def add_engine_options(p: argparse.ArgumentParser) -> None:
    """How the processes are started: the options every rank an engine starts reads."""
    g = p.add_argument_group("engines (docs/clusters.md)")
    g.add_argument("--launcher", choices=LAUNCHERS, default="auto",
                   help="what started this process: auto recognises mpiexec, srun, a "
                        "Kubernetes Indexed Job and torchrun-style RANK/WORLD_SIZE from their "
                        "variables; local starts every role here")
    g.add_argument("--keys", metavar="DIR", default=None,
                   help="CURVE key directory (launch.py keys) for srun, Kubernetes and "
                        "torchrun-style runs, from shared storage or a Secret; MPI runs make "
                        "per-run keys and need none")
    g.add_argument("--insecure", action="store_true",
                   help="under an engine other than MPI, without --keys: allow non-loopback "
                        "addresses in the clear")


@dataclass(frozen=True)
class EngineArgs:
    launcher: str
    keys: str | None
    insecure: bool
    quiet: bool


def parse_engine(argv: list[str]) -> EngineArgs:
    """Only the engine options of a run's argv (every rank reads these; rank
    0 alone parses the rest, so other hosts need no data files)."""
    p = _Parser(prog="launch.py", add_help=False)
    add_engine_options(p)
    p.add_argument("--quiet", action="store_true")
    a, _ = p.parse_known_args(argv)
    return EngineArgs(a.launcher, a.keys, a.insecure, a.quiet)


def _check_path(p: argparse.ArgumentParser, option: str, path: str | None,
                room: int = 0) -> None:
    """One line naming ``option`` where ``path``, with ``room`` bytes written
    inside it, is longer than a file system takes."""
    if path:
        try:
            files.check_path(path, option, inside=room)
        except ValueError as exc:
            p.error(str(exc))


def _config(p: argparse.ArgumentParser, a: argparse.Namespace, **override) -> Config:
    """The Config of parsed options: every field from its option (or
    ``override``), options left unsaid from the task's defaults, then the
    Config's."""
    given = {**vars(a), **override}
    _check_path(p, "--run-dir", given["run_dir"], runfiles.LONGEST_INSIDE)
    _check_path(p, "--data-dir", given["data_dir"], len("train-images-idx3-ubyte.gz"))
    _check_path(p, "--dataset", given["dataset"].removeprefix("npz:"))
    if given.get("tensorboard"):
        from pipeline.run import tensorboard
        try:
            tensorboard.require()
        except ValueError as exc:
            p.error(str(exc))
    # Beyond the bound, --layers is refused by the Config, naming it; the
    # default widths of so many layers are never made.
    task = {"hidden": default_hidden(min(given["layers"], limits.MAX_LAYERS + 1)),
            **defaults_for(given["dataset"], given["unlock"])}
    all_examples = given["examples"] is None and given["dataset"] != "addition"
    fields = {}
    for f in dataclasses.fields(Config):
        if f.name not in given:
            continue  # not an option (derived from the data, or set by --resume)
        value = given[f.name]
        if value is None:
            value = task.get(f.name, f.default)
        fields[f.name] = value
    fields["link_delay_ms"], fields["link_jitter_ms"] = given["link_delay_ms"] or (0.0, 0.0)
    fields["slow"] = tuple(given["slow"])
    fields["layer_step_ms"] = tuple(given["layer_step_ms"])
    try:
        cfg = tasks.resolve(Config(**fields), limit_examples=not all_examples)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # unreachable: error() exits
    if cfg.timing_from:
        try:
            measured(cfg.timing_from)  # a run directory without them: one line now
        except ValueError as exc:
            p.error(str(exc))
    return cfg


def parse_run(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """The run's Config, and the run directory named by --resume (or None)."""
    p = build_parser()
    a = p.parse_args(argv)
    _check_path(p, "--resume", a.resume, runfiles.LONGEST_INSIDE)
    return _config(p, a), a.resume


def parse(argv: list[str] | None = None) -> Config:
    return parse_run(argv)[0]


@dataclass(frozen=True)
class SweepArgs:
    bases: dict[str, Config]  # per variant ("" without), every run option; mode,
                              # delay and seed vary per point
    modes: list[str]
    delays: list[int]
    seeds: list[int]
    out: str
    unlocks: list[str] = dataclasses.field(default_factory=lambda: ["none"])
    input_delays: list[int] = dataclasses.field(default_factory=lambda: [0])

    @property
    def variants(self) -> list[str]:
        return list(self.bases)


MAX_SEEDS = 1000  # per point of a sweep; every seed is a run
GRID_AXES = ("modes", "grad_delay", "unlock", "input_delay", "seed", "seeds", "out")


def parse_sweep(argv: list[str]) -> SweepArgs:
    p = build_parser(sweep=True)
    a = p.parse_args(argv)
    if not 1 <= a.seeds <= MAX_SEEDS:
        p.error(f"argument --seeds: must be in [1, {MAX_SEEDS}], got {limits.shown(a.seeds)}")
    if 0 <= a.seed < 2 ** 32 <= a.seed + a.seeds - 1:  # a bad --seed itself: the Config's
        p.error(f"argument --seeds: --seed {a.seed} + {a.seeds} seeds pass 2**32 - 1, the "
                "largest seed")
    if min(a.grad_delay) < 0:
        p.error("argument --grad-delay: delays must be at least 0")
    if min(a.input_delay) < 0:
        p.error("argument --input-delay: delays must be at least 0")
    seeds = list(range(a.seed, a.seed + a.seeds))
    parsed = {"": a}
    if a.axis:
        a.variant = expand_axes(a.variant, a.axis)
    if a.variant:
        parsed = {}
        for name, options in a.variant:
            if name in parsed:
                p.error(f"argument --variant: {name} is named twice")
            extra = p.parse_known_args(options)[1]
            if extra:
                p.error(f"argument --variant: {name}: unrecognized arguments: {' '.join(extra)}")
            va = p.parse_args(argv + options)
            moved = [x for x in GRID_AXES if getattr(va, x) != getattr(a, x)]
            if moved:
                p.error(f"argument --variant: {name} sets --{moved[0].replace('_', '-')}; "
                        "a variant holds run options, the grid's axes are the sweep's")
            parsed[name] = va
    bases = {}
    for name, va in parsed.items():
        # Check every point's configuration now, not an hour into the sweep.
        from pipeline.run.sweep import grid
        points = grid(a.modes, a.grad_delay, seeds[:1], [name], a.unlock, a.input_delay)
        if not points:
            p.error("argument --input-delay: no point of the grid can run (an input delay "
                    "needs --unlock forward, an SG mode and a gradient delay at least as long)")
        for pt in points:
            _config(p, va, **pt.fields(), run_dir="")
        # The variant's options, from an unlocked point if there is one (so
        # they keep their synthetic-input options): each point sets its own.
        base = next((pt for pt in points if pt.unlock != "none"), points[0])
        bases[name] = _config(p, va, **base.fields(), run_dir="")
    # Each point's run directory, as sweep.point_config names it (and
    # commands/sweep.py sets an earlier attempt aside), must fit under --out.
    from pipeline.run.sweep import grid
    longest = max((pt.name for pt in grid(a.modes, a.grad_delay, seeds[-1:], list(bases),
                                          a.unlock, a.input_delay)), key=len)
    _check_path(p, "--out", os.path.join(a.out or "sweeps/YYYYmmdd-HHMMSS", "runs",
                                         longest + ".attempt99"), runfiles.LONGEST_INSIDE)
    return SweepArgs(bases, a.modes, a.grad_delay, seeds, a.out, a.unlock, a.input_delay)
