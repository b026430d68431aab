"""The rendezvous without MPI: five ``launch.py`` processes given only
torchrun-style variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) find
each other through rank 0 and train; where each rank listens; the table of
records that becomes the run's placement."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.net import rendezvous, security
from pipeline.config import Config, defaults_for
from pipeline.net.engines import Engine
from tests.conftest import _alive
from tests.test_cluster import Weights, free_ports
from tests.test_pipeline import assert_bit_identical, reference_weights

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(120)


def test_every_rank_on_one_machine_listens_on_loopback_unless_told():
    assert rendezvous.own_host({}, ["vm"] * 5, 3) == "127.0.0.1"
    assert rendezvous.own_host({"DNI_HOST": "10.0.0.7"}, ["vm"] * 5, 3) == "10.0.0.7"
    assert rendezvous.own_host({}, [], 2, target="127.0.0.1") == "127.0.0.1"


def test_the_gathered_records_become_the_placement_with_each_peers_key():
    engine = Engine("mpi", 0, 5)
    keys = {r: security.memory_keys(r) for r in
            ("coordinator", "source", "layer1", "layer2", "output")}
    records = [{**rendezvous.record(Engine("mpi", i, 5), role, "127.0.0.1", k), "pid": 100 + i}
               for i, (role, k) in enumerate(keys.items())]
    c = rendezvous.placement(engine, records, keys["coordinator"], None)
    assert c.policy(insecure=False) == "curve"
    mine = c.keys_for("coordinator", False)
    assert mine.directory is None and mine.peers == {r: k.public for r, k in keys.items()}
    assert c.ranks == {"coordinator": 0, "source": 1, "layer1": 2, "layer2": 3, "output": 4}
    assert c.pids["layer2"] == 103 and c.roles["output"].host == "127.0.0.1"


@pytest.mark.slow
@pytest.mark.parametrize("unlock", [{}, dict(unlock="forward", grad_delay=2, input_delay=1)],
                         ids=["locked", "unlocked"])
def test_torchrun_style_variables_start_a_run_through_rank_0(tmp_path, unlock):
    """The rank-based engines (srun, a Kubernetes indexed Job, torchrun-style
    variables) share this rendezvous; unlocked, the source's input links
    reach each layer's third inbox and --lockstep ends on the reference's
    weights bit for bit."""
    extra = [a for k, v in unlock.items() for a in ("--" + k.replace("_", "-"), str(v))]
    if unlock:
        extra.append("--lockstep")
    port = free_ports(1)[0]
    procs = []
    try:
        for rank in range(5):
            env = dict(os.environ, RANK=str(rank), WORLD_SIZE="5", MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(port), OPENBLAS_NUM_THREADS="1")
            log = open(tmp_path / f"rank{rank}.log", "w")
            procs.append(subprocess.Popen(
                [sys.executable, "launch.py", "--layers", "3", "--epochs", "60", "--quiet",
                 "--run-dir", str(tmp_path / "run"), *extra],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True))
        codes = [p.wait(100) for p in procs]
        logs = "\n".join((tmp_path / f"rank{r}.log").read_text() for r in range(5))
        assert codes == [0] * 5, logs
        s = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert s["status"] == "completed" and s["epochs_done"] == 60
        config = json.loads((tmp_path / "run" / "config.json").read_text())
        assert config["cluster"] == "env:job"
        assert {r: p["rank"] for r, p in config["processes"].items()} == {
            "source": 1, "layer1": 2, "layer2": 3, "output": 4}
        if unlock:
            cfg = Config(layers=3, epochs=60, lockstep=True, **unlock,
                         **defaults_for("addition", unlock["unlock"]))
            assert_bit_identical(Weights(tmp_path / "run"), reference_weights(cfg))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        assert not any(_alive(p.pid) for p in procs)
