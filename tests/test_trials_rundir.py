"""Issue 25's run-directory trials, each run through ``launch.py`` as it was
first tried: a directory that holds no run or another run, a full disk (a
real small file system: a tmpfs, which needs root), checkpoints without end,
file modes, a name too long. A refused command ends with exit 2 and one line;
a run that filled the disk with exit 1, one error naming the file, every
whole file kept and the weights as they were when it stopped."""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.layers.state import check_weights
from pipeline.run.resume import resume_config
from pipeline.config import Config
from tests.conftest import ROOT, Launch, error_line, run_launch
from tests.test_checkpoint import checkpointed_run
from tests.test_pipeline import assert_bit_identical, reference_weights
from tests.test_rundir import project, tree
from tests.test_trials_local import run_patched

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]
ROLES = ("layer1", "layer2", "output")


@pytest.fixture
def small_disk(tmp_path):
    """``small_disk("2m")``: a directory on a file system of that size, a
    tmpfs mounted here and unmounted after the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small file system (a tmpfs) needs root")
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        d = tmp_path / f"disk{len(mounts)}"
        d.mkdir()
        made = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0700", "tmpfs",
                               str(d)], capture_output=True, text=True)
        if made.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {made.stderr.strip()}")
        mounts.append(d)
        return d
    yield mount
    for d in mounts:
        subprocess.run(["umount", str(d)], check=True, timeout=30)


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def assert_nothing_half_written(run: Path) -> None:
    """No temporary, no space still kept, metrics.jsonl whole lines, every
    checkpoint there whole and the one in force the newest."""
    leftovers = [str(p.relative_to(run)) for p in run.rglob("*")
                 if p.name.endswith(".tmp") or p.name == ".reserve"]
    assert leftovers == []
    metrics = (run / "metrics.jsonl").read_bytes()
    assert metrics.endswith(b"\n")
    for line in metrics.splitlines():
        json.loads(line)
    if (run / "checkpoints").exists():
        epochs = sorted(d.name for d in (run / "checkpoints").iterdir() if d.is_dir())
        for d in epochs:
            assert sorted(p.name for p in (run / "checkpoints" / d).iterdir()) == \
                sorted(f"{r}.{x}" for r in ROLES for x in ("json", "npz")), d
        latest = json.loads((run / "checkpoints" / "latest.json").read_text())
        assert latest["dir"] == epochs[-1]


def assert_weights_at_stop(run: Path, cfg: Config) -> None:
    """weights/ holds every layer's, of the layer's shapes, trained (not the
    initial ones), and the summary says they are the weights at the stop."""
    from pipeline.layers.build import make_hidden, make_output
    assert summary(run)["weights"] == "at stop"
    for k, role in enumerate(ROLES, 1):
        with np.load(run / "weights" / f"{role}.npz") as z:
            weights = {name: z[name] for name in z.files}
        check_weights(cfg, role, weights, "at stop")
        initial = (make_output(cfg) if role == "output" else make_hidden(cfg, k)).weights()
        assert not np.array_equal(weights["w"], initial["w"]), role


# --- a full disk ---------------------------------------------------------------------------

def test_a_full_disk_with_a_checkpoint_every_epoch(small_disk):
    """Once: a 34-line traceback from _atomic, another from close_run, no
    summary, a 0-byte .summary.json.tmp and half an epoch-* directory. Now
    the run stops at once, names the file, keeps every whole checkpoint and
    writes its weights as they were and the summary; once there is room,
    --resume goes on from the last checkpoint to the weights, bit for bit,
    of a run never stopped."""
    disk = small_disk("2m")
    run = disk / "run"
    args = ["--lockstep", "--epochs", "12", "--checkpoint-every", "1", "--keep-checkpoints", "0"]
    done = run_launch("--run-dir", str(run), "--quiet", *args)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "Traceback" not in done.stderr and done.stderr == ""
    error = summary(run)["error"]
    assert error["role"] == "supervisor" and error["message"].startswith(f"cannot write {run}/")
    assert error["message"].endswith(": No space left on device")
    assert f"failed role supervisor: {error['message']}" in done.stdout
    assert summary(run)["status"] == "failed"
    assert_nothing_half_written(run)
    cfg = Config(lockstep=True, epochs=12, checkpoint_every=1, keep_checkpoints=0)
    assert_weights_at_stop(run, cfg)
    resume_config(run, quiet=True)  # the checkpoint in force is whole

    subprocess.run(["mount", "-o", "remount,size=32m", str(disk)], check=True, timeout=30)
    resumed = Launch(run, ["--resume", str(run), "--quiet"])
    try:
        assert resumed.finish(timeout=90) == 0, resumed.err
    finally:
        resumed.kill()
    assert summary(run)["status"] == "completed" and summary(run)["weights"] == "final"
    assert_bit_identical(resumed, reference_weights(cfg))


def test_the_same_disk_holds_a_run_with_a_checkpoint_every_epoch_kept_to_three(small_disk):
    """The trial as first tried, without --keep-checkpoints: the three
    newest checkpoints fit where every one of them did not."""
    run = small_disk("2m") / "run"
    done = run_launch("--run-dir", str(run), "--quiet", "--epochs", "30",
                      "--checkpoint-every", "1")
    assert done.returncode == 0, done.stdout + done.stderr
    assert summary(run)["status"] == "completed" and summary(run)["weights"] == "final"
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == \
        ["epoch-000027", "epoch-000028", "epoch-000029", "latest.json"]  # epochs done


@pytest.mark.parametrize("how", [[], ["--in-process"]], ids=["pipeline", "in-process"])
def test_a_full_disk_without_checkpoints_keeps_the_weights(small_disk, how):
    """Once the final weights were lost: metrics.jsonl filled 100 KB, and
    nothing but a traceback came of the run."""
    run = small_disk("100k") / "run"
    done = run_launch("--run-dir", str(run), "--quiet", "--hidden", "8", "--epochs", "100000",
                      *how)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == ""
    error = summary(run)["error"]
    assert error["message"] == f"cannot write {run / 'metrics.jsonl'}: No space left on device"
    assert_nothing_half_written(run)
    assert_weights_at_stop(run, Config(hidden=(8,), epochs=100000))


FILLS_AFTER_30_EVENTS = """
import errno, os
from pipeline.run import rundir
_metric = rundir.RunDir.metric
def metric(self, event):  # the disk fills at the 31st event
    self.events = getattr(self, "events", 0) + 1
    if self.events > 30 and self.full is None:
        raise self._failed(self._metrics_path, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    _metric(self, event)
rundir.RunDir.metric = metric
"""


@pytest.mark.parametrize("how", [[], ["--in-process"]], ids=["pipeline", "in-process"])
def test_a_full_disk_faked_ends_with_the_weights_at_the_stop(tmp_path, how):
    """The same end without root: the disk fills (faked) mid-run."""
    run = tmp_path / "run"
    done = run_patched(FILLS_AFTER_30_EVENTS, "--run-dir", str(run), "--quiet", "--epochs",
                       "100000", *how)
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stderr == ""
    assert summary(run)["error"]["message"] == \
        f"cannot write {run / 'metrics.jsonl'}: No space left on device"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 30
    assert_nothing_half_written(run)
    assert_weights_at_stop(run, Config(epochs=100000))


def test_a_disk_without_room_for_the_last_writes_refuses_the_run(small_disk):
    """The addition task's weights at a stop would not fit in 100 KB: the run could
    never keep them, so it does not start."""
    disk = small_disk("100k")
    line = error_line(run_launch("--run-dir", str(disk / "run"), "--epochs", "10"))
    assert re.fullmatch(rf"launch.py: error: argument --run-dir: {re.escape(str(disk))}/run has "
                        r"no room for the (\d+) KiB a run keeps for its weights and summary "
                        r"should the disk fill \(100 KiB free\): No space left on device", line)
    # At least the addition task's weights: layer1 16x128 + 128 and its SG module 136x128 + 128,
    # layer2 128x64 + 64 and 72x64 + 64, the output 64x8 + 8: 33,160 float64.
    assert int(re.search(r"the (\d+) KiB", line)[1]) * 1024 >= 33160 * 8
    assert list(disk.iterdir()) == []


# --- whose directory ----------------------------------------------------------------------

def test_a_killed_runs_directory_takes_no_new_run(tmp_path):
    """Once the new run (another --lr, another --seed) kept the old
    checkpoints, and --resume went on from the old run's weights with the new
    run's settings, into one metrics.jsonl."""
    run = checkpointed_run(tmp_path / "run")
    (run / "summary.json").unlink()  # killed: no summary
    before = tree(run)
    line = error_line(run_launch("--run-dir", str(run), "--lr", "0.1", "--seed", "2"))
    assert line == (f"launch.py: error: argument --run-dir: {run} already holds a run that did "
                    f"not finish; go on with it with --resume {run}, replace it with "
                    "--overwrite, or choose another directory")
    assert tree(run) == before


@pytest.mark.parametrize("how", [[], ["--overwrite"]], ids=["new run", "--overwrite"])
def test_a_folder_of_the_user_as_run_dir_is_refused_untouched(tmp_path, how):
    """Once every hidden .tmp file anywhere under it was deleted, and its
    config.json overwritten."""
    folder = project(tmp_path / "project")
    before = tree(folder)
    line = error_line(run_launch("--in-process", "--epochs", "1", "--run-dir", str(folder),
                                 *how))
    assert line.startswith(f"launch.py: error: argument --run-dir: {folder} is not empty and "
                           "holds no run")
    assert tree(folder) == before


def test_overwrite_replaces_a_finished_run_and_says_what_it_removed(tmp_path):
    run = tmp_path / "run"
    args = ["--in-process", "--epochs", "2", "--quiet", "--run-dir", str(run)]
    assert run_launch(*args).returncode == 0
    first = summary(run)["run_id"]
    line = error_line(run_launch(*args, "--seed", "3"))
    assert line.endswith("already holds a completed run; replace it with --overwrite, or "
                         "choose another directory")
    assert summary(run)["run_id"] == first
    again = run_launch(*args, "--seed", "3", "--overwrite")
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines()[0] == (
        f"--overwrite: removed config.json, metrics.jsonl, summary.json, weights/ (3 files) "
        f"from {run}")
    assert summary(run)["run_id"] != first
    assert json.loads((run / "config.json").read_text())["config"]["seed"] == 3


# --- checkpoints without end ------------------------------------------------------------------

@pytest.mark.parametrize("keep, left", [([], [3, 4, 5]), (["--keep-checkpoints", "1"], [5]),
                                        (["--keep-checkpoints", "0"], [1, 2, 3, 4, 5])],
                         ids=["default 3", "1", "0 keeps all"])
def test_only_the_newest_checkpoints_are_kept(tmp_path, keep, left):
    """Once --epochs 1500 --checkpoint-every 1 left 1,499 epoch directories
    (one after every epoch but the last; each named by the epochs done)."""
    run = tmp_path / "run"
    done = run_launch("--epochs", "6", "--checkpoint-every", "1", "--quiet", "--run-dir",
                      str(run), *keep)
    assert done.returncode == 0, done.stderr
    assert sorted(d.name for d in (run / "checkpoints").iterdir()) == \
        [f"epoch-{e:06d}" for e in left] + ["latest.json"]


# --- modes ----------------------------------------------------------------------------------

def test_everything_a_run_a_resume_a_report_and_a_sweep_write_is_the_users_alone(tmp_path):
    """Once report.png was 0644, checkpoints/ and the parents of a run or
    sweep directory 0755, and a run directory that existed kept its mode."""
    old = os.umask(0o022)
    try:
        there = tmp_path / "there"
        there.mkdir(mode=0o755)
        done = run_launch("--epochs", "3", "--checkpoint-every", "1", "--quiet", "--run-dir",
                          str(there))
        assert done.returncode == 0, done.stderr
        made = tmp_path / "new" / "parents" / "run"
        assert run_launch("--in-process", "--epochs", "1", "--quiet", "--run-dir",
                          str(made)).returncode == 0
        resumed = checkpointed_run(tmp_path / "resumed")
        done = run_launch("--resume", str(resumed), "--quiet")
        assert done.returncode == 0, done.stderr
        report = run_launch("report", str(there))
        assert report.returncode == 0, report.stderr
        sweep = subprocess.run([sys.executable, "launch.py", "sweep", "--out",
                                str(tmp_path / "sweeps" / "s1"), "--modes", "cdni",
                                "--grad-delay", "0", "--seeds", "1", "--epochs", "2",
                                "--in-process"], cwd=ROOT, capture_output=True, text=True,
                               timeout=100)
        assert sweep.returncode == 0, sweep.stderr
    finally:
        os.umask(old)
    assert (there / "report.png").exists() and (there / "checkpoints").exists()
    assert (tmp_path / "sweeps" / "s1" / "accuracy_vs_staleness.png").exists()
    tops = (there, tmp_path / "new", resumed, tmp_path / "sweeps")
    found = {p: stat.S_IMODE(os.lstat(p).st_mode) for top in tops for p in [top, *top.rglob("*")]}
    wrong = {str(p.relative_to(tmp_path)): oct(mode) for p, mode in found.items()
             if mode != (0o700 if p.is_dir() else 0o600)}
    assert wrong == {}
    assert len(found) > 40  # runs, checkpoints, weights, report, the sweep's files and runs


# --- path lengths ---------------------------------------------------------------------------

LONG_NAMES = {
    "--run-dir": (lambda t: ["--in-process", "--epochs", "1", "--run-dir", str(t / ("x" * 300))],
                  "launch.py: error: argument --run-dir: a name of 300 bytes in the path"),
    "--resume": (lambda t: ["--resume", str(t / ("x" * 300))],
                 "launch.py: error: argument --resume: a name of 300 bytes in the path"),
    "sweep --out": (lambda t: ["sweep", "--in-process", "--epochs", "1", "--seeds", "1",
                               "--modes", "cdni", "--grad-delay", "0", "--out",
                               str(t / ("x" * 300))],
                    "launch.py sweep: error: argument --out: a name of 300 bytes in the path"),
    "keys --out": (lambda t: ["keys", "--out", str(t / ("x" * 300))],
                   "launch.py keys: error: argument --out: a name of 300 bytes in the path"),
    "report": (lambda t: ["report", str(t / ("x" * 300))],
               "launch.py report: error: argument RUN_DIR: a name of 300 bytes in the path"),
}


@pytest.mark.parametrize("argv, says", LONG_NAMES.values(), ids=LONG_NAMES)
def test_a_name_of_300_characters_is_one_line(tmp_path, argv, says):
    """Once an ENAMETOOLONG traceback."""
    line = error_line(run_launch(*argv(tmp_path)))
    assert line.startswith(says) and "Traceback" not in line
    assert list(tmp_path.iterdir()) == []


def test_keys_make_their_parents_private(tmp_path):
    """The parents `keys --out` makes were 0755, as a run directory's were."""
    old = os.umask(0o022)
    try:
        assert run_launch("keys", "--out", str(tmp_path / "a" / "b" / "keys")).returncode == 0
    finally:
        os.umask(old)
    for d in ("a", "a/b", "a/b/keys"):
        assert stat.S_IMODE(os.stat(tmp_path / d).st_mode) == 0o700, d
