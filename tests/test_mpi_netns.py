"""`mpiexec` across three hosts (the network namespaces of tests/netns.py),
started as on a cluster: mpiexec on host A, Open MPI's own remote launch
(its ssh agent: a script that enters a host's namespace) for B and C, a
hostfile, per-run keys. The run converges; a host killed ends the job failed,
naming a role of that host and its address; a process outside the job cannot
open a layer's socket. Skipped, saying why, without namespaces (root,
iproute2, unshare) or Open MPI and mpi4py."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.netns import (SUBNET, Hosts, epoch_logged, host_name, kill_pids, ns_pids,
                         on_host, write_rsh_agent)
from pipeline.config import Config, defaults_for
from tests.test_cluster import Weights
from tests.test_mpi import ROOT, Job, _mpiexec, assert_all_gone
from tests.test_pipeline import assert_bit_identical, reference_weights

pytestmark = [pytest.mark.slow, pytest.mark.timeout(180)]

# coordinator and source on A (which has the data), layer1 and layer2 on B, output on C
SLOTS = {"A": 2, "B": 2, "C": 1}
ROLES = {"A": ("source",), "B": ("layer1", "layer2"), "C": ("output",)}


def mpi_across(tmp: Path, hosts: Hosts) -> dict:
    """What Job needs to run mpiexec on A over the three hosts."""
    if shutil.which("unshare") is None:
        pytest.skip("no `unshare` (util-linux): each host needs a host name of its own")
    hostfile = tmp / "hostfile"
    hostfile.write_text("".join(f"{hosts.addr[h]} slots={n}\n" for h, n in SLOTS.items()))
    # Each host's ranks listen on its address (DNI_HOST): its host name
    # resolves nowhere, as on machines without DNS for each other.
    agent = write_rsh_agent(tmp / "rsh-agent", hosts,
                            {h: {"DNI_HOST": a} for h, a in hosts.addr.items()})
    subnet = f"{SUBNET}.0/24"
    return {
        "via": on_host(hosts, "A"),
        "env": {"DNI_HOST": hosts.addr["A"]},
        # No --oversubscribe: Open MPI 5 would then put every rank on the
        # first host. The hostfile's slots already allow five ranks.
        # Open MPI's own traffic (its daemons' out-of-band channel, and the
        # allgather of the ranks' records) on the hosts' network, not loopback
        "mpi_args": ["--hostfile", str(hostfile), "--mca", "plm_ssh_agent", str(agent),
                     "--mca", "oob_tcp_if_include", subnet,
                     "--mca", "btl", "self,tcp", "--mca", "btl_tcp_if_include", subnet],
    }


@pytest.fixture
def across(hosts, tmp_path):
    """``across(*args)`` starts ``mpiexec -n 5 python launch.py --layers 3
    ARGS`` over the hosts; on leaving, every job is ended and anything still
    running on a host is killed by pid (failing a test that otherwise passed)."""
    _mpiexec()  # skip before anything starts
    how = mpi_across(tmp_path, hosts)
    jobs: list[Job] = []

    def start(*args: str) -> Job:
        assert not jobs, "one job per test: they share the run directory"
        jobs.append(Job(tmp_path, 5, "--layers", "3", *args, **how))
        return jobs[-1]

    yield start
    for job in jobs:
        job.end()
    # mpiexec may return a moment before its daemons on B and C are gone
    deadline = time.monotonic() + 10
    while True:
        left = {h: ns_pids(ns) for h, ns in hosts.ns.items()}
        if not any(left.values()) or time.monotonic() > deadline:
            break
        time.sleep(0.05)  # polling interval of a condition, not a synchronisation
    kill_pids(left)
    left = {h: s for h, s in left.items() if s}
    assert not left, f"processes left running on the hosts (killed now): {left}"


def rank_pids_by_host(job: Job, hosts: Hosts) -> dict[str, set[int]]:
    """The ranks' pids (one pid namespace for all hosts) by the host they run on."""
    config = job.config()
    by_addr = {a: h for h, a in hosts.addr.items()}
    found = {h: set() for h in hosts.addr}
    found["A"].add(config["supervisor"]["pid"])
    for p in config["processes"].values():
        found[by_addr[p["host"]]].add(p["pid"])
    return found


def test_mpiexec_across_three_hosts_converges_with_per_run_keys(across, hosts):
    job = across("--epochs", "600")
    assert job.wait(150) == 0, job.stderr()
    s = job.summary()
    assert s["status"] == "completed" and s["train_accuracy"] == 1.0, s
    config = job.config()
    assert config["cluster"].startswith("mpi:")
    a = hosts.addr["A"]
    assert config["supervisor"]["control"].startswith(f"tcp://{a}:")
    procs = config["processes"]
    assert {r: p["host"] for r, p in procs.items()} == {
        role: hosts.addr[h] for h, roles in ROLES.items() for role in roles}
    assert [procs[r]["rank"] for r in ("source", "layer1", "layer2", "output")] == [1, 2, 3, 4]
    for p in procs.values():  # each listens on its own host's address, nowhere else
        assert all(ep.startswith(f"tcp://{p['host']}:") for ep in p["endpoints"].values()), p
    assert all(L["decode_errors"] == 0 for L in s["layers"]), s["layers"]
    assert_all_gone(job.rank_pids())


