"""The command line: argv -> Config, rejecting what it does not know in one line."""
from __future__ import annotations

import argparse
import re
import shlex
import sys
from dataclasses import dataclass

from pipeline import tasks
from pipeline.config import (ACTIVATIONS, CLASSIFICATION_DEFAULTS, DTYPES, MODES, OPTIMIZERS,
                             Config, ConfigError, default_hidden, defaults_for)

D = Config.__dataclass_fields__


def _default(name: str):
    return D[name].default


def _task_default(name: str) -> str:
    """Help text for an option whose default depends on the task."""
    return (f" (default: {_default(name)} on addition, {CLASSIFICATION_DEFAULTS[name]} on "
            "classification data)")


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Show defaults, except the empty ones and on/off flags."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, "", False) or isinstance(action.default, bool):
            return action.help or ""
        return super()._get_help_string(action)


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


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers like 0,1,2,4, got {text!r}") from None
    return values


def _variant(text: str) -> tuple[str, list[str]]:
    name, sep, options = text.partition(":")
    name = name.strip()
    if not sep or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+=-]*", name):
        raise argparse.ArgumentTypeError(
            f"expected NAME: OPTIONS like 'bn: --batchnorm' (NAME of letters, digits, "
            f"_ . + = -), got {text!r}")
    try:
        return name, shlex.split(options)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"variant {name}: {exc}") from None


