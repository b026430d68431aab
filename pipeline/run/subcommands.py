"""The command line of the commands besides a run and a sweep: ``report``,
``keys``, ``data`` and a cluster host (``--cluster``), each one line and
exit 2 for a bad argument, as ``cli`` does for a run."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from urllib.parse import urlsplit

from pipeline.run.cli import D, _check_path, _default, _Help, _Parser
from pipeline import files, limits
from pipeline.data.sources import DATASETS, Dataset
from pipeline.run import runfiles


@dataclass(frozen=True)
class ReportArgs:
    run_dirs: list[str]
    out: str  # several runs' figure


def parse_report(argv: list[str]) -> ReportArgs:
    p = _Parser(prog="launch.py report",
                description="Summarise one run directory and draw its loss curves, SG quality "
                            "and staleness histogram to RUN_DIR/report.png. Given several, "
                            "print them side by side and overlay their curves in one figure "
                            "(--out), each run labelled by what differs in their "
                            "configurations.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a run directory written by launch.py; several are compared")
    p.add_argument("--out", metavar="FILE",
                   help="several runs' figure (default: compare.png in this directory)")
    a = p.parse_args(argv)
    for run_dir in a.run_dirs:
        _check_path(p, "RUN_DIR", run_dir, len(".report.png.tmp"))
    if a.out is not None and len(a.run_dirs) == 1:
        p.error("argument --out: only with several RUN_DIRs (one run's figure is "
                "RUN_DIR/report.png)")
    out = a.out or "compare.png"
    _check_path(p, "--out", os.path.join(os.path.dirname(out), files.temporary(
        os.path.basename(out))))
    return ReportArgs(a.run_dirs, out)


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


@dataclass(frozen=True)
class DataArgs:
    dataset: str
    directory: str
    mirror: str | None
    timeout: float
    keep_archive: bool


def parse_data(argv: list[str], table: dict[str, Dataset] = DATASETS) -> DataArgs:
    p = _Parser(prog="launch.py data", formatter_class=_Help,
                description="Download a dataset's standard files into DIR from its public "
                            "mirrors, each checked against its published SHA-256. A broken "
                            "download resumes where it stopped when the command is run again; "
                            "files already in DIR with the right checksum are kept.",
                epilog="Then: launch.py --dataset mnist --data-dir DIR (mnist, fashion-mnist) "
                       "or --dataset cifar10 --data-dir DIR. Sources and checksums: "
                       "docs/mnist.md.")
    p.add_argument("dataset", choices=sorted(table), metavar="DATASET",
                   help=f"one of {', '.join(sorted(table))} (cifar10: the binary version)")
    p.add_argument("directory", metavar="DIR", help="where the files go (made if missing)")
    p.add_argument("--mirror", metavar="URL",
                   help="fetch from this base URL (http, https, file) or local directory "
                        "instead of the public mirrors; the same checksums apply")
    p.add_argument("--timeout", type=float, default=30.0, metavar="SECONDS",
                   help="give up on a mirror that sends nothing for this long")
    p.add_argument("--keep-archive", action="store_true",
                   help="keep an archive (cifar10's .tar.gz) once its files are out")
    a = p.parse_args(argv)
    if not (math.isfinite(a.timeout) and 0 < a.timeout <= 86400):
        p.error(f"argument --timeout: must be in (0, 86400] seconds, got {a.timeout:g}")
    if a.mirror is not None:
        scheme = urlsplit(a.mirror).scheme
        if scheme not in ("http", "https", "file") and not os.path.isdir(a.mirror):
            p.error(f"argument --mirror: not an http(s):// or file:// URL, nor a directory: "
                    f"{a.mirror!r}")
    dataset = table[a.dataset]
    inside = max([len(f".{r.name}.part") for r in dataset.files]
                 + [len(os.path.join(os.path.dirname(name), files.temporary(os.path.basename(name))))
                    for name, _ in dataset.members])
    _check_path(p, "DIR", a.directory, inside)
    return DataArgs(a.dataset, a.directory, a.mirror, a.timeout, a.keep_archive)
