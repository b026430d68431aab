"""--tensorboard: metric events as scalars on an exact table, and event files
read back by a reader written here (the TFRecord framing with a CRC-32C of
its own, the Event protobuf) against the run's metrics.jsonl: an in-process
run, a sweep whose points are TensorBoard's runs, a real run through
launch.py; the option's refusals and the writes the disk has no room for."""
from __future__ import annotations

import errno
import io
import json
import os
import stat
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.run import runfiles, tensorboard
from pipeline.run.cli import parse_run, parse_sweep
from pipeline.run.rundir import RunDir, WriteError, open_run

pytestmark = pytest.mark.timeout(60)
needs_tensorboardx = pytest.mark.skipif(not tensorboard.available(), reason=tensorboard.HINT)


# --- an independent reader -----------------------------------------------------------------

def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def masked(data: bytes) -> int:
    """TFRecord's masked CRC: rotated right by 15 bits, plus a constant."""
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def records(path: Path) -> list[bytes]:
    """The data of every record of a TFRecord file, each CRC checked."""
    raw, out, i = path.read_bytes(), [], 0
    while i < len(raw):
        header = raw[i:i + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", raw[i + 8:i + 12])[0] == masked(header)
        data = raw[i + 12:i + 12 + n]
        assert len(data) == n, "a record cut short"
        assert struct.unpack("<I", raw[i + 12 + n:i + 16 + n])[0] == masked(data)
        out.append(data)
        i += 16 + n
    return out


def read_scalars(directory: Path) -> dict[tuple[str, int], float]:
    """{(tag, step): value} of every event file in ``directory``; the first
    record of each file is the file-version event."""
    from tensorboardX.proto.event_pb2 import Event
    out: dict[tuple[str, int], float] = {}
    names = sorted(p.name for p in directory.iterdir())
    assert names and all("tfevents" in n for n in names), names
    for name in names:
        events = [Event.FromString(r) for r in records(directory / name)]
        assert events[0].file_version == "brain.Event:2"
        for e in events[1:]:
            assert e.wall_time > 1.6e9
            for v in e.summary.value:
                assert (v.tag, e.step) not in out, (v.tag, e.step)
                out[v.tag, e.step] = v.simple_value
    return out


# What each event of metrics.jsonl must show in TensorBoard, written out as
# the docs state it (docs/design.md#tensorboard), not taken from the module.
EPOCH = [("loss", "loss/train"), ("accuracy", "accuracy/train"), ("test_loss", "loss/test"),
         ("test_accuracy", "accuracy/test"), ("batches_per_s", "speed/batches_per_s")]
LAYER = [("staleness_steps_mean", "staleness/{}/steps_mean"),
         ("staleness_steps_max", "staleness/{}/steps_max"),
         ("staleness_s_mean", "staleness/{}/seconds_mean"),
         ("staleness_s_max", "staleness/{}/seconds_max"),
         ("input_staleness_mean", "staleness/{}/input_steps_mean"),
         ("sg_cosine", "sg/{}/cosine"), ("sg_rel_err", "sg/{}/rel_err"), ("sg_loss", "sg/{}/loss"),
         ("si_cosine", "synthetic_input/{}/cosine"), ("si_rel_err", "synthetic_input/{}/rel_err"),
         ("si_loss", "synthetic_input/{}/loss"), ("act_norm", "activations/{}/norm")]


def expected(run_dir: Path) -> dict[tuple[str, int], float]:
    """The scalars of metrics.jsonl, as float32 (TensorBoard's simple_value)."""
    out: dict[tuple[str, int], float] = {}
    epochs = 0
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        e = json.loads(line)
        if e["event"] == "epoch":
            pairs, step = [(e.get(k), tag) for k, tag in EPOCH], e["epoch"]
            epochs = max(epochs, step)
        elif e["event"] == "layer":
            pairs = [(e.get(k), tag.format(e["role"])) for k, tag in LAYER]
            step = e["epoch"]
        elif e["event"] == "final":
            pairs = [(e["final_loss"], "final/loss"),
                     (e["train_accuracy"], "final/train_accuracy")]
            step = epochs
        else:
            continue
        out.update({(tag, step): float(np.float32(v)) for v, tag in pairs if v is not None})
    return out


def check_run(run_dir: Path) -> dict[tuple[str, int], float]:
    got = read_scalars(run_dir / "tensorboard")
    assert got == expected(run_dir)
    return got


# --- scalars: the exact table --------------------------------------------------------------

@pytest.mark.parametrize("event, epochs, want", [
    ({"event": "epoch", "role": "output", "epoch": 1, "loss": 6.5, "accuracy": 0.01,
      "batches": 10, "elapsed_s": 0.1, "batches_per_s": 93.5, "rss_mb": 43.6},
     0, [("loss/train", 6.5, 1), ("accuracy/train", 0.01, 1), ("speed/batches_per_s", 93.5, 1)]),
    ({"event": "epoch", "role": "output", "epoch": 10, "loss": 0.25, "accuracy": 0.9,
      "test_loss": 0.3, "test_accuracy": 0.875, "batches_per_s": None},
     0, [("loss/train", 0.25, 10), ("loss/test", 0.3, 10), ("accuracy/train", 0.9, 10),
         ("accuracy/test", 0.875, 10)]),
    ({"event": "layer", "role": "layer2", "epoch": 4, "gradients": 10,
      "staleness_steps_mean": 0.4, "staleness_steps_max": 1, "staleness_s_mean": 0.0048,
      "staleness_s_max": 0.0118, "sg_loss": 1.5, "sg_cosine": 0.31, "sg_rel_err": 0.97,
      "act_norm": 2.99, "elapsed_s": 0.35, "rss_mb": 43.8},
     0, [("staleness/layer2/steps_mean", 0.4, 4), ("staleness/layer2/steps_max", 1.0, 4),
         ("staleness/layer2/seconds_mean", 0.0048, 4), ("staleness/layer2/seconds_max", 0.0118, 4),
         ("sg/layer2/cosine", 0.31, 4), ("sg/layer2/rel_err", 0.97, 4), ("sg/layer2/loss", 1.5, 4),
         ("activations/layer2/norm", 2.99, 4)]),
    # async-backprop: no SG figures (null); an unlocked layer's true inputs
    ({"event": "layer", "role": "layer12", "epoch": 1, "staleness_steps_mean": 2.0,
      "staleness_steps_max": 2, "staleness_s_mean": None, "staleness_s_max": None,
      "sg_loss": None, "sg_cosine": None, "sg_rel_err": None, "act_norm": None,
      "si_loss": 0.5, "si_cosine": 0.75, "si_rel_err": 0.25, "input_staleness_mean": 1.5},
     0, [("staleness/layer12/steps_mean", 2.0, 1), ("staleness/layer12/steps_max", 2.0, 1),
         ("staleness/layer12/input_steps_mean", 1.5, 1),
         ("synthetic_input/layer12/cosine", 0.75, 1),
         ("synthetic_input/layer12/rel_err", 0.25, 1), ("synthetic_input/layer12/loss", 0.5, 1)]),
    ({"event": "final", "role": "output", "final_loss": 0.03, "train_accuracy": 1.0,
      "batches": 8000, "train_s": 11.0},
     800, [("final/loss", 0.03, 800), ("final/train_accuracy", 1.0, 800)]),
    # a diverged loss is shown as it is
    ({"event": "epoch", "role": "output", "epoch": 2, "loss": float("inf")},
     0, [("loss/train", float("inf"), 2)]),
    # nothing else: other events, and what is not a number, an epoch or a role
    ({"event": "checkpoint", "epoch": 4}, 0, []),
    ({"event": "decode_error", "role": "layer1", "reason": "bad magic"}, 0, []),
    ({"event": "numbering", "epoch_base": 1}, 0, []),
    ({"event": "epoch", "role": "output", "epoch": True, "loss": 1.0}, 0, []),
    ({"event": "epoch", "role": "output", "epoch": 0, "loss": 1.0}, 0, []),  # from 1
    ({"event": "epoch", "role": "output", "epoch": -1, "loss": 1.0}, 0, []),
    ({"event": "epoch", "role": "output", "epoch": 1.5, "loss": 1.0}, 0, []),
    ({"event": "epoch", "role": "output", "loss": 1.0}, 0, []),
    ({"event": "layer", "role": "../etc", "epoch": 1, "sg_cosine": 0.5}, 0, []),
    ({"event": "layer", "role": None, "epoch": 1, "sg_cosine": 0.5}, 0, []),
    ({"event": "epoch", "role": "output", "epoch": 1, "loss": "6.5", "accuracy": True,
      "test_loss": [1.0], "batches_per_s": 7}, 0, [("speed/batches_per_s", 7.0, 1)]),
])
def test_scalars_of_each_event(event, epochs, want):
    assert sorted(tensorboard.scalars(event, epochs)) == sorted(want)


@needs_tensorboardx
def test_the_framing_is_tfrecords():
    # the CRC written here against its published check value
    assert crc32c(b"123456789") == 0xE3069283
    data = b"\x00\x01hello"
    r = tensorboard.record(data)
    assert r[:8] == struct.pack("<Q", len(data)) and r[12:-4] == data
    assert struct.unpack("<I", r[8:12])[0] == masked(r[:8])
    assert struct.unpack("<I", r[-4:])[0] == masked(data)


# --- runs written and read back ------------------------------------------------------------

def _run(argv: list[str]) -> Path:
    from commands import supervisor
    cfg, _ = parse_run(argv)
    assert supervisor.run(cfg, io.StringIO()) == 0
    return Path(cfg.run_dir)


@needs_tensorboardx
def test_an_in_process_run_shows_what_metrics_jsonl_says(tmp_path):
    run_dir = _run(["--in-process", "--tensorboard", "--epochs", "12", "--grad-delay", "2",
                    "--quiet", "--run-dir", str(tmp_path / "run")])
    got = check_run(run_dir)
    steps = {step for tag, step in got if tag == "loss/train"}
    assert steps == set(range(1, 13))
    assert got["staleness/layer1/steps_mean", 12] == 2.0   # every gradient 2 steps late
    assert ("sg/layer2/cosine", 12) in got
    # the final evaluation, as a process run's: once in metrics.jsonl, at the last epoch's step
    finals = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
              if '"final"' in line]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert len(finals) == 1 and finals[0]["final_loss"] == summary["final_loss"]
    assert got["final/loss", 12] == float(np.float32(summary["final_loss"]))
    assert got["final/train_accuracy", 12] == float(np.float32(summary["train_accuracy"]))
    board = run_dir / "tensorboard"
    assert stat.S_IMODE(board.stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in board.iterdir())


