"""TensorBoard's view of a run (``--tensorboard``): each metric event as
scalars (``scalars``, pure), appended to an event file in RUN_DIR/tensorboard/
(``Board``), so TensorBoard pointed at a run, or at a sweep's runs, shows them.

An event file is TFRecord: per record the data's length (8 bytes, little
endian), its masked CRC-32C (4), the data (a serialised ``Event`` protobuf),
the data's masked CRC-32C (4). tensorboardX gives the protobuf classes and
the CRC; the file itself is written here, a whole record per metric event
and unbuffered, private as every file of the run (tensorboardX's own writer
would write from a thread, through the umask, to a name with the host in it).
"""
from __future__ import annotations

import contextlib
import os
import re
import struct
import time
from pathlib import Path
from collections.abc import Callable

from pipeline import files
from pipeline.run import runfiles

HINT = "needs tensorboardX, which is not installed: pip install -e '.[tb]'"

# The output layer's epoch event: its field -> the tag.
EPOCH_TAGS = {"loss": "loss/train", "test_loss": "loss/test",
              "accuracy": "accuracy/train", "test_accuracy": "accuracy/test",
              "batches_per_s": "speed/batches_per_s"}
# A hidden layer's epoch event: its field -> the tag, ROLE its role. The
# first part of a tag is TensorBoard's section: each quantity's layers together.
LAYER_TAGS = {"staleness_steps_mean": "staleness/ROLE/steps_mean",
              "staleness_steps_max": "staleness/ROLE/steps_max",
              "staleness_s_mean": "staleness/ROLE/seconds_mean",
              "staleness_s_max": "staleness/ROLE/seconds_max",
              "input_staleness_mean": "staleness/ROLE/input_steps_mean",
              "sg_cosine": "sg/ROLE/cosine", "sg_rel_err": "sg/ROLE/rel_err",
              "sg_loss": "sg/ROLE/loss",
              "si_cosine": "synthetic_input/ROLE/cosine",
              "si_rel_err": "synthetic_input/ROLE/rel_err",
              "si_loss": "synthetic_input/ROLE/loss",
              "act_norm": "activations/ROLE/norm"}
# The evaluation pass of the final weights over the training set.
FINAL_TAGS = {"final_loss": "final/loss", "train_accuracy": "final/train_accuracy"}
_ROLE = re.compile(r"layer[1-9][0-9]{0,5}|output")


def available() -> bool:
    """True if tensorboardX can be imported."""
    try:
        import tensorboardX  # noqa: F401
    except ImportError:
        return False
    return True


def require() -> None:
    """ValueError, one line naming the option and the install, without tensorboardX."""
    if not available():
        raise ValueError(f"argument --tensorboard: {HINT}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scalars(event: dict, epochs: int = 0) -> list[tuple[str, float, int]]:
    """(tag, value, step) of each figure of a metric event; the step is the
    event's ``epoch``, counted from 1 as the progress line and the report
    count it; the final evaluation's step is ``epochs``, the epochs the run
    had done. Fields absent, null or not numbers give nothing; so do other
    events (checkpoints, decode errors, the numbering)."""
    kind = event.get("event")
    if kind == "final":
        table, step = FINAL_TAGS, epochs
    else:
        epoch = event.get("epoch")
        if not (_number(epoch) and epoch == int(epoch) >= 1):
            return []
        step = int(epoch)
        role = event.get("role")
        if kind == "epoch":
            table = EPOCH_TAGS
        elif kind == "layer" and isinstance(role, str) and _ROLE.fullmatch(role):
            table = {name: tag.replace("ROLE", role) for name, tag in LAYER_TAGS.items()}
        else:
            return []
    return [(tag, float(event[name]), step) for name, tag in table.items()
            if _number(event.get(name))]


def record(data: bytes) -> bytes:
    """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
    from tensorboardX.record_writer import masked_crc32c
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", masked_crc32c(header)) + data
            + struct.pack("<I", masked_crc32c(data)))


class Board:
    """The event file of this process's part of a run, in ``directory``
    (made 0700; the file 0600). ``add`` appends an event's scalars as one
    whole record; a write the disk has no room for is cut back off and
    raises OSError (the run directory stops the run, as for metrics.jsonl)."""

    def __init__(self, directory: Path, clock: Callable[[], float] = time.time):
        try:
            from tensorboardX.proto.event_pb2 import Event
            from tensorboardX.proto.summary_pb2 import Summary
        except ImportError:
            raise ValueError(f"argument --tensorboard: {HINT}") from None
        self._event, self._summary, self._clock = Event, Summary, clock
        files.make_private_dirs(directory)
        self.path = directory / runfiles.event_file(int(clock()), os.getpid())
        self._fd: int | None = files.open_private(self.path, os.O_APPEND)
        self._end = os.fstat(self._fd).st_size
        self.epochs = 0  # the last epoch seen, from 1: the final evaluation's step
        try:
            self._write(Event(wall_time=clock(), file_version="brain.Event:2"))
        except OSError:
            self.close()
            raise

    def add(self, event: dict) -> None:
        found = scalars(event, self.epochs)
        if not found:
            return
        step = found[0][2]  # one event, one step
        self.epochs = max(self.epochs, step)
        values = [self._summary.Value(tag=tag, simple_value=value) for tag, value, _ in found]
        self._write(self._event(wall_time=self._clock(), step=step,
                                summary=self._summary(value=values)))

    def _write(self, event) -> None:
        if self._fd is None:
            return
        data = record(event.SerializeToString())
        try:
            done = 0
            while done < len(data):
                done += os.write(self._fd, data[done:])
        except OSError:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, self._end)  # no half record
            raise
        self._end += len(data)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def attach(rd) -> None:
    """Give the open run directory ``rd`` its board; when the board cannot be
    made, ValueError naming it, and ``rd`` discarded as a refused run is."""
    where = rd.path / runfiles.TENSORBOARD
    try:
        rd.board = Board(where)
    except OSError as exc:
        with contextlib.suppress(OSError):
            where.rmdir()  # made, but no file in it
        rd.discard()
        raise ValueError(f"argument --tensorboard: cannot write {where}: "
                         f"{exc.strerror or exc}") from None
