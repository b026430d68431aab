"""Cluster runs across real hosts: three network namespaces (tests/netns.py),
each running ``launch.py --cluster`` for the roles the file places on it.
Skipped, saying why, where namespaces cannot be made."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.netns import (Hosts, Launchers, epoch_logged, make_keys,
                         write_cluster)

pytestmark = pytest.mark.slow  # every test here starts processes

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
