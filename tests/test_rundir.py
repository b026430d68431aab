"""Tests for pipeline.run.rundir: what a run directory holds, written so that a
crash loses nothing already written, opened and announced."""
from __future__ import annotations

import errno
import io
import json
import os
import shutil
import stat

import numpy as np
import pytest

from pipeline.run import rundir
from pipeline.config import Config
from pipeline.run.resume import read_latest
from pipeline.run.rundir import RunDir, open_run

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
    rd.metric({"event": "epoch", "epoch": 1})
    # flushed: readable before the directory is closed
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == \
        '{"event": "epoch", "epoch": 1}\n'
    rd.metric({"event": "epoch", "epoch": 2})
    rd.close()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]


def test_each_process_says_the_numbering_of_its_events_with_the_config(tmp_path):
    """config.json, then the numbering line before the events; a resume
    rewrites config.json and says it again before its own events."""
    numbering = '{"event": "numbering", "epoch_base": 1}\n'
    rd = RunDir(tmp_path / "run")
    rd.write_config({"run_id": "x", "config": {}})
    rd.metric({"event": "epoch", "epoch": 1})
    rd.close()
    rd = RunDir(tmp_path / "run", resume=True)
    rd.write_config({"run_id": "x", "config": {"start_epoch": 1}})
    rd.metric({"event": "epoch", "epoch": 2})
    rd.close()
    assert json.loads((tmp_path / "run" / "config.json").read_text())["config"] == \
        {"start_epoch": 1}
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == (
        numbering + '{"event": "epoch", "epoch": 1}\n' + numbering
        + '{"event": "epoch", "epoch": 2}\n')


def test_a_finished_run_is_not_overwritten_and_a_completed_one_not_resumed(tmp_path):
    RunDir(tmp_path / "run").write_json("summary.json", {"status": "completed"})
    with pytest.raises(ValueError, match="already holds a completed run; replace it with "
                                         "--overwrite"):
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
    RunDir(tmp_path / "run", resume=True).close()  # free again once the first is done


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


@pytest.mark.parametrize("latest, done", [
    ({"epochs_done": 400, "dir": "epoch-000400"}, 400),
    ({"epoch": 399, "dir": "epoch-000399"}, 400),     # as runs wrote it before: from 0
    ({"epoch": 0, "dir": "epoch-000000"}, 1),
    ({"epochs_done": 400, "dir": "epoch-000399"}, None),
    ({"epoch": 399, "dir": "epoch-000400"}, None),
    ({"epochs_done": 0, "dir": "epoch-000000"}, None),  # no epoch done: no checkpoint
    ({"epochs_done": True, "dir": "epoch-000001"}, None),
    ({"epoch": "1", "dir": "epoch-000001"}, None), ({"epoch": 1}, None), ([1], None)])
def test_latest_names_the_epochs_done_in_either_numbering(latest, done):
    from pipeline.run.resume import latest_epochs
    assert latest_epochs(latest) == done


def test_a_checkpoint_named_from_zero_still_resumes(tmp_path):
    """Runs before the checkpoints were counted from 1 named the one after
    epoch 5 epoch-000004: it is found, and the run goes on at epoch 6."""
    rd = RunDir(tmp_path / "run")
    for role in ("layer1", "output"):
        rd.write_checkpoint(4, role, {"clock": 50}, {"w": np.ones(2)})
    rd.close()
    (tmp_path / "run" / "checkpoints" / "latest.json").write_text(
        '{"epoch": 4, "dir": "epoch-000004"}')
    done, states = read_latest(tmp_path / "run", ["layer1", "output"])
    assert done == 5 and states["layer1"][0] == {"clock": 50}


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


# --- whose directory: a run goes only into one that is absent, empty or ours ------------

def tree(path) -> dict:
    """Everything under ``path``: relative name -> (mode, content or link target)."""
    out = {}
    for p in sorted(path.rglob("*")):
        st = os.lstat(p)
        content = (os.readlink(p) if p.is_symlink() else
                   p.read_bytes() if p.is_file() else None)
        out[str(p.relative_to(path))] = (stat.S_IMODE(st.st_mode), content)
    return out


def project(path):
    """A user's folder: hidden .tmp files at several depths, a config.json of its own."""
    (path / "src" / "deep").mkdir(parents=True)
    (path / ".draft.tmp").write_text("notes")
    (path / "src" / ".cache.tmp").write_text("x")
    (path / "src" / "deep" / ".summary.json.tmp").write_text("mine")
    (path / "config.json").write_text('{"mine": true}')
    os.chmod(path, 0o755)
    return path


@pytest.mark.parametrize("how", [{}, {"overwrite": True}, {"resume": True}],
                         ids=["new run", "--overwrite", "--resume"])
