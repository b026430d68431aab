"""Cluster runs across real hosts: three Linux network namespaces on a bridge,
each running ``launch.py --cluster`` for the roles the file places on it.

Needs root and iproute2 (``ip``); without them the tests are skipped and say
why. Traffic stays on our own bridge and our own 10.231.77.0/24 addresses,
which exist only inside the namespaces the fixture makes and deletes.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

import pytest

from tests.conftest import _alive

ROOT = Path(__file__).resolve().parent.parent
SUBNET = "10.231.77"
HOSTS = {"A": f"{SUBNET}.1", "B": f"{SUBNET}.2", "C": f"{SUBNET}.3"}
NETNS_DIR = Path("/run/netns")
PROBE_PORT = 47399  # nothing listens there: a refused connect proves the path works

# From inside one namespace, reach every other host: a connect that is
# accepted or refused (RST) got there and back; a timeout or "unreachable" did not.
_PROBE = """
import socket, sys
port = int(sys.argv[1])
for addr in sys.argv[2:]:
    try:
        socket.create_connection((addr, port), timeout=2).close()
    except ConnectionRefusedError:
        pass
    except OSError as exc:
        sys.exit(f"{addr}:{port}: {exc}")
"""


# -- the hosts ------------------------------------------------------------------

class SetupFailed(Exception):
    pass


def _ip(*args: str) -> subprocess.CompletedProcess:
    cmd = ["ip", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=20,
                              stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SetupFailed(f"`{' '.join(cmd)}`: {exc}") from None


def _must(*args: str) -> None:
    done = _ip(*args)
    if done.returncode != 0:
        raise SetupFailed(f"`ip {' '.join(args)}` exited {done.returncode}; stderr: "
                          f"{done.stderr.strip() or '(empty)'}")


def _link_exists(name: str) -> bool:
    return _ip("link", "show", "dev", name).returncode == 0


def ns_pids(ns: str) -> set[int]:
    """Live processes inside network namespace ``ns`` (what `ip netns pids` does)."""
    try:
        target = os.stat(NETNS_DIR / ns)
    except FileNotFoundError:
        return set()
    pids = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            st = os.stat(f"/proc/{entry}/ns/net")
        except OSError:
            continue  # gone meanwhile
        if (st.st_dev, st.st_ino) == (target.st_dev, target.st_ino) and _alive(int(entry)):
            pids.add(int(entry))
    return pids


@dataclass(frozen=True)
class Hosts:
    ns: dict[str, str]     # host name (A, B, C) -> network namespace
    addr: dict[str, str]   # host name -> its address, which exists only in its namespace


def _teardown(namespaces: list[str], links: list[str]) -> list[str]:
    """Delete what setup made, by name, whatever state it got to; returns what
    could not be deleted."""
    for ns in namespaces:  # a namespace with a process in it would outlive `ip netns del`
        for pid in ns_pids(ns):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    problems = []
    for link in links:     # a veth goes with its peer, the bridge last
        if _link_exists(link):
            done = _ip("link", "del", "dev", link)
            if done.returncode != 0 and _link_exists(link):
                problems.append(f"link {link}: {done.stderr.strip()}")
    for ns in namespaces:
        if (NETNS_DIR / ns).exists():
            done = _ip("netns", "del", ns)
            if done.returncode != 0 and (NETNS_DIR / ns).exists():
                problems.append(f"netns {ns}: {done.stderr.strip()}")
    return problems


@pytest.fixture(scope="module")
def hosts():
    """Three hosts A, B, C: network namespaces whose ``eth0`` hang off one
    bridge in the root namespace, on one /24 of their own."""
    tag = secrets.token_hex(2)
    bridge = f"dnibr-{tag}"
    ns = {h: f"dni-{h.lower()}-{tag}" for h in HOSTS}
    namespaces: list[str] = []
    links: list[str] = []   # deleted in this order: veths, then the bridge
    try:
        if shutil.which("ip") is None:
            raise SetupFailed("`ip` (iproute2) is not installed")
        links.append(bridge)
        _must("link", "add", "name", bridge, "type", "bridge")
        for h, name in ns.items():
            outer, inner = f"dniv{h.lower()}-{tag}", f"dnip{h.lower()}-{tag}"  # <= 15 chars
            namespaces.append(name)
            _must("netns", "add", name)
            links.insert(0, outer)
            _must("link", "add", "name", outer, "type", "veth", "peer", "name", inner)
            _must("link", "set", "dev", inner, "netns", name)
            _must("-n", name, "link", "set", "dev", inner, "name", "eth0")
            _must("-n", name, "addr", "add", f"{HOSTS[h]}/24", "dev", "eth0")
            _must("-n", name, "link", "set", "dev", "lo", "up")
            _must("-n", name, "link", "set", "dev", "eth0", "up")
            _must("link", "set", "dev", outer, "master", bridge)
            _must("link", "set", "dev", outer, "up")
        _must("link", "set", "dev", bridge, "up")
        # Links take a moment to come up: probe until every host reaches the others.
        deadline = time.monotonic() + 15
        for h, name in ns.items():
            others = [a for o, a in HOSTS.items() if o != h]
            while True:
                probe = _ip("netns", "exec", name, sys.executable, "-c", _PROBE,
                            str(PROBE_PORT), *others)
                if probe.returncode == 0:
                    break
                if time.monotonic() > deadline:
                    raise SetupFailed(f"host {h} ({name}) cannot reach {others}; stderr: "
                                      f"{probe.stderr.strip()}")
                time.sleep(0.2)  # retry interval of the probe, not a synchronisation
    except SetupFailed as exc:
        problems = _teardown(namespaces, links)
        reason = f"no network namespaces for the cluster tests: {exc}"
        if problems:
            reason += f" (and teardown failed: {problems})"
        warnings.warn(reason)  # shown in the warnings summary, not only with -rs
        pytest.skip(reason)
    except BaseException:  # a timeout or Ctrl-C half way: still leave nothing behind
        _teardown(namespaces, links)
        raise
    try:
        yield Hosts(ns, dict(HOSTS))
    finally:
        problems = _teardown(namespaces, links)
        listed = _ip("netns", "list").stdout
        left = [n for n in namespaces if n in listed] + [l for l in links if _link_exists(l)]
        if problems or left:
            raise RuntimeError(f"network namespace teardown left {left}: {problems}")


# -- one run across the hosts -----------------------------------------------------

def write_cluster(path: Path, hosts: Hosts, run: dict, port: int, keys: str = "keys") -> Path:
    """coordinator and source on A, layer1 on B, layer2 and output on C."""
    a, b, c = hosts.addr["A"], hosts.addr["B"], hosts.addr["C"]
    lines = [f'keys = "{keys}"', "[run]"] + [f"{k} = {json.dumps(v)}" for k, v in run.items()]
    lines += ["[roles]", f'coordinator = "{a}:{port}"', f'source = "{a}"',
              f'layer1 = "{b}:{port + 2}"', f'layer2 = "{c}:{port + 4}"',
              f'output = "{c}:{port + 6}"']
    path.write_text("\n".join(lines) + "\n")
    return path


def make_keys(out: Path, cluster: Path) -> None:
    done = subprocess.run([sys.executable, "launch.py", "keys", "--out", str(out),
                           "--cluster", str(cluster)], cwd=ROOT, capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr


def epoch_logged(run_dir: Path) -> bool:
    m = run_dir / "metrics.jsonl"
    return m.exists() and '"event": "epoch"' in m.read_text()


class Launchers:
    """One ``launch.py --cluster`` per host, each in its namespace and its own
    process group. On leaving, everything still running in our namespaces is
    killed by pid; if the test had otherwise passed, that fails it."""

    def __init__(self, tmp: Path, hosts: Hosts):
        self.tmp = tmp
        self.hosts = hosts
        self.procs: dict[str, subprocess.Popen] = {}
        self.files: list = []

    def start(self, host: str, cluster: Path, run_dir: Path) -> subprocess.Popen:
        out = open(self.tmp / f"host{host}.out", "w")
        err = open(self.tmp / f"host{host}.err", "w")
        self.files += [out, err]
        # `ip netns exec` execs the command: the pid is launch.py's own
        p = subprocess.Popen(["ip", "netns", "exec", self.hosts.ns[host], sys.executable,
                              "launch.py", "--cluster", str(cluster), "--run-dir", str(run_dir)],
                             cwd=ROOT, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                             start_new_session=True)
        self.procs[host] = p
        return p

    def logs(self) -> str:
        parts = []
        for host in self.procs:
            for kind in ("out", "err"):
                path = self.tmp / f"host{host}.{kind}"
                parts.append(f"--- host {host} ({self.hosts.addr[host]}) std{kind} ---\n"
                             f"{path.read_text() if path.exists() else ''}")
        return "\n".join(parts)

    def wait(self, host: str, timeout: float) -> int:
        try:
            return self.procs[host].wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"host {host}'s launch.py still runs after {timeout} s\n"
                                 f"{self.logs()}") from None

    def wait_for(self, predicate, what: str, timeout: float) -> None:
        """Poll a condition on the run's files, failing if a launcher exits
        or time runs out first."""
        deadline = time.monotonic() + timeout
        while not predicate():
            ended = {h: p.returncode for h, p in self.procs.items() if p.poll() is not None}
            assert not ended, f"launchers exited {ended} before {what}\n{self.logs()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}\n{self.logs()}"
            time.sleep(0.05)  # polling interval of a condition, not a synchronisation

    def alive(self) -> dict[str, set[int]]:
        """Per host, the pids still running: its launcher and anything in its namespace."""
        pids = {h: ns_pids(ns) for h, ns in self.hosts.ns.items()}
        for h, p in self.procs.items():
            if p.poll() is None:
                pids[h].add(p.pid)
        return {h: s for h, s in pids.items() if s}

    def wait_all_gone(self, hosts: str, timeout: float) -> dict[str, set[int]]:
        deadline = time.monotonic() + timeout
        while True:
            left = {h: s for h, s in self.alive().items() if h in hosts}
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)  # polling interval of a condition, not a synchronisation

    def kill(self, host: str, sig: int = signal.SIGKILL) -> None:
        p = self.procs[host]
        if p.poll() is None:
            os.killpg(p.pid, sig)

    def __enter__(self) -> "Launchers":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        left = self.alive()
        for host, p in self.procs.items():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        for pids in left.values():
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        for p in self.procs.values():
            p.wait(10)
        for f in self.files:
            f.close()
        if exc_type is not None:
            print(self.logs())  # pytest shows it with the failure
        elif left:
            raise AssertionError(f"processes left running (killed now): {left}\n{self.logs()}")


# -- the tests ------------------------------------------------------------------------

@pytest.mark.timeout(150)
def test_run_across_three_hosts_converges(hosts, tmp_path):
    port = 47300
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, {"layers": 3, "epochs": 800}, port)
    make_keys(tmp_path / "keys", cluster)
    run_dir = tmp_path / "run"
    with Launchers(tmp_path, hosts) as run:
        t0 = time.monotonic()
        for host in "ABC":
            run.start(host, cluster, run_dir)
        codes = {"A": run.wait("A", 90)}
        wall = time.monotonic() - t0
        codes.update({h: run.wait(h, 15) for h in "BC"})
        assert codes == {"A": 0, "B": 0, "C": 0}, run.logs()
        assert not run.wait_all_gone("ABC", 15), run.logs()
    print(f"run across three namespaces: {wall:.1f} s")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["epochs_done"] == 800
    assert summary["train_accuracy"] == 1.0
    config = json.loads((run_dir / "config.json").read_text())
    a, b, c = hosts.addr["A"], hosts.addr["B"], hosts.addr["C"]
    assert config["supervisor"]["control"] == f"tcp://{a}:{port}"
    procs = config["processes"]
    assert {r: p["host"] for r, p in procs.items()} == {
        "source": a, "layer1": b, "layer2": c, "output": c}
    assert procs["layer1"]["endpoints"] == {"act": f"tcp://{b}:{port + 2}",
                                            "grad": f"tcp://{b}:{port + 3}"}
    assert procs["layer2"]["endpoints"] == {"act": f"tcp://{c}:{port + 4}",
                                            "grad": f"tcp://{c}:{port + 5}"}
    assert procs["output"]["endpoints"] == {"act": f"tcp://{c}:{port + 6}"}
    # the coordinator started the source (on its own host) and no other role
    assert procs["source"]["pid"] is not None
    assert [procs[r]["pid"] for r in ("layer1", "layer2", "output")] == [None, None, None]
    assert {p.name for p in (run_dir / "weights").iterdir()} == {
        "layer1.npz", "layer2.npz", "output.npz"}


@pytest.mark.timeout(120)
def test_host_killed_mid_run_fails_cleanly_naming_role_and_host(hosts, tmp_path):
    cluster = write_cluster(tmp_path / "cluster.toml", hosts,
                            {"layers": 3, "epochs": 100000}, 47320)
    make_keys(tmp_path / "keys", cluster)
    run_dir = tmp_path / "run"
    with Launchers(tmp_path, hosts) as run:
        for host in "ABC":
            run.start(host, cluster, run_dir)
        run.wait_for(lambda: epoch_logged(run_dir), "training to start", 60)
        run.kill("B")  # host B goes down: layer1 dies without a word
        t0 = time.monotonic()
        code = run.wait("A", 15)
        noticed = time.monotonic() - t0
        assert code != 0, run.logs()
        assert not run.wait_all_gone("C", 15), run.logs()  # told to stop, host C's roles do
        gone = time.monotonic() - t0
        assert not run.wait_all_gone("ABC", 5), run.logs()
        assert run.procs["B"].returncode == -signal.SIGKILL
    print(f"coordinator exited {code} after {noticed:.1f} s; host C gone after {gone:.1f} s")

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"]["role"] == "layer1"
    assert summary["error"]["host"] == hosts.addr["B"]
    assert 0 < summary["epochs_done"] < 100000


def wrong_key_for_b(tmp_path: Path, hosts: Hosts, port: int) -> tuple[Path, Path]:
    """The run's cluster file, and host B's: the same, but naming a key
    directory whose layer1 keypair the other hosts have never seen."""
    run = {"layers": 3, "epochs": 20}
    cluster = write_cluster(tmp_path / "cluster.toml", hosts, run, port)
    make_keys(tmp_path / "keys", cluster)
    make_keys(tmp_path / "foreign", cluster)
    shutil.copytree(tmp_path / "keys", tmp_path / "keys_b")
    for name in ("layer1.key", "layer1.key_secret"):
        shutil.copy2(tmp_path / "foreign" / name, tmp_path / "keys_b" / name)
    assert (tmp_path / "keys_b" / "layer1.key").read_bytes() != \
        (tmp_path / "keys" / "layer1.key").read_bytes()
    assert (tmp_path / "keys_b" / "layer1.key_secret").stat().st_mode & 0o777 == 0o600
    return cluster, write_cluster(tmp_path / "cluster_b.toml", hosts, run, port, keys="keys_b")


@pytest.mark.timeout(90)
def test_wrong_key_cannot_join(hosts, tmp_path):
    cluster, cluster_b = wrong_key_for_b(tmp_path, hosts, 47340)
    run_dir = tmp_path / "run"
    with Launchers(tmp_path, hosts) as run:
        run.start("A", cluster, run_dir)
        run.start("B", cluster_b, run_dir)
        run.start("C", cluster, run_dir)
        # Watch for 10 s: the coordinator writes config.json only once every
        # role is ready, so neither it nor an epoch may appear.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            assert not (run_dir / "config.json").exists(), f"the run started\n{run.logs()}"
            assert not epoch_logged(run_dir), f"the run trained\n{run.logs()}"
            time.sleep(0.1)  # polling interval of a condition, not a synchronisation
        # Still waiting for layer1, not crashed.
        assert run.procs["A"].poll() is None, run.logs()
        assert run.procs["C"].poll() is None, run.logs()
        b_code = run.procs["B"].poll()
        run.kill("A", signal.SIGINT)
        a_code = run.wait("A", 15)
        assert a_code == 130, run.logs()
        run.kill("B")
        run.kill("C")
        assert not run.wait_all_gone("ABC", 10), run.logs()
    print(f"host B (wrong key) after 10 s: {'running' if b_code is None else f'exited {b_code}'}")
    assert not (run_dir / "config.json").exists()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["epochs_done"] == 0


@pytest.mark.timeout(60)
def test_refused_role_gives_up_and_says_why(hosts, tmp_path):
    """The role with the wrong key cannot reach the coordinator: it sees the
    refused handshake, exits non-zero and says why, instead of waiting forever."""
    cluster, cluster_b = wrong_key_for_b(tmp_path, hosts, 47360)
    run_dir = tmp_path / "run"
    with Launchers(tmp_path, hosts) as run:
        run.start("A", cluster, run_dir)
        run.start("B", cluster_b, run_dir)
        try:
            code = run.procs["B"].wait(15)
        except subprocess.TimeoutExpired:
            code = None
        run.kill("A", signal.SIGINT)
        run.wait("A", 15)
        run.kill("B")
        assert not run.wait_all_gone("AB", 10), run.logs()
    err = (tmp_path / "hostB.err").read_text()
    assert code not in (None, 0), f"host B still ran 15 s after its key was refused\n{err}"
    assert "refused this role" in err and "key" in err, err
