"""The command line: argv -> Config, rejecting what it does not know in one line."""
from __future__ import annotations

import argparse
import sys

from pipeline.config import ACTIVATIONS, MODES, Config, ConfigError, default_hidden

D = Config.__dataclass_fields__


def _default(name: str):
    return D[name].default


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


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="launch.py",
                description="Train a network with Decoupled Neural Interfaces (synthetic "
                            "gradients), one operating-system process per layer, over ZeroMQ. "
                            "The task is binary addition, as in the seed notebook.",
                formatter_class=_Help)
    net = p.add_argument_group("network")
    net.add_argument("--layers", type=int, default=_default("layers"),
                     help="weight layers, counting the output layer: 3 = two hidden layers "
                          "and the output layer, each its own process")
    net.add_argument("--hidden", type=_widths, default=None,
                     help="hidden widths, comma-separated; one number repeats for every "
                          "hidden layer (default: the seed's 128,64; deeper nets repeat 64)")
    net.add_argument("--activation", choices=ACTIVATIONS, default=_default("activation"),
                     help="hidden-layer non-linearity")
    net.add_argument("--mode", choices=MODES, default=_default("mode"),
                     help="cdni: synthetic gradients conditioned on the labels; dni: on the "
                          "activations only; backprop: locked true gradients (the baseline); "
                          "async-backprop: true gradients applied whenever they arrive, "
                          "however stale")
    tr = p.add_argument_group("training")
    tr.add_argument("--epochs", type=int, default=_default("epochs"), help="passes over the data")
    tr.add_argument("--batch-size", type=int, default=_default("batch_size"),
                    help="examples per batch (the last batch of an epoch may be short)")
    tr.add_argument("--lr", type=float, default=_default("lr"),
                    help="layer learning rate (SGD on the batch-mean loss)")
    tr.add_argument("--sg-lr", type=float, default=_default("sg_lr"),
                    help="learning rate of the synthetic-gradient modules")
    tr.add_argument("--seed", type=int, default=_default("seed"),
                    help="seeds the data and every layer's initial weights")
    task = p.add_argument_group("task: binary addition")
    task.add_argument("--bits", type=int, default=_default("bits"), help="bits per operand and sum")
    task.add_argument("--examples", type=int, default=_default("examples"),
                      help="training examples")
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
    st = p.add_argument_group("staleness: measure it, inject it")
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
    out = p.add_argument_group("output")
    out.add_argument("--run-dir", default="",
                     help="directory for config.json, metrics.jsonl, summary.json and weights "
                          "(default: runs/<time>-<mode>-<id>)")
    out.add_argument("--quiet", action="store_true", help="no progress line")
    return p


def parse(argv: list[str] | None = None) -> Config:
    p = build_parser()
    a = p.parse_args(argv)
    try:
        hidden = a.hidden if a.hidden is not None else default_hidden(a.layers)
        delay, jitter = a.link_delay or (0.0, 0.0)
        return Config(layers=a.layers, hidden=hidden, activation=a.activation, mode=a.mode,
                      epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, sg_lr=a.sg_lr,
                      seed=a.seed, bits=a.bits, examples=a.examples, lockstep=a.lockstep,
                      max_inflight=a.max_inflight, blas_threads=a.blas_threads,
                      grad_delay=a.grad_delay, link_delay_ms=delay, link_jitter_ms=jitter,
                      delay_activations=a.delay_activations, slow=tuple(a.slow),
                      update_prob=a.update_prob, drop_prob=a.drop_prob,
                      in_process=a.in_process, run_dir=a.run_dir, quiet=a.quiet)
    except ConfigError as exc:
        p.error(str(exc))
        raise  # unreachable: error() exits