def build_parser(sweep: bool = False) -> argparse.ArgumentParser:
    """The run's options; with ``sweep``, the grid's axes take lists instead."""
    if sweep:
        p = _Parser(prog="launch.py sweep", formatter_class=_Help,
                    description="Run a grid of modes x gradient delays x seeds, one run "
                                "directory per point, then write results.csv, results.md and "
                                "a plot of final accuracy against staleness. Points already "
                                "completed are not run again, so an interrupted sweep resumes.")
        g = p.add_argument_group("sweep")
        g.add_argument("--modes", type=_names, default=["cdni", "async-backprop"],
                       help="comma-separated modes (backprop runs at delay 0 only)")
        g.add_argument("--grad-delay", type=_ints, default=[0, 1, 2, 4, 8, 16],
                       help="comma-separated injected gradient delays K")
        g.add_argument("--seeds", type=int, default=3, help="seeds per point: --seed, --seed+1, ...")
        g.add_argument("--variant", type=_variant, action="append", default=[],
                       metavar="'NAME: OPTIONS'",
                       help="a named set of run options added to the others, e.g. "
                            "'sgd: --optimizer sgd --lr 0.05 --momentum 0.9'; repeatable: "
                            "every variant runs the whole grid (default: one, unnamed)")
        g.add_argument("--out", default="", help="sweep directory (default: sweeps/<time>)")
    else:
        p = _Parser(prog="launch.py", formatter_class=_Help,
                    description="Train a network with Decoupled Neural Interfaces (synthetic "
                                "gradients), one operating-system process per layer, over "
                                "ZeroMQ. The task is binary addition, as in the seed notebook, or "
                                "classification data from MNIST-format or NumPy files.",
                    epilog="Also: 'launch.py sweep -h' (a staleness sweep) and "
                           "'launch.py report RUN_DIR' (plots of one run).")
    net = p.add_argument_group("network")
    net.add_argument("--layers", type=int, default=_default("layers"),
                     help="weight layers, counting the output layer: 3 = two hidden layers "
                          "and the output layer, each its own process")
    net.add_argument("--hidden", type=_widths, default=None,
                     help="hidden widths, comma-separated; one number repeats for every "
                          "hidden layer (default: the seed's 128,64; deeper nets repeat 64)")
    net.add_argument("--activation", choices=ACTIVATIONS, default=None,
                     help="hidden-layer non-linearity" + _task_default("activation"))
    net.add_argument("--batchnorm", action=argparse.BooleanOptionalAction, default=None,
                     help="batch normalisation in every hidden layer (Linear, BN, "
                          "non-linearity), as the paper's MNIST nets; it keeps stale "
                          "synthetic gradients from blowing the activations up "
                          "(default: on for classification data, off on addition)")
    net.add_argument("--sg-hidden", type=_widths, default=None,
                     help="hidden ReLU widths of every synthetic-gradient module, "
                          "comma-separated (default: none, a linear module)")
    net.add_argument("--sg-refresh", action=argparse.BooleanOptionalAction, default=True,
                     help="when a true gradient arrives after the SG module has changed, "
                          "recompute its prediction with the module as it is now before "
                          "regressing it (one more matmul per batch and layer); "
                          "--no-sg-refresh learns from the prediction it made, a gradient "
                          "at parameters some updates old")
    if not sweep:
        net.add_argument("--mode", choices=MODES, default=_default("mode"),
                         help="cdni: synthetic gradients conditioned on the labels; dni: on "
                              "the activations only; backprop: locked true gradients (the "
                              "baseline); async-backprop: true gradients applied whenever they "
                              "arrive, however stale")
    tr = p.add_argument_group("training")
    tr.add_argument("--epochs", type=int, default=None,
                    help="passes over the data" + _task_default("epochs"))
    tr.add_argument("--batch-size", type=int, default=None,
                    help="examples per batch (the last batch of an epoch may be short)"
                         + _task_default("batch_size"))
    tr.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                    help="for every layer and every SG module, each with its own state"
                         + _task_default("optimizer"))
    tr.add_argument("--momentum", type=float, default=_default("momentum"),
                    help="SGD's heavy-ball momentum for every layer and SG module "
                         "(0: plain SGD; Adam keeps its own)")
    tr.add_argument("--lr", type=float, default=None,
                    help="layer learning rate, on the batch-mean loss" + _task_default("lr"))
    tr.add_argument("--sg-lr", type=float, default=None,
                    help="learning rate of the synthetic-gradient modules"
                         + _task_default("sg_lr"))
    tr.add_argument("--dtype", choices=DTYPES, default=None,
                    help="floating-point type of the math and the messages"
                         + _task_default("dtype"))
    tr.add_argument("--seed", type=int, default=_default("seed"),
                    help="seeds the data and every layer's initial weights")
    task = p.add_argument_group("data")
    task.add_argument("--dataset", default=_default("dataset"), metavar="NAME",
                      help="addition (the seed task: binary addition of --bits numbers), "
                           "mnist (the MNIST or Fashion-MNIST IDX files in --data-dir, plain "
                           "or .gz) or npz:PATH (a NumPy archive with x_train, y_train and "
                           "optionally x_test, y_test)")
    task.add_argument("--data-dir", default="", metavar="DIR",
                      help="--dataset mnist: the directory holding train-images-idx3-ubyte, "
                           "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
                           "t10k-labels-idx1-ubyte")
    task.add_argument("--bits", type=int, default=_default("bits"),
                      help="addition: bits per operand and sum")
    task.add_argument("--examples", type=int, default=None,
                      help="training examples (default: 100 on addition; a dataset's "
                           "first N, default all)")
    task.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=None,
                      help="reshuffle the training batches every epoch, from --seed "
                           "(default: on for classification data, off on addition)")
    pipe = p.add_argument_group("pipeline")
    pipe.add_argument("--lockstep", action="store_true",
                      help="deterministic schedule: the same weights, bit for bit, as the "
                           "in-process reference")
    pipe.add_argument("--max-inflight", type=int, default=_default("max_inflight"),
                      help="batches a layer may hold awaiting their true gradient, beyond "
                           "--grad-delay, before it stops taking new ones (backpressure)")
    pipe.add_argument("--blas-threads", type=int, default=_default("blas_threads"),
                      help="BLAS threads per process (processes share the cores)")
    pipe.add_argument("--in-process", action="store_true",
                      help="train the same configuration with the in-process reference "
                           "(the baseline to time against); writes the same run directory")
    ft = p.add_argument_group("faults")
    ft.add_argument("--checkpoint-every", type=int, default=_default("checkpoint_every"),
                    metavar="N", help="every N epochs, save every layer's weights, SG module "
                                      "and counters to RUN_DIR/checkpoints (0: never)")
    if not sweep:
        ft.add_argument("--resume", metavar="RUN_DIR",
                        help="go on with an interrupted or failed run from its last "
                             "checkpoint (its own settings; other options are ignored "
                             "but --quiet)")
    st = p.add_argument_group("staleness: measure it, inject it")
    if not sweep:
        st.add_argument("--grad-delay", type=int, default=_default("grad_delay"),
                        help="apply every true gradient exactly K of the layer's steps late "
                             "(exact under --lockstep; at least K free-running)")
    st.add_argument("--link-delay", type=_link_delay, default=None, metavar="MS[:JITTER]",
                    help="wall-clock delay on the gradient links, with optional +-jitter "
                         "(order is kept); free-running only")
    st.add_argument("--delay-activations", action="store_true",
                    help="put the --link-delay on the activation links too")
    st.add_argument("--slow", type=_straggler, action="append", default=[],
                    metavar="LAYER:FACTOR",
                    help="layer LAYER (1..N) computes FACTOR times slower; repeatable")
    st.add_argument("--update-prob", type=float, default=_default("update_prob"),
                    help="each layer applies each weight update only with this probability "
                         "(the paper's update-decoupling experiment)")
    st.add_argument("--drop-prob", type=float, default=_default("drop_prob"),
                    help="each true-gradient message is lost with this probability")
    rem = p.add_argument_group(
        "staleness remedies (each off at 0; tau: a gradient's staleness in the layer's "
        "steps, tau_bar: the running mean of the last ~10; see docs/staleness.md)")
    rem.add_argument("--sg-boost", type=float, default=_default("sg_boost"), metavar="A",
                     help="two timescales: an SG module regressing a target tau steps stale "
                          "steps (1 + A*tau) times --sg-lr")
    rem.add_argument("--lr-staleness", type=float, default=_default("lr_staleness"),
                     metavar="B",
                     help="staleness-aware layer step, lr / (1 + B*tau): tau of the true "
                          "gradient applied (async-backprop), tau_bar of the SG module's "
                          "feedback (dni, cdni)")
    rem.add_argument("--sg-lookahead", type=float, default=_default("sg_lookahead"),
                     metavar="S",
                     help="weight prediction: a layer steps on its SG module extrapolated "
                          "S*tau_bar of the module's updates ahead along its recent drift")
    rem.add_argument("--delay-comp", type=float, default=_default("delay_comp"),
                     metavar="LAMBDA",
                     help="async-backprop: DC-ASGD's correction g + LAMBDA*g*g*(w_now - w_then) "
                          "of a true gradient computed at older weights")
    out = p.add_argument_group("output")
    if not sweep:
        out.add_argument("--run-dir", default="",
                         help="directory for config.json, metrics.jsonl, summary.json and "
                              "weights (default: runs/<time>-<mode>-<id>)")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    return p


