"""The command line of the commands besides a run and a sweep: ``report``,
``keys`` and a cluster host (``--cluster``), each one line and exit 2 for a
bad argument, as ``cli`` does for a run."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.run.cli import D, _check_path, _default, _Parser
from pipeline import limits
from pipeline.run import runfiles


def parse_report(argv: list[str]) -> str:
    p = _Parser(prog="launch.py report",
                description="Summarise one run directory and draw its loss curves, SG quality "
                            "and staleness histogram to RUN_DIR/report.png.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run directory written by launch.py")
    run_dir = p.parse_args(argv).run_dir
    _check_path(p, "RUN_DIR", run_dir, len(".report.png.tmp"))
    return run_dir


@dataclass(frozen=True)
class ClusterArgs:
    cluster: str
    role: str | None
    insecure: bool
    run_dir: str
    quiet: bool
    resume: str | None = None
    overwrite: bool = False


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
    p.add_argument("--overwrite", action="store_true",
                   help=D["overwrite"].metadata["help"] + " (the coordinator's)")
    p.add_argument("--quiet", action="store_true", help="no progress line")
    a = p.parse_args(argv)
    _check_path(p, "--run-dir", a.run_dir, runfiles.LONGEST_INSIDE)
    _check_path(p, "--resume", a.resume, runfiles.LONGEST_INSIDE)
    return ClusterArgs(a.cluster, a.role, a.insecure, a.run_dir, a.quiet, a.resume, a.overwrite)


def parse_keys(argv: list[str]) -> tuple[str, int]:
    p = _Parser(prog="launch.py keys",
                description="Generate one CURVE keypair per role (<role>.key public, "
                            "<role>.key_secret secret). Give each host every public key and "
                            "the secret keys of its own roles only, and name the directory "
                            "in the cluster file: a key opens only the sockets its role "
                            "talks to.")
    p.add_argument("--out", required=True, metavar="DIR", help="directory for the keys")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--layers", type=int, default=None, help="weight layers of the run")
    g.add_argument("--cluster", metavar="FILE", help="take the layers from a cluster file")
    a = p.parse_args(argv)
    # the longest name inside: a layer's secret key in the staging directory
    _check_path(p, "--out", a.out, len(".keys-12345678/layer1024.key_secret"))
    if a.cluster:
        from pipeline.net import cluster
        try:
            layers = cluster.load(a.cluster).config().layers
        except ValueError as exc:
            p.error(f"argument --cluster: {exc}")
    else:
        layers = a.layers if a.layers is not None else _default("layers")
    if not 2 <= layers <= limits.MAX_LAYERS:
        p.error(f"argument --layers: must be in [2, {limits.MAX_LAYERS}], got "
                f"{limits.shown(layers)}")
    return a.out, layers