def test_a_folder_that_holds_no_run_is_refused_and_left_as_it_was(tmp_path, how):
    """Once every hidden .tmp file anywhere under it was deleted and its
    config.json overwritten, with no warning."""
    folder = project(tmp_path / "project")
    before = tree(folder), stat.S_IMODE(os.stat(folder).st_mode)
    with pytest.raises(ValueError) as refused:
        RunDir(folder, **how)
    says = "is not a run directory" if how.get("resume") else "is not empty and holds no run"
    assert says in str(refused.value) and "\n" not in str(refused.value)
    assert (tree(folder), stat.S_IMODE(os.stat(folder).st_mode)) == before


def killed_run(path):
    """The directory of a run killed after its checkpoint of epoch 1."""
    rd = RunDir(path)
    rd.write_json("config.json", {"run_id": "r", "config": {"layers": 2}})
    rd.metric({"event": "epoch", "epoch": 1})
    for role in ("layer1", "output"):
        rd.write_checkpoint(1, role, {"clock": 20}, {"w": np.ones(2)})
    rd.commit_checkpoint(1)
    rd.close()  # as a SIGKILL leaves it: no summary
    return path


def test_a_killed_runs_directory_takes_no_new_run_but_its_resume(tmp_path):
    """Once a new run there kept the old checkpoints: --resume then went on
    with the new run's settings from the old run's weights."""
    path = killed_run(tmp_path / "run")
    before = tree(path)
    with pytest.raises(ValueError, match=f"{path} already holds a run that did not finish; go "
                                         f"on with it with --resume {path}, replace it with "
                                         "--overwrite"):
        RunDir(path)
    assert tree(path) == before
    RunDir(path, resume=True).close()
    assert tree(path) == before


def full_run(path):
    """A run directory holding every file a run writes, and a temporary of each kind."""
    killed_run(path)
    rd = RunDir(path, resume=True)
    rd.write_weights("layer1", {"w": np.ones(2)})
    rd.write_weights("output", {"w": np.ones(2)})
    rd.write_json("summary.json", {"status": "failed"})
    rd.close()
    (path / "report.png").write_bytes(b"png")
    for tmp in (".summary.json.tmp", "weights/.layer1.npz.tmp",
                "checkpoints/epoch-000002/.output.json.tmp"):
        (path / tmp).parent.mkdir(exist_ok=True)
        (path / tmp).write_bytes(b"half")
    return path


def test_overwrite_removes_exactly_what_a_run_writes_and_says_what(tmp_path):
    path = full_run(tmp_path / "run")
    said = io.StringIO()
    rd = open_run(Config(run_dir=str(path), overwrite=True, quiet=True), False, said)
    assert said.getvalue() == (
        f"--overwrite: removed .summary.json.tmp, checkpoints/ (6 files), config.json, "
        f"metrics.jsonl, report.png, summary.json, weights/ (3 files) from {path}\n")
    assert sorted(tree(path)) == [".lock", ".reserve", "metrics.jsonl"]
    assert (path / "metrics.jsonl").read_bytes() == b""
    rd.close()


FOREIGN = {
    "a file at the top": lambda p: (p / "notes.txt").write_text("mine"),
    "a file in weights/": lambda p: (p / "weights" / "mine.npz").write_bytes(b"x"),
    "a file in a checkpoint": lambda p: (p / "checkpoints" / "epoch-000001" / "notes").touch(),
    "a directory in checkpoints/": lambda p: (p / "checkpoints" / "old").mkdir(),
    "weights/ a link": lambda p: (shutil.rmtree(p / "weights"),
                                  (p / "weights").symlink_to(p.parent))}


@pytest.mark.parametrize("add", FOREIGN.values(), ids=FOREIGN)
def test_overwrite_refuses_a_run_directory_that_holds_anything_else(tmp_path, add):
    path = full_run(tmp_path / "run")
    add(path)
    before = tree(path)
    with pytest.raises(ValueError, match="which no run writes; move it away"):
        RunDir(path, overwrite=True)
    assert tree(path) == before


def test_resume_removes_the_runs_own_temporaries_and_nothing_else(tmp_path):
    """Once every ``.*.tmp`` anywhere under the directory went."""
    path = full_run(tmp_path / "run")
    others = [".notes.tmp", "weights/.mine.tmp", "checkpoints/epoch-000001/.x.tmp",
              "sub/.summary.json.tmp", "checkpoints/.layer1.npz.tmp"]
    for name in others:
        (path / name).parent.mkdir(exist_ok=True)
        (path / name).write_text("not the run's")
    RunDir(path, resume=True).close()
    assert sorted(str(p.relative_to(path)) for p in path.rglob("*.tmp")) == sorted(others)


