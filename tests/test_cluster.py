"""Cluster runs on loopback: a cluster file, CURVE keys, roles started one by
one, a role killed mid-run, a role that rejoins, and intruders kept out."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zmq

from pipeline.net import security
from pipeline.wire import codec as wire, protocol
from pipeline.config import Config, defaults_for
from tests.conftest import _alive, error_line, run_launch
from tests.test_pipeline import assert_bit_identical, reference_weights

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(90)


_held: list[socket.socket] = []  # ports handed to the current test's cluster file


@pytest.fixture(autouse=True)
def _release_ports():
    yield
    while _held:
        _held.pop().close()


def _hold(port: int) -> socket.socket | None:
    """A TCP socket bound to ``port`` on loopback (0: the kernel picks), or None."""
    s = socket.socket()
    # SO_REUSEADDR on a socket that never listens: a role's listener (libzmq
    # sets it too) may bind the same port, and nothing else may.
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return None
    return s


def free_ports(n: int, width: int = 2) -> list[int]:
    """n ports the kernel gave (bind to port 0), each with the next ones too
    (``width`` in all: hidden layers use PORT+1, and PORT+2 unlocked), held
    until the test ends.

    A cluster file must name its ports, so a role binds a number we chose.
    Checking that a port is free and then closing the check leaves it open
    to anyone until the role binds it, even to the run's own outgoing
    connections. Held instead by a socket bound and never listening, a
    port is never handed to an outgoing connection nor bound by anyone
    else, while the role's listener can still bind it beside ours.
    """
    ports: list[int] = []
    while len(ports) < n:
        first = _hold(0)
        assert first is not None, "the kernel gave no port"
        port = first.getsockname()[1]
        rest = [_hold(port + i) if port + i <= 65535 else None for i in range(1, width)]
        if None in rest:
            for sock in [first, *rest]:
                if sock is not None:
                    sock.close()
            continue
        _held.extend([first, *rest])
        ports.append(port)
    return ports


def test_free_ports_are_held_for_the_roles_alone():
    """Each port and the next: refused to any other bind, taken by a role's
    listener (libzmq's), and free again once the test lets go of them."""
    ports = free_ports(2)
    ctx = zmq.Context()
    try:
        for port in ports:
            for p in (port, port + 1):
                with socket.socket() as other, pytest.raises(OSError):
                    other.bind(("127.0.0.1", p))
                listener = ctx.socket(zmq.PULL)
                listener.linger = 0
                listener.bind(f"tcp://127.0.0.1:{p}")
                listener.close()
    finally:
        ctx.term()
    while _held:
        _held.pop().close()
    with socket.socket() as again:
        again.bind(("127.0.0.1", ports[0]))


def write_cluster(tmp: Path, run: dict, keys: bool = True) -> Path:
    c, l1, l2, out = free_ports(4, width=3 if run.get("unlock", "none") != "none" else 2)
    lines = ['keys = "keys"'] if keys else []
    lines += ["[run]"] + [f"{k} = {json.dumps(v)}" for k, v in run.items()]
    lines += ["[roles]", f'coordinator = "127.0.0.1:{c}"', 'source = "127.0.0.1"',
              f'layer1 = "127.0.0.1:{l1}"', f'layer2 = "127.0.0.1:{l2}"',
              f'output = "127.0.0.1:{out}"']
    path = tmp / "cluster.toml"
    path.write_text("\n".join(lines) + "\n")
    if keys:
        security.generate_keys(tmp / "keys", protocol.all_roles(run.get("layers", 3)))
    return path


class Roles:
    """Launch processes of one cluster run, each in its own group, all ended
    by the test (by pid) whatever happens."""

    def __init__(self, tmp: Path, cluster: Path):
        self.tmp, self.cluster = tmp, cluster
        self.procs: dict[str, subprocess.Popen] = {}

    def start(self, role: str | None, *extra: str) -> subprocess.Popen:
        name = role or "host"
        log = open(self.tmp / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "launch.py", "--cluster", str(self.cluster),
                              *(["--role", role] if role else []), "--quiet", *extra],
                             cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        self.procs[name] = p
        return p

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text()

    def end(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


@pytest.fixture
def roles(tmp_path):
    made: list[Roles] = []

    def make(cluster: Path) -> Roles:
        made.append(Roles(tmp_path, cluster))
        return made[-1]

    yield make
    for r in made:
        r.end()


class Weights:
    """A finished run directory, as assert_bit_identical reads it."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def weights(self, role: str) -> dict[str, np.ndarray]:
        with np.load(self.run_dir / "weights" / f"{role}.npz") as z:
            return {k: z[k] for k in z.files}


def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)  # polling interval of a condition, not a synchronisation


def epoch_logged(run_dir: Path) -> bool:
    m = run_dir / "metrics.jsonl"
    return m.exists() and '"event": "epoch"' in m.read_text()


@pytest.mark.slow
def test_cluster_run_with_keys_converges_and_writes_the_run_directory(tmp_path, roles):
    cluster = write_cluster(tmp_path, {"epochs": 600})
    r = roles(cluster)
    host = r.start(None, "--run-dir", str(tmp_path / "run"))
    assert host.wait(60) == 0, r.log("host")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["train_accuracy"] == 1.0
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["cluster"] == str(cluster)
    assert {p["host"] for p in config["processes"].values()} == {"127.0.0.1"}
    assert (tmp_path / "run" / "weights" / "layer1.npz").exists()


@pytest.mark.slow
def test_unlocked_cluster_run_with_keys_equals_the_reference(tmp_path, roles):
    """--unlock forward from a cluster file: layer2 binds PORT+2 and the
    output layer PORT+1 for the source's inputs, over CURVE; under lockstep
    the weights are the reference's bit for bit."""
    run = {"epochs": 20, "lockstep": True, "seed": 4, "unlock": "forward", "grad_delay": 1,
           "input_delay": 1}
    cluster = write_cluster(tmp_path, run)
    r = roles(cluster)
    host = r.start(None, "--run-dir", str(tmp_path / "run"))
    assert host.wait(60) == 0, r.log("host")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    ports = {role: {name: int(ep.rsplit(":", 1)[1]) for name, ep in p["endpoints"].items()}
             for role, p in config["processes"].items() if p["endpoints"]}
    assert ports["layer2"]["input"] == ports["layer2"]["act"] + 2
    assert ports["output"]["input"] == ports["output"]["act"] + 1
    assert "input" not in ports["layer1"]
    cfg = Config(**defaults_for("addition", "forward"), **run)  # as the cluster file's
    assert_bit_identical(Weights(tmp_path / "run"), reference_weights(cfg))


@pytest.mark.slow
def test_roles_started_one_by_one_equal_the_reference(tmp_path, roles):
    """Each role its own process, the coordinator last; under lockstep the
    weights are the reference's bit for bit: the cluster path changes nothing."""
    cluster = write_cluster(tmp_path, {"epochs": 20, "lockstep": True, "seed": 4})
    r = roles(cluster)
    for role in ["output", "layer2", "layer1", "source"]:
        r.start(role)
    coord = r.start("coordinator", "--run-dir", str(tmp_path / "run"))
    assert coord.wait(60) == 0, r.log("coordinator")
    for role in ["output", "layer2", "layer1", "source"]:
        assert r.procs[role].wait(10) == 0, r.log(role)

    assert_bit_identical(Weights(tmp_path / "run"), reference_weights(Config(epochs=20, lockstep=True, seed=4)))


@pytest.mark.slow
def test_role_killed_mid_run_fails_the_run_naming_role_and_host(tmp_path, roles):
    cluster = write_cluster(tmp_path, {"epochs": 100000})
    r = roles(cluster)
    for role in ["source", "layer1", "layer2", "output"]:
        r.start(role)
    coord = r.start("coordinator", "--run-dir", str(tmp_path / "run"))
    wait_for(lambda: epoch_logged(tmp_path / "run"), "training to start")
    r.procs["layer2"].send_signal(signal.SIGKILL)
    assert coord.wait(15) == 1, r.log("coordinator")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"]["role"] == "layer2" and summary["error"]["host"] == "127.0.0.1"
    # Its launcher killed, the worker was ended by the kernel's SIGTERM
    # (PDEATHSIG): it says so, and is named once silent for 5 s, as a dead
    # one would be.
    assert summary["error"]["message"] == ("layer2 on 127.0.0.1 was stopped from outside the "
                                           "run (signal 15)")
    for role in ["source", "layer1", "output"]:  # told to stop, they do
        r.procs[role].wait(10)
    assert not [n for n, p in r.procs.items() if _alive(p.pid)]


@pytest.mark.slow
def test_a_role_restarted_before_the_start_rejoins(tmp_path, roles):
    cluster = write_cluster(tmp_path, {"epochs": 30})
    r = roles(cluster)
    coord = r.start("coordinator", "--run-dir", str(tmp_path / "run"))
    coord_log = lambda: r.log("coordinator")  # noqa: E731
    for role in ["source", "layer1", "layer2"]:
        r.start(role)
    # The coordinator announces each role that joins: a handshake to wait on.
    wait_for(lambda: "layer2 joined" in coord_log(), "layer2 to join")
    first = r.procs["layer2"]
    first.send_signal(signal.SIGKILL)
    first.wait(5)
    r.start("layer2")          # it comes back on its own...
    wait_for(lambda: "layer2 rejoined" in coord_log(), "layer2 to rejoin")
    r.start("output")          # ...and once the last role is there, the run begins
    assert coord.wait(60) == 0, coord_log()
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_non_loopback_without_keys_is_refused(tmp_path):
    cluster = tmp_path / "cluster.toml"
    cluster.write_text('[roles]\ncoordinator = "127.0.0.1:47900"\nsource = "127.0.0.1"\n'
                       'layer1 = "10.254.254.1:47902"\nlayer2 = "127.0.0.1:47904"\n'
                       'output = "127.0.0.1:47906"\n')
    done = subprocess.run([sys.executable, "launch.py", "--cluster", str(cluster), "--role",
                           "coordinator"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2
    assert "10.254.254.1" in done.stderr and "keys" in done.stderr and "--insecure" in done.stderr


@pytest.mark.slow
@pytest.mark.parametrize("intruder", ["foreign-key", "no-curve"])
def test_a_peer_without_a_listed_key_reaches_nothing(tmp_path, roles, intruder):
    """Messages from a peer whose key is not in the cluster's key directory
    (or who speaks without CURVE) never reach a worker: no decode error is
    even counted, and the weights are the reference's bit for bit."""
    cluster = write_cluster(tmp_path, {"epochs": 200, "lockstep": True, "seed": 2})
    r = roles(cluster)
    coord = r.start(None, "--run-dir", str(tmp_path / "run"))
    wait_for(lambda: (tmp_path / "run" / "config.json").exists(), "the start")
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    keys = security.load_keys(tmp_path / "keys", "source")
    if intruder == "foreign-key":
        security.generate_keys(tmp_path / "foreign", ["source"])
        foreign = security.load_keys(tmp_path / "foreign", "source")
        keys = security.Keys("source", foreign.public, foreign.secret, keys.peers,
                             keys.directory)
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.linger = 0
        if intruder == "foreign-key":
            security.make_client(sock, keys, "layer1")
        sock.connect(config["processes"]["layer1"]["endpoints"]["act"])
        msg = protocol.Message(protocol.ACT, config["run_id"], batch=5, sender="source",
                           arrays=(np.ones((10, 16)), np.ones((10, 8))))
        for _ in range(20):
            try:
                sock.send_multipart(wire.encode(msg), flags=zmq.NOBLOCK)
            except zmq.Again:
                pass
        sock.close()
    finally:
        ctx.term()
    assert coord.wait(60) == 0, r.log("host")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert [L["decode_errors"] for L in summary["layers"]] == [0, 0, 0]

    assert_bit_identical(Weights(tmp_path / "run"), reference_weights(Config(epochs=200, lockstep=True, seed=2)))


@pytest.mark.slow
@pytest.mark.parametrize("text, reason", [
    ("[roles\n", "not valid TOML"),
    ('[roles]\ncoordinator = "127.0.0.1:5000"\n', "missing"),
    ('[run]\nlayers = 3\nfoo = 1\n[roles]\n', "run options"),
    ('bogus = 1\n', "unknown keys"),
    ('[roles]\ncoordinator = "127.0.0.1:5000"\nsource = "127.0.0.1"\nlayer1 = "127.0.0.1:4999"\n'
     'layer2 = "127.0.0.1:5004"\noutput = "127.0.0.1:5006"\n', "both listen"),
    ('[roles]\ncoordinator = "127.0.0.1"\nsource = "127.0.0.1"\nlayer1 = "127.0.0.1:5002"\n'
     'layer2 = "127.0.0.1:5004"\noutput = "127.0.0.1:5006"\n', "needs a port"),
])
def test_bad_cluster_file_is_one_clear_error(tmp_path, text, reason):
    path = tmp_path / "c.toml"
    path.write_text(text)
    line = error_line(run_launch("--cluster", str(path), timeout=30))
    assert reason in line and str(path) in line


@pytest.mark.slow
def test_cluster_run_on_a_classification_dataset_equals_the_reference(tmp_path, roles):
    """A [run] table naming a dataset takes the classification defaults, the
    coordinator sizes the layers from the file, and under lockstep the
    weights are the reference's bit for bit (float32, Adam, shuffling)."""
    from pipeline.data import tasks
    from pipeline.net import cluster as clusters
    from tests.test_classification import assert_bit_identical as same_bits, blobs
    data = blobs(tmp_path / "blobs.npz", seed=6, train=120, test=40)
    run = {"dataset": data, "epochs": 3, "lockstep": True, "hidden": [16], "batch_size": 20}
    cluster = write_cluster(tmp_path, run)
    r = roles(cluster)
    host = r.start(None, "--run-dir", str(tmp_path / "run"))
    assert host.wait(60) == 0, r.log("host")
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["test_accuracy"] is not None
    cfg = tasks.resolve(clusters.load(cluster).config(), limit_examples=False)
    assert (cfg.dtype, cfg.optimizer, cfg.features, cfg.classes) == ("float32", "adam", 12, 4)
    same_bits(Weights(tmp_path / "run"), reference_weights(cfg))


def test_unlocked_layers_listen_on_one_more_port(tmp_path):
    """Under --unlock forward a hidden layer above the first binds PORT+2
    and the output layer PORT+1 for the source's inputs (pure: no process)."""
    from pipeline.net import cluster as clusters
    roles_ = ('[roles]\ncoordinator = "127.0.0.1:5000"\nsource = "127.0.0.1"\n'
              'layer1 = "127.0.0.1:5002"\nlayer2 = "127.0.0.1:5004"\noutput = "127.0.0.1:5006"\n')
    path = tmp_path / "c.toml"
    path.write_text(roles_)
    clusters.load(path)                                   # locked: 5004, 5005 and 5006
    path.write_text('[run]\nunlock = "forward"\n' + roles_)
    with pytest.raises(ValueError, match="layer2 and output both listen on 127.0.0.1:5006|"
                                         "output and layer2 both listen on 127.0.0.1:5006"):
        clusters.load(path)
    path.write_text('[run]\nunlock = "forward"\n' + roles_.replace(":5006", ":5007"))
    clusters.load(path)                                   # output on 5007 and 5008
    path.write_text('[run]\nunlock = "hidden"\n' + roles_)     # layer2 takes 5006 too
    with pytest.raises(ValueError, match="both listen on 127.0.0.1:5006"):
        clusters.load(path)
    path.write_text('[run]\nunlock = "hidden"\n' + roles_.replace(":5006", ":5007"))
    clusters.load(path)                       # the output layer stays locked: 5007 alone