@needs_tensorboardx
def test_a_sweeps_points_are_separate_tensorboard_runs(tmp_path):
    from commands.sweep import run_sweep
    out = tmp_path / "sweep"
    args = parse_sweep(["--modes", "cdni,async-backprop", "--grad-delay", "0,1", "--seeds", "1",
                        "--epochs", "4", "--in-process", "--tensorboard", "--out", str(out)])
    assert all(base.tensorboard for base in args.bases.values())
    assert run_sweep(args, io.StringIO()) == 0
    # TensorBoard pointed at the sweep makes a run of every directory
    # holding event files: one per point, named by the point
    runs = sorted(str(p.parent.relative_to(out)) for p in out.rglob("*tfevents*"))
    assert runs == sorted(f"runs/{name}/tensorboard" for name in
                          ("cdni-delay0-seed1", "cdni-delay1-seed1",
                           "async-backprop-delay0-seed1", "async-backprop-delay1-seed1"))
    for run in runs:
        got = check_run((out / run).parent)
        assert any(tag == "loss/train" for tag, _ in got)
        sg = any(tag.startswith("sg/") for tag, _ in got)
        assert sg == ("cdni" in run)   # async-backprop has no synthetic gradients


@needs_tensorboardx
def test_a_resumed_run_adds_an_event_file(tmp_path, monkeypatch):
    rd = RunDir(tmp_path / "run")
    clock = iter([1_800_000_000.0, 1_800_000_000.5, 1_800_000_001.0])
    rd.board = tensorboard.Board(rd.path / "tensorboard", clock=lambda: next(clock))
    rd.metric({"event": "epoch", "role": "output", "epoch": 1, "loss": 2.0})
    rd.close()
    monkeypatch.setattr(os, "getpid", lambda: 99)
    rd = RunDir(tmp_path / "run", resume=True)
    rd.board = tensorboard.Board(rd.path / "tensorboard", clock=lambda: 1_800_000_100.0)
    rd.metric({"event": "epoch", "role": "output", "epoch": 2, "loss": 1.0})
    rd.close()
    names = sorted(p.name for p in (tmp_path / "run" / "tensorboard").iterdir())
    assert names[1] == "events.out.tfevents.1800000100.99" and len(names) == 2
    assert read_scalars(tmp_path / "run" / "tensorboard") == {("loss/train", 1): 2.0,
                                                              ("loss/train", 2): 1.0}
    # both are the run's own: --overwrite removes them, saying so
    assert runfiles.clear(tmp_path / "run")[-1:] == ["tensorboard/ (2 files)"]
    assert not (tmp_path / "run" / "tensorboard").exists()