def test_a_refused_new_run_leaves_nothing_behind(tmp_path, monkeypatch):
    def no_room(fd, offset, size):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with pytest.raises(ValueError, match=r"argument --run-dir: .* has no room for the 20 KiB a "
                                         r"run keeps for its weights and summary"):
        RunDir(tmp_path / "run", reserve=20 * 1024)
    assert not (tmp_path / "run").exists()


# --- modes: the user's alone, whatever made them ------------------------------------------

def test_what_a_run_makes_is_the_users_alone_whatever_made_it(tmp_path):
    """Once the parents and checkpoints/ were made 0755 (mkdir's parents get
    the default mode), an existing run directory kept its own, and a file
    already there kept its mode."""
    old = os.umask(0o022)
    try:
        there = tmp_path / "there"
        there.mkdir(mode=0o755)
        rd = RunDir(there)
        rd.write_checkpoint(1, "layer1", {}, {"w": np.ones(1)})
        rd.close()
        deep = RunDir(tmp_path / "a" / "b" / "run")
        deep.close()
        os.chmod(there / "metrics.jsonl", 0o644)
        os.chmod(there / ".lock", 0o644)
        RunDir(there, resume=True).close()
    finally:
        os.umask(old)
    for d in (there, there / "checkpoints", there / "checkpoints" / "epoch-000001",
              tmp_path / "a", tmp_path / "a" / "b", tmp_path / "a" / "b" / "run"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700, d
    for f in (".lock", "metrics.jsonl", "checkpoints/epoch-000001/layer1.npz",
              "checkpoints/epoch-000001/layer1.json"):
        assert stat.S_IMODE(os.stat(there / f).st_mode) == 0o600, f


# --- path lengths -----------------------------------------------------------------------

@pytest.mark.parametrize("name, says", [
    (lambda t: t / ("x" * 300) / "run", "a name of 300 bytes in the path"),
    (lambda t: t.joinpath(*["y" * 200] * 20), "the path is"),
], ids=["a 300-character name", "a path near PATH_MAX"])
def test_a_path_too_long_is_one_line_before_anything_is_made(tmp_path, name, says):
    """Once an ENAMETOOLONG traceback from mkdir."""
    with pytest.raises(ValueError, match=f"argument --run-dir: {says}") as refused:
        RunDir(name(tmp_path))
    assert "\n" not in str(refused.value) and list(tmp_path.iterdir()) == []


# --- a full disk: one error naming the file, nothing half written, nothing lost ---------

ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class FillsUp:
    """A file that takes ``room`` more bytes, then says the disk is full."""

    def __init__(self, f, room: int):
        self.f, self.room = f, room

    def write(self, data) -> int:
        data = bytes(data)
        n = min(len(data), self.room)
        self.f.write(data[:n])
        self.room -= n
        if n < len(data):
            raise ENOSPC
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def a_run_with_a_checkpoint(path) -> RunDir:
    rd = RunDir(path, reserve=8192)
    rd.write_json("config.json", {"run_id": "r"})
    for role in ("layer1", "output"):
        rd.write_checkpoint(1, role, {"clock": 20}, {"w": np.ones(200)})
    rd.commit_checkpoint(1, ["layer1", "output"], keep=3)
    rd.metric({"event": "epoch", "epoch": 1})
    return rd


WRITES = {
    "config.json": lambda rd: rd.write_json("config.json", {"run_id": "s", "x": "y" * 500}),
    "summary.json": lambda rd: rd.write_json("summary.json", {"status": "failed"}),
    "weights/layer1.npz": lambda rd: rd.write_weights("layer1", {"w": np.ones(500)}),
    "checkpoints/epoch-000002/output.npz": lambda rd: [
        rd.write_checkpoint(2, role, {"clock": 30}, {"w": np.ones(500)})
        for role in ("layer1", "output")],
    "checkpoints/epoch-000002/layer1.json": lambda rd: rd.write_checkpoint(
        2, "layer1", {"clock": 30, "big": "z" * 500}, {"w": np.ones(1)}),
    "checkpoints/latest.json": lambda rd: [
        rd.write_checkpoint(2, role, {"clock": 30}, {"w": np.ones(2)})
        for role in ("layer1", "output")] + [rd.commit_checkpoint(2, ["layer1", "output"], 3)],
}


@pytest.mark.parametrize("write, name", [(w, n) for n, w in WRITES.items()], ids=WRITES)
def test_a_full_disk_names_the_file_and_leaves_nothing_half_written(tmp_path, monkeypatch,
                                                                     write, name):
    """Once a 34-line traceback, a 0-byte .summary.json.tmp and half an epoch-*
    directory: now one error naming the file, no temporary, no checkpoint
    but whole ones, the one in force untouched, the kept space given back."""
    path = tmp_path / "run"
    rd = a_run_with_a_checkpoint(path)
    before = tree(path)
    target = path / name
    room = {"config.json": 300, "summary.json": 0, "checkpoints/latest.json": 5}.get(name, 200)

    def fill(fd, mode):  # the disk has ``room`` bytes for the file ``name``, no more
        f = open(fd, mode)
        tmp = os.readlink(f"/proc/self/fd/{fd}")
        return FillsUp(f, room) if tmp == str(target.with_name(f".{target.name}.tmp")) else f
    monkeypatch.setattr(rundir, "open", fill, raising=False)
    with pytest.raises(rundir.WriteError) as full:
        write(rd)
    assert str(full.value) == f"cannot write {target}: No space left on device"
    assert rd.full is full.value and not (path / ".reserve").exists()
    after = tree(path)
    assert not [n for n in after if n.endswith(".tmp")]
    assert not (path / "checkpoints" / "epoch-000002").exists()
    # What was there before is as it was (less the kept space).
    assert {n: v for n, v in before.items() if n != ".reserve"} == \
        {n: v for n, v in after.items() if n in before}
    assert read_latest(path, ["layer1", "output"])[0] == 1
    # The run stops writing metrics and checkpoints; the weights and the summary still go.
    monkeypatch.undo()
    rd.metric({"event": "epoch", "epoch": 2})
    rd.write_checkpoint(3, "layer1", {}, {"w": np.ones(1)})
    assert not (path / "checkpoints" / "epoch-000003").exists()
    assert (path / "metrics.jsonl").read_text() == '{"event": "epoch", "epoch": 1}\n'
    rd.write_weights("layer1", {"w": np.ones(2)})
    rd.close()


def test_a_full_disk_cuts_the_half_metric_line_back_off(tmp_path, monkeypatch):
    path = tmp_path / "run"
    rd = a_run_with_a_checkpoint(path)
    real = os.write
    room = [10]

    def write(fd, data):  # the disk takes 10 more bytes of metrics.jsonl
        if fd != rd._metrics:
            return real(fd, data)
        if not room[0]:
            raise ENOSPC
        n = real(fd, bytes(data)[:room[0]])
        room[0] -= n
        return n
    monkeypatch.setattr(rundir.os, "write", write)
    with pytest.raises(rundir.WriteError, match=f"cannot write {path / 'metrics.jsonl'}: "
                                                "No space left on device"):
        rd.metric({"event": "epoch", "epoch": 2, "loss": 0.5})
    monkeypatch.undo()
    assert (path / "metrics.jsonl").read_text() == '{"event": "epoch", "epoch": 1}\n'
    assert not (path / ".reserve").exists()
    rd.close()


def test_a_resumed_run_does_not_join_a_killed_runs_half_line(tmp_path):
    path = killed_run(tmp_path / "run")
    with open(path / "metrics.jsonl", "a") as f:
        f.write('{"event": "ep')  # killed mid-write
    rd = RunDir(path, resume=True)
    rd.metric({"event": "epoch", "epoch": 2})
    rd.close()
    assert [json.loads(line)["epoch"] for line in
            (path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_summary_the_disk_has_no_room_for_is_one_line(tmp_path, monkeypatch, capsys):
    from pipeline.run.summary import build_summary, close_run
    rd = RunDir(tmp_path / "run")

    def full(name, obj):
        raise rundir.WriteError(tmp_path / "run" / name, ENOSPC)
    monkeypatch.setattr(rd, "write_json", full)
    summary = build_summary(Config(), status="completed", run_id="r", wall_s=1.0, final=None,
                            layers=[])
    assert close_run(rd, summary, io.StringIO()) == 1
    err = capsys.readouterr().err
    assert err == (f"launch.py: error: cannot write {tmp_path / 'run' / 'summary.json'}: No "
                   "space left on device: the summary is not written\n")
    RunDir(tmp_path / "run", resume=True).close()  # closed: the lock is free


@pytest.mark.parametrize("status, says", [
    ("interrupted", "an interrupted run; go on with it with --resume"),
    ("failed", "a failed run; go on with it with --resume"),
    ("completed", "a completed run; replace it with --overwrite, or choose another directory")])
def test_a_run_directory_taken_says_how_its_run_ended_and_what_may_be_done(tmp_path, status,
                                                                           says):
    killed_run(tmp_path / "run")
    (tmp_path / "run" / "summary.json").write_text(json.dumps({"status": status}))
    with pytest.raises(ValueError, match=f"already holds {says}"):
        RunDir(tmp_path / "run")
