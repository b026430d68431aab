"""Hosts for the tests: three Linux network namespaces on a bridge, each with
its own address (the ``hosts`` fixture), and the launchers that run
``launch.py`` inside them and clean up after.

Needs root and iproute2 (``ip``); without them the fixture skips and says
why. Traffic stays on our own bridge and our own 10.231.77.0/24 addresses,
which exist only inside the namespaces the fixture makes and deletes.
"""
from __future__ import annotations

import json
import os
import secrets
import shlex
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
# Each namespace hands outgoing connections only ports from this range, so a
# cluster file's ports below it (a file must name its ports) are never taken
# by one of the run's own connects before their role binds them; and nothing
# but the test's processes lives in these namespaces to take them otherwise.
EPHEMERAL = (50000, 60999)

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


def _set_ephemeral_range(ns: str) -> None:
    """The namespace's own ip_local_port_range (a per-namespace setting)."""
    done = _ip("netns", "exec", ns, sys.executable, "-c",
               "import sys; f = '/proc/sys/net/ipv4/ip_local_port_range'; "
               "open(f, 'w').write(sys.argv[1]); "
               "sys.exit(open(f).read().split() != sys.argv[1].split())", "%d %d" % EPHEMERAL)
    if done.returncode != 0:
        raise SetupFailed(f"cannot set the port range in {ns}: {done.stderr.strip()}")


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


def kill_pids(by_host: dict[str, set[int]], newest_first: bool = False) -> None:
    """SIGKILL each process named, by its pid, oldest pid first (one gone
    meanwhile is fine), or newest first. The order is kept the same from
    run to run: which of a host's processes goes first decides which death
    Open MPI and the coordinator see first."""
    for pids in by_host.values():
        for pid in sorted(pids, reverse=newest_first):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


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
            _set_ephemeral_range(name)
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


# -- a host as a remote launcher sees it ------------------------------------------

def host_name(hosts: Hosts, host: str) -> str:
    """The host name a process on ``host`` sees (``on_host`` gives it its own)."""
    return hosts.ns[host]


def on_host(hosts: Hosts, host: str) -> list[str]:
    """A command prefix that runs a command on ``host``: in its network
    namespace and, unlike a bare ``ip netns exec``, under a host name of its
    own (a UTS namespace), as on a machine of its own. Launchers that key
    their state by host name (Open MPI's daemons name their session
    directories and their nodes by it) need that. Each step execs the next:
    the pid is the command's own."""
    return ["ip", "netns", "exec", hosts.ns[host], "unshare", "--uts", "sh", "-c",
            'hostname "$0" && exec "$@"', host_name(hosts, host)]


def write_rsh_agent(path: Path, hosts: Hosts, env: dict[str, dict[str, str]]) -> Path:
    """An executable that does what ssh does for a remote launcher: called
    as ``AGENT [OPTION...] HOST COMMAND...`` (HOST an address of ``hosts``),
    it runs the shell command COMMAND on that host, with ``env[host]`` set.
    Open MPI's ``plm_ssh_agent`` (``plm_rsh_agent`` before 5.0) calls it so."""
    cases = []
    for h, addr in hosts.addr.items():
        prefix = " ".join(shlex.quote(a) for a in on_host(hosts, h))
        assigns = " ".join(f"{k}={shlex.quote(v)}" for k, v in env.get(h, {}).items())
        # ssh hands the remote shell its arguments joined by spaces: so does
        # this. No exec: like an ssh client, the agent stays on the calling
        # host while the command runs, and a host killed does not kill it.
        cases.append(f'  {addr}) env {assigns} {prefix} sh -c "$*" ;;')
    path.write_text("#!/bin/sh\n"
                    "# options of ssh's, if the launcher passes any, come before the host\n"
                    'while [ "${1#-}" != "$1" ]; do shift; done\n'
                    'host=$1; shift\n'
                    'case $host in\n' + "\n".join(cases) + "\n"
                    '  *) echo "rsh agent: unknown host $host" >&2; exit 255 ;;\n'
                    "esac\n")
    path.chmod(0o755)
    return path


# -- one run across the hosts -----------------------------------------------------

def write_cluster(path: Path, hosts: Hosts, run: dict, port: int, keys: str = "keys") -> Path:
    """coordinator and source on A, layer1 on B, layer2 and output on C;
    ports ``port`` to ``port + 7``, below the namespaces' EPHEMERAL range."""
    assert 1024 <= port and port + 7 < EPHEMERAL[0], f"port {port}: choose below {EPHEMERAL[0]}"
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
        kill_pids(left)
        for p in self.procs.values():
            p.wait(10)
        for f in self.files:
            f.close()
        if exc_type is not None:
            print(self.logs())  # pytest shows it with the failure
        elif left:
            raise AssertionError(f"processes left running (killed now): {left}\n{self.logs()}")