# --- refusals and a full disk --------------------------------------------------------------

def test_without_tensorboardx_the_option_is_one_line_and_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    with pytest.raises(SystemExit) as exc:
        parse_run(["--tensorboard", "--run-dir", str(tmp_path / "run")])
    assert exc.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["launch.py: error: argument --tensorboard: needs tensorboardX, which is "
                   "not installed: pip install -e '.[tb]'"]
    with pytest.raises(SystemExit):
        parse_sweep(["--tensorboard", "--out", str(tmp_path / "sweep")])
    # a configuration that did not come through the parser (a cluster file,
    # a resumed run) is refused where the run directory opens, before anything is made
    cfg, _ = parse_run(["--run-dir", str(tmp_path / "run")])
    from dataclasses import replace
    with pytest.raises(ValueError, match=r"argument --tensorboard: .*pip install -e '\.\[tb\]'"):
        open_run(replace(cfg, tensorboard=True), False, io.StringIO())
    assert not (tmp_path / "run").exists()


@needs_tensorboardx
def test_a_board_that_cannot_be_made_refuses_the_run_and_leaves_nothing(tmp_path, monkeypatch):
    cfg, _ = parse_run(["--tensorboard", "--quiet", "--run-dir", str(tmp_path / "run")])

    def no_room(path, flags):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(tensorboard.files, "open_private", no_room)
    with pytest.raises(ValueError, match=r"argument --tensorboard: cannot write .*tensorboard: "
                                         r"No space left"):
        open_run(cfg, False, io.StringIO())
    assert not (tmp_path / "run").exists()