TASK_OPTIONS = ("activation", "hidden", "epochs", "batch_size", "optimizer", "lr", "sg_lr",
                "dtype", "examples", "shuffle", "batchnorm")


def _config(p: argparse.ArgumentParser, a: argparse.Namespace, **override) -> Config:
    fields = dict(vars(a))
    fields.update(override)
    # Options left unsaid take the task's defaults, then the Config's.
    task = {"hidden": default_hidden(fields["layers"]), **defaults_for(fields["dataset"])}
    all_examples = fields["examples"] is None and fields["dataset"] != "addition"
    for name in TASK_OPTIONS:
        if fields[name] is None:
            fields[name] = task.get(name, _default(name))
    hidden = fields["hidden"]
    delay, jitter = fields["link_delay"] or (0.0, 0.0)
    try:
        cfg = Config(layers=fields["layers"], hidden=hidden, activation=fields["activation"],
                      mode=fields["mode"], epochs=fields["epochs"],
                      batch_size=fields["batch_size"], lr=fields["lr"], sg_lr=fields["sg_lr"],
                      optimizer=fields["optimizer"], momentum=fields["momentum"],
                      sg_boost=fields["sg_boost"], lr_staleness=fields["lr_staleness"],
                      sg_lookahead=fields["sg_lookahead"], delay_comp=fields["delay_comp"],
                      sg_hidden=fields["sg_hidden"] or (),
                      batchnorm=fields["batchnorm"], sg_refresh=fields["sg_refresh"],
                      dtype=fields["dtype"],
                      dataset=fields["dataset"], data_dir=fields["data_dir"],
                      shuffle=fields["shuffle"],
                      seed=fields["seed"], bits=fields["bits"], examples=fields["examples"],
                      lockstep=fields["lockstep"], max_inflight=fields["max_inflight"],
                      blas_threads=fields["blas_threads"], grad_delay=fields["grad_delay"],
                      link_delay_ms=delay, link_jitter_ms=jitter,
                      delay_activations=fields["delay_activations"], slow=tuple(fields["slow"]),
                      update_prob=fields["update_prob"], drop_prob=fields["drop_prob"],
                      checkpoint_every=fields["checkpoint_every"],
                      in_process=fields["in_process"], run_dir=fields["run_dir"],
                      quiet=fields["quiet"])
        return tasks.resolve(cfg, limit_examples=not all_examples)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # unreachable: error() exits


