"""Tests for pipeline.rundir: what a run directory holds, written so that a
crash loses nothing already written, opened and announced, and read back."""
from __future__ import annotations

import io
import json
import os
import stat

import numpy as np
import pytest

from pipeline import rundir
from pipeline.config import Config
from pipeline.checkpoint import read_latest
from pipeline.rundir import RunDir, open_run
from tests.test_report import SUMMARY, make_run

pytestmark = pytest.mark.timeout(30)


def test_json_and_npz_are_written_whole_and_no_temporary_file_stays(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_json("summary.json", {"status": "completed", "n": np.int64(3)})
    rd.write_weights("layer1", {"w": np.arange(6.0).reshape(2, 3)})
    assert json.loads((tmp_path / "run" / "summary.json").read_text()) == \
        {"status": "completed", "n": 3}
    with np.load(tmp_path / "run" / "weights" / "layer1.npz") as z:
        np.testing.assert_array_equal(z["w"], np.arange(6.0).reshape(2, 3))
    leftovers = [p for p in (tmp_path / "run").rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    rd.close()


def test_metrics_are_appended_a_line_each_and_flushed(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.metric({"event": "epoch", "epoch": 0})
    # flushed: readable before the directory is closed
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == \
        '{"event": "epoch", "epoch": 0}\n'
    rd.metric({"event": "epoch", "epoch": 1})
    rd.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [0, 1]


def test_a_finished_run_is_not_overwritten_and_a_completed_one_not_resumed(tmp_path):
    RunDir(tmp_path / "run").write_json("summary.json", {"status": "completed"})
    with pytest.raises(ValueError, match="already holds a finished run"):
        RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="completed"):
        RunDir(tmp_path / "run", resume=True)


def test_a_second_run_in_the_same_directory_is_refused_while_the_first_holds_it(tmp_path):
    first = RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="another run is using"):
        RunDir(tmp_path / "run")
    with pytest.raises(ValueError, match="another run is using"):
        RunDir(tmp_path / "run", resume=True)
    first.close()
    RunDir(tmp_path / "run").close()  # free again once the first is done


def test_run_files_are_the_users_alone_and_stale_temporaries_go(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_json("config.json", {"run_id": "x"})
    rd.write_checkpoint(0, "layer1", {}, {"w": np.ones(1)})
    rd.close()
    for name in ("config.json", "metrics.jsonl", "checkpoints/epoch-000000/layer1.npz"):
        assert stat.S_IMODE(os.stat(tmp_path / "run" / name).st_mode) == 0o600, name
    assert stat.S_IMODE(os.stat(tmp_path / "run").st_mode) == 0o700
    # an interrupted write leaves a temporary; the next opening removes it
    (tmp_path / "run" / ".summary.json.tmp").write_text("{half")
    (tmp_path / "run" / "checkpoints" / "epoch-000000" / ".layer1.npz.tmp").write_bytes(b"x")
    RunDir(tmp_path / "run", resume=True).close()
    assert not list((tmp_path / "run").rglob("*.tmp"))
    assert (tmp_path / "run" / "checkpoints" / "epoch-000000" / "layer1.npz").exists()


@pytest.mark.parametrize("where, says", [
    (lambda t: t / "afile", "exists and is not a directory"),
    (lambda t: t / "afile" / "run", "cannot make"),
])
def test_a_run_directory_that_cannot_be_made_is_one_clear_error(tmp_path, where, says):
    (tmp_path / "afile").write_text("not a directory")
    with pytest.raises(ValueError, match=f"argument --run-dir: .*{says}"):
        RunDir(where(tmp_path))


def test_open_run_announces_the_directory_unless_quiet(tmp_path):
    out = io.StringIO()
    rd = open_run(Config(run_dir=str(tmp_path / "a")), False, out)
    assert out.getvalue() == f"run directory: {tmp_path / 'a'}\n" and rd.path.is_dir()
    rd.close()
    quiet = io.StringIO()
    open_run(Config(run_dir=str(tmp_path / "b"), quiet=True), False, quiet).close()
    assert quiet.getvalue() == ""


def test_a_checkpoint_is_in_force_only_once_committed(tmp_path):
    rd = RunDir(tmp_path / "run")
    rd.write_json("config.json", {"config": {"layers": 2}})
    state = {"clock": 10}
    for role in ("layer1", "output"):
        rd.write_checkpoint(4, role, state, {"w": np.ones(2)})
    with pytest.raises(ValueError, match="latest.json"):
        read_latest(tmp_path / "run", ["layer1", "output"])
    rd.commit_checkpoint(4)
    epoch, states = read_latest(tmp_path / "run", ["layer1", "output"])
    assert (epoch, sorted(states)) == (4, ["layer1", "output"])
    assert states["layer1"][0] == state
    np.testing.assert_array_equal(states["output"][1]["w"], np.ones(2))
    rd.close()


# --- reading a finished run: load_run --------------------------------------------------------------------------------

def test_load_run_reads_every_file_and_skips_the_corrupt_line(tmp_path):
    run = rundir.load_run(make_run(tmp_path / "run"))
    assert run["summary"] == SUMMARY
    assert run["config"]["config"]["layers"] == 3
    assert len(run["events"]) == 4 * 3 + 2
    assert run["bad_lines"] == 1
    assert [e["event"] for e in run["events"]].count("layer") == 8


def test_load_run_without_config_json_still_loads(tmp_path):
    path = make_run(tmp_path / "run")
    (path / "config.json").unlink()
    assert rundir.load_run(path)["config"] == {}


@pytest.mark.parametrize("damage, named", [
    (lambda p: p / "nowhere", "nowhere"),
    (lambda p: (p / "summary.json").unlink() or p, "summary.json"),
    (lambda p: (p / "metrics.jsonl").unlink() or p, "metrics.jsonl"),
    (lambda p: (p / "summary.json").write_text('{"status": "compl') and p, "summary.json"),
    (lambda p: (p / "summary.json").write_text("[1, 2]") and p, "summary.json"),
    (lambda p: (p / "config.json").write_text("{") and p, "config.json"),
])
def test_load_run_rejects_what_is_not_a_finished_run_naming_the_file(tmp_path, damage, named):
    target = damage(make_run(tmp_path / "run"))
    with pytest.raises(ValueError, match=named):
        rundir.load_run(target)


def test_load_run_rejects_a_file_given_as_the_directory(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="not a directory"):
        rundir.load_run(f)


def test_the_directory_is_synced_after_each_rename(tmp_path, monkeypatch):
    """A rename is durable only once its directory is: the file's fsync, then
    the rename, then the directory's fsync, for every file written whole."""
    steps = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(rundir.os, "fsync",
                        lambda fd: steps.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
                        or real_fsync(fd))
    monkeypatch.setattr(rundir.os, "replace",
                        lambda a, b: steps.append(("replace", str(b))) or real_replace(a, b))
    rd = RunDir(tmp_path / "run")
    rd.write_checkpoint(2, "layer1", {"clock": 1}, {"w": np.ones(2)})
    rd.commit_checkpoint(2)
    rd.close()
    top = (tmp_path / "run" / "checkpoints").resolve()
    ckpt = top / "epoch-000002"
    assert steps == [
        ("fsync", str(ckpt / ".layer1.npz.tmp")), ("replace", str(ckpt / "layer1.npz")),
        ("fsync", str(ckpt)),
        ("fsync", str(ckpt / ".layer1.json.tmp")), ("replace", str(ckpt / "layer1.json")),
        ("fsync", str(ckpt)),
        ("fsync", str(top / ".latest.json.tmp")), ("replace", str(top / "latest.json")),
        ("fsync", str(top))]