@needs_tensorboardx
def test_a_full_disk_at_the_event_file_stops_the_run_and_leaves_whole_records(tmp_path,
                                                                               monkeypatch):
    rd = RunDir(tmp_path / "run")
    rd.board = tensorboard.Board(rd.path / "tensorboard")
    event = {"event": "epoch", "role": "output", "epoch": 1, "loss": 2.0, "accuracy": 0.5}
    rd.metric(event)
    real_write = os.write

    def half(fd, data):  # the disk takes half the record, then is full
        if fd == rd.board._fd and len(data) > 8:
            real_write(fd, data[:len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)
    monkeypatch.setattr(tensorboard.os, "write", half)
    with pytest.raises(WriteError, match=r"cannot write .*tfevents.*No space left") as exc:
        rd.metric({**event, "epoch": 2})
    assert exc.value.full and rd.full is exc.value
    rd.metric({**event, "epoch": 3})  # the run is stopping: nothing more is written
    rd.close()
    assert read_scalars(tmp_path / "run" / "tensorboard") == {("loss/train", 1): 2.0,
                                                              ("accuracy/train", 1): 0.5}


@pytest.mark.slow
@pytest.mark.timeout(120)
@needs_tensorboardx
def test_a_pipeline_run_through_launch_py(tmp_path):
    from tests.conftest import run_launch
    run_dir = tmp_path / "run"
    done = run_launch("--tensorboard", "--epochs", "20", "--quiet", "--run-dir", str(run_dir),
                      timeout=100)
    assert done.returncode == 0, done.stderr
    got = check_run(run_dir)
    roles = {tag.split("/")[1] for tag, _ in got if tag.startswith("staleness/")}
    assert roles == {"layer1", "layer2"}
    assert {step for tag, step in got if tag == "loss/train"} == set(range(1, 21))
    assert ("final/loss", 20) in got and ("final/train_accuracy", 20) in got