def test_an_unlocked_lockstep_run_across_three_hosts_equals_the_reference(across, hosts):
    """--unlock forward across hosts: the source (host A) reaches layer2 (B)
    and the output (C) on their input inboxes over CURVE, and the run ends
    on the in-process reference's weights bit for bit."""
    job = across("--epochs", "30", "--lockstep", "--unlock", "forward", "--grad-delay", "1",
                 "--input-delay", "1")
    assert job.wait(150) == 0, job.stderr()
    assert job.summary()["status"] == "completed"
    procs = job.config()["processes"]
    assert "input" in procs["layer2"]["endpoints"] and "input" in procs["output"]["endpoints"]
    cfg = Config(layers=3, epochs=30, lockstep=True, unlock="forward", grad_delay=1,
                 input_delay=1, **defaults_for("addition", "forward"))
    assert_bit_identical(Weights(job.run_dir), reference_weights(cfg))
    assert_all_gone(job.rank_pids())


@pytest.mark.parametrize("newest_first", [False, True],
                         ids=["Open MPI's daemon first", "the ranks first"])
def test_a_host_killed_ends_the_job_failed_naming_its_role_and_host(across, hosts,
                                                                    newest_first):
    job = across("--epochs", "100000")
    job.wait_for(lambda: epoch_logged(job.run_dir), "the first epoch", 90)
    ranks = rank_pids_by_host(job, hosts)
    on_b = ns_pids(hosts.ns["B"])  # its ranks, Open MPI's daemon, the agent's shell
    assert ranks["B"] <= on_b, (ranks, on_b)
    t0 = time.monotonic()
    # Host B goes down: nothing there says a word. Its processes die in
    # either order: with the daemon first, mpiexec ends ranks on A (they say
    # so) before B's own connections close.
    kill_pids({"B": on_b}, newest_first)
    code = job.wait(30)
    summary = job.run_dir / "summary.json"
    # Open MPI 5.0's mpiexec, its daemon on B lost, exits at once (with 0)
    # and leaves its ranks on A behind: the coordinator ends the run itself.
    deadline = time.monotonic() + 15
    while not summary.exists():
        assert time.monotonic() < deadline, f"no summary.json\n{job.stderr()}"
        time.sleep(0.05)  # polling interval of a condition, not a synchronisation
    print(f"mpiexec exited {code} and the coordinator wrote the summary "
          f"{time.monotonic() - t0:.1f} s after host B went down")
    s = job.summary()
    assert s["status"] == "failed", s
    err = s["error"]
    assert err["role"] in ROLES["B"] and err["host"] == hosts.addr["B"], err
    assert err["rank"] == {"layer1": 2, "layer2": 3}[err["role"]], err
    assert f"{err['role']} (rank {err['rank']}) on {hosts.addr['B']}" in err["message"], err
    assert 0 < s["epochs_done"] < 100000
    assert_all_gone({str(p): p for pids in ranks.values() for p in pids})


# Run on host C, outside the job: connect to layer1's activation inbox and
# send, first with no CURVE at all, then with a keypair of its own made for
# the occasion (it cannot know the run's keys: they exist only in the ranks'
# memory). Prints what its socket monitors saw, as JSON.
_OUTSIDER = """
import json, sys, zmq
from pipeline.net import security
endpoint = sys.argv[1]
ctx = zmq.Context()
seen = {}
for how in ("plain", "own key"):
    s = ctx.socket(zmq.PUSH)
    s.linger = 0
    if how == "own key":
        mine = security.memory_keys("source")
        s.curve_publickey, s.curve_secretkey = mine.public, mine.secret
        s.curve_serverkey = zmq.curve_keypair()[0]  # its best guess at layer1's key
    refusals = security.Refusals(s)
    s.connect(endpoint)
    s.send(b"x" * 64, zmq.NOBLOCK)  # queued whatever happens: ZeroMQ never tells a sender
    seen[how] = refusals.poll(10000)
    refusals.close()
    s.close()
ctx.term()
print(json.dumps(seen))
"""


def test_a_process_outside_the_job_cannot_connect(across, hosts):
    job = across("--epochs", "1000")
    job.wait_for(lambda: epoch_logged(job.run_dir), "the first epoch", 90)
    act = job.config()["processes"]["layer1"]["endpoints"]["act"]
    outsider = subprocess.run([*on_host(hosts, "C"), sys.executable, "-c", _OUTSIDER, act],
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              stdin=subprocess.DEVNULL)
    assert outsider.returncode == 0, outsider.stderr
    running = job.proc.poll() is None
    seen = json.loads(outsider.stdout)
    print(f"outsider on {host_name(hosts, 'C')} saw: {seen}")
    assert running, "the run ended before the outsider tried: lengthen it"
    # Each was refused in the handshake, before a byte of its message got
    # through: layer1 speaks CURVE only (a plain peer is a mechanism
    # mismatch, which the peer learns either as such or as a hang-up,
    # depending on who gets there first), and cannot open a hello sealed
    # for a key it does not hold.
    refused = ("during the handshake", "mechanism mismatch", "ZAP status")
    for how in ("plain", "own key"):
        assert seen[how] and all(any(r in reason for r in refused) for reason in seen[how]), seen
    assert job.wait(150) == 0, job.stderr()
    s = job.summary()
    assert s["status"] == "completed" and s["epochs_done"] == 1000, s
    assert all(L["decode_errors"] == 0 for L in s["layers"]), s["layers"]
    assert_all_gone(job.rank_pids())
