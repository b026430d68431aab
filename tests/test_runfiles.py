"""Tests for pipeline.run.runfiles: which checkpoints retention keeps (an exact
table), the space kept for a run's last writes against the files a run of
each kind really writes, and files written private."""
from __future__ import annotations

import json
import os
import stat

import numpy as np
import pytest

from pipeline import files
from pipeline.run import runfiles
from pipeline.wire import protocol
from pipeline.config import Config
from pipeline.run.rundir import RunDir

pytestmark = pytest.mark.timeout(60)
ROLES = ["layer1", "output"]


def epochs_left(path) -> list[int]:
    return sorted(int(d.name.removeprefix("epoch-")) for d in (path / "checkpoints").iterdir()
                  if d.name.startswith("epoch-"))


# keep, the checkpoints committed (in order), incomplete or later ones on disk
# before the last commit -> the epochs that remain.
RETENTION = [
    (3, [1, 3, 5, 7, 9], [], [5, 7, 9]),
    (1, [1, 3, 5, 7, 9], [], [9]),
    (2, [1, 3], [], [1, 3]),
    (0, [1, 3, 5, 7, 9], [], [1, 3, 5, 7, 9]),
    (10, [1, 3, 5, 7, 9], [], [1, 3, 5, 7, 9]),
    # an incomplete checkpoint (a role's .json missing) counts for none of the N
    (2, [1, 3, 5, 9], [7], [5, 9]),
    # a later one a killed run left, to be written again after the resume, stays
    (2, [1, 3, 5], [11], [3, 5, 11]),
]


@pytest.mark.parametrize("keep, commits, extra, left", RETENTION)
def test_retention_keeps_the_newest_complete_checkpoints(tmp_path, keep, commits, extra, left):
    rd = RunDir(tmp_path / "run")
    for epoch in commits:
        if epoch == commits[-1]:
            for e in extra:  # written by hand: the .json of layer1 is missing
                rd.write_npz(f"checkpoints/{runfiles.checkpoint_dir(e)}/layer1.npz",
                             {"w": np.ones(1)})
                for role in ROLES[1:]:
                    rd.write_checkpoint(e, role, {}, {"w": np.ones(1)})
        for role in ROLES:
            rd.write_checkpoint(epoch, role, {"clock": epoch}, {"w": np.ones(1)})
        rd.commit_checkpoint(epoch, ROLES, keep)
    rd.close()
    assert epochs_left(tmp_path / "run") == left
    latest = json.loads((tmp_path / "run" / "checkpoints" / "latest.json").read_text())
    assert latest == {"epochs_done": commits[-1], "dir": runfiles.checkpoint_dir(commits[-1])}


def test_retention_leaves_what_the_run_did_not_write(tmp_path):
    rd = RunDir(tmp_path / "run")
    for epoch in (1, 2):
        for role in ROLES:
            rd.write_checkpoint(epoch, role, {}, {"w": np.ones(1)})
        if epoch == 1:
            (tmp_path / "run" / "checkpoints" / "epoch-000001" / "notes.txt").write_text("mine")
        rd.commit_checkpoint(epoch, ROLES, keep=1)
    rd.close()
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints" / "epoch-000001").iterdir()) \
        == ["notes.txt"]


def test_no_checkpoint_goes_before_the_new_one_is_in_force(tmp_path, monkeypatch):
    from pipeline.run import rundir
    rd = RunDir(tmp_path / "run")
    for epoch in (1, 2, 3):
        for role in ROLES:
            rd.write_checkpoint(epoch, role, {}, {"w": np.ones(1)})
        if epoch == 3:
            real = rundir.RunDir._atomic

            def no_room(self, name, write):
                if name.endswith("latest.json"):
                    raise rundir.WriteError(self.path / name, OSError(28, "No space left"))
                return real(self, name, write)
            monkeypatch.setattr(rundir.RunDir, "_atomic", no_room)
            with pytest.raises(rundir.WriteError):
                rd.commit_checkpoint(epoch, ROLES, keep=1)
        else:
            rd.commit_checkpoint(epoch, ROLES, keep=2)
    rd.close()
    # epoch 3 was never in force: it goes; 1 and 2 stay, 2 in force
    assert epochs_left(tmp_path / "run") == [1, 2]


# --- the space kept for the last writes ------------------------------------------------

KINDS = {
    "the addition task's": {},
    "dni, SG hidden layers, batch norm": dict(mode="dni", sg_hidden=(32, 16), batchnorm=True),
    "backprop float32 layer norm": dict(mode="backprop", dtype="float32", layernorm=True),
    "unlock forward": dict(unlock="forward", layers=4, hidden=(20, 12, 9)),
    "unlock hidden, dni": dict(mode="dni", unlock="hidden", layers=3),
    "two layers": dict(layers=2, hidden=(5,)),
}


@pytest.mark.parametrize("kw", KINDS.values(), ids=KINDS)
def test_the_space_kept_holds_what_a_stopped_run_writes(tmp_path, kw):
    """The sizes from the configuration alone against the layers a run of it
    builds, and the space against the weights files written of them and a
    summary of that many layers."""
    from pipeline.layers.build import make_hidden, make_output
    cfg = Config(**kw)
    layers = [make_hidden(cfg, k) for k in range(1, cfg.layers)] + [make_output(cfg)]
    assert runfiles.weight_sizes(cfg) == [[a.size for a in L.weights().values()]
                                          for L in layers]
    rd = RunDir(tmp_path / "run")
    written = 0
    for L in layers:
        f = rd.write_weights(protocol.layer_role(L.index, cfg.layers), L.weights())
        written += -(-f.stat().st_size // runfiles.BLOCK) * runfiles.BLOCK
    rd.close()
    assert written + runfiles.SUMMARY_BYTES <= runfiles.reserve_bytes(cfg)


def test_files_beside_runs_are_written_whole_and_private(tmp_path):
    old = os.umask(0o022)
    try:
        (tmp_path / "plot.png").write_bytes(b"old")
        os.chmod(tmp_path / "plot.png", 0o644)
        files.write_private(tmp_path / "plot.png", lambda f: f.write(b"new"))
        files.write_private(tmp_path / "a" / "b" / "t.md", lambda f: f.write("x"), text=True)
    finally:
        os.umask(old)
    assert (tmp_path / "plot.png").read_bytes() == b"new"
    for p, mode in [("plot.png", 0o600), ("a", 0o700), ("a/b", 0o700), ("a/b/t.md", 0o600)]:
        assert stat.S_IMODE(os.stat(tmp_path / p).st_mode) == mode, p
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["a", "b", "plot.png", "t.md"]


@pytest.mark.parametrize("how", ["unsupported", "missing"])
def test_the_space_is_taken_where_the_file_system_cannot_allocate(tmp_path, monkeypatch, how):
    import errno
    if how == "missing":
        monkeypatch.delattr(os, "posix_fallocate", raising=False)
    else:
        def unsupported(fd, offset, size):
            raise OSError(errno.EOPNOTSUPP, os.strerror(errno.EOPNOTSUPP))
        monkeypatch.setattr(os, "posix_fallocate", unsupported)
    fd = files.open_private(tmp_path / ".reserve", os.O_TRUNC)
    try:
        files.allocate(fd, 3 * 1024 * 1024 + 5)
    finally:
        os.close(fd)
    assert (tmp_path / ".reserve").stat().st_size == 3 * 1024 * 1024 + 5
    assert (tmp_path / ".reserve").stat().st_blocks * 512 >= 3 * 1024 * 1024 + 5