def parse_run(argv: list[str] | None = None) -> tuple[Config, str | None]:
    """The run's Config, and the run directory named by --resume (or None)."""
    p = build_parser()
    a = p.parse_args(argv)
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

    @property
    def variants(self) -> list[str]:
        return list(self.bases)


GRID_AXES = ("modes", "grad_delay", "seed", "seeds", "out")


def parse_sweep(argv: list[str]) -> SweepArgs:
    p = build_parser(sweep=True)
    a = p.parse_args(argv)
    if a.seeds < 1:
        p.error("argument --seeds: must be at least 1")
    if min(a.grad_delay) < 0:
        p.error("argument --grad-delay: delays must be at least 0")
    seeds = list(range(a.seed, a.seed + a.seeds))
    parsed = {"": a}
    if a.variant:
        parsed = {}
        for name, options in a.variant:
            if name in parsed:
                p.error(f"argument --variant: {name} is named twice")
            va = p.parse_args(argv + options)
            moved = [x for x in GRID_AXES if getattr(va, x) != getattr(a, x)]
            if moved:
                p.error(f"argument --variant: {name} sets --{moved[0].replace('_', '-')}; "
                        "a variant holds run options, the grid's axes are the sweep's")
            parsed[name] = va
    bases = {}
    for name, va in parsed.items():
        # Check every point's configuration now, not an hour into the sweep.
        for mode in a.modes:
            for delay in ([0] if mode == "backprop" else a.grad_delay):
                _config(p, va, mode=mode, grad_delay=delay, run_dir="")
        bases[name] = _config(p, va, mode=a.modes[0], grad_delay=0, run_dir="")
    return SweepArgs(bases, a.modes, a.grad_delay, seeds, a.out)


def parse_report(argv: list[str]) -> str:
    p = _Parser(prog="launch.py report",
                description="Summarise one run directory and draw its loss curves, SG quality "
                            "and staleness histogram to RUN_DIR/report.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by launch.py")
    return p.parse_args(argv).run_dir


@dataclass(frozen=True)
class ClusterArgs:
    cluster: str
    role: str | None
    insecure: bool
    run_dir: str
    quiet: bool
    resume: str | None = None


def parse_cluster(argv: list[str]) -> ClusterArgs:
    p = _Parser(prog="launch.py --cluster",
                description="Run the roles of a cluster file: the one named by --role, or "
                            "every role the file assigns to this host. The run's options "
                            "are the file's [run] table.")
    p.add_argument("--cluster", required=True, metavar="FILE", help="cluster file (TOML or JSON)")
    p.add_argument("--role", help="run only this role (coordinator, source, layer1, ..., output)")
    p.add_argument("--insecure", action="store_true",
                   help="allow non-loopback addresses without CURVE keys (traffic in the clear)")
    p.add_argument("--run-dir", default="", help="the coordinator's run directory")
    p.add_argument("--resume", metavar="RUN_DIR",
                   help="the coordinator goes on from this run directory's last checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    return ClusterArgs(a.cluster, a.role, a.insecure, a.run_dir, a.quiet, a.resume)


def parse_keys(argv: list[str]) -> tuple[str, int]:
    p = _Parser(prog="launch.py keys",
                description="Generate one CURVE keypair per role (<role>.key public, "
                            "<role>.key_secret secret). Copy the directory to every host "
                            "and name it in the cluster file: only these keys may connect.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the keys")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=int, default=None, help="weight layers of the run")
    g.add_argument("--cluster", metavar="FILE", help="take the layers from a cluster file")
    a = p.parse_args(argv)
    if a.cluster:
        from pipeline import cluster
        try:
            layers = cluster.load(a.cluster).config().layers
        except ValueError as exc:
            p.error(f"argument --cluster: {exc}")
    else:
        layers = a.layers if a.layers is not None else _default("layers")
    if layers < 2:
        p.error("argument --layers: must be at least 2")
    return a.out, layers
