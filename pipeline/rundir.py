"""The run directory: config.json, metrics.jsonl, summary.json, weights/*.npz.

Written so that a crash loses nothing already written: metrics are appended
and flushed line by line; the summary and weights are written to a temporary
file and renamed into place, so they are either whole or absent.
"""
from __future__ import annotations

import json
import os
import secrets
import time
from pathlib import Path
from typing import TextIO

import numpy as np


def default_path(mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{mode}-{secrets.token_hex(2)}"


def open_run(cfg, resuming: bool, stream: TextIO) -> "RunDir":
    """The run directory of ``cfg`` (a new one, or the one a resumed run goes
    on in), announced on ``stream`` unless --quiet."""
    rd = RunDir(cfg.run_dir or default_path(cfg.mode), resume=resuming)
    if not cfg.quiet:
        print(f"run directory: {rd.path}", file=stream, flush=True)
        if resuming:
            print(f"resuming at epoch {cfg.start_epoch + 1}", file=stream, flush=True)
    return rd


class RunDir:
    def __init__(self, path: str | os.PathLike, resume: bool = False):
        """``resume``: go on in a directory whose run was interrupted or failed."""
        self.path = Path(path)
        if resume:
            self.check_resumable(self.path)
        elif (self.path / "summary.json").exists():
            raise ValueError(f"argument --run-dir: {self.path} already holds a finished "
                             "run; choose another directory (or --resume it)")
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")

    @staticmethod
    def check_resumable(path: Path) -> None:
        summary = path / "summary.json"
        if summary.exists() and json.loads(summary.read_text()).get("status") == "completed":
            raise ValueError(f"argument --resume: the run in {path} completed; "
                             "there is nothing to resume")

    def _atomic(self, name: str, write) -> Path:
        final = self.path / name
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp")
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return final

    def write_json(self, name: str, obj: dict) -> Path:
        text = json.dumps(obj, indent=2, sort_keys=False, default=_jsonable) + "\n"
        return self._atomic(name, lambda f: f.write(text.encode()))

    def metric(self, event: dict) -> None:
        self._metrics.write(json.dumps(event, default=_jsonable) + "\n")
        self._metrics.flush()

    def write_npz(self, name: str, arrays: dict[str, np.ndarray]) -> Path:
        return self._atomic(name, lambda f: np.savez(f, **arrays))

    def write_weights(self, role: str, arrays: dict[str, np.ndarray]) -> Path:
        return self.write_npz(f"weights/{role}.npz", arrays)

    def write_checkpoint(self, epoch: int, role: str, state: dict,
                         arrays: dict[str, np.ndarray]) -> None:
        d = f"checkpoints/epoch-{epoch:06d}"
        self.write_npz(f"{d}/{role}.npz", arrays)
        self.write_json(f"{d}/{role}.json", state)

    def commit_checkpoint(self, epoch: int) -> None:
        """Every role's state of ``epoch`` is on disk: make it the one to
        resume from. Written last and atomically, so a crash mid-checkpoint
        leaves the previous one in force."""
        self.write_json("checkpoints/latest.json", {"epoch": epoch,
                                                     "dir": f"epoch-{epoch:06d}"})

    def close(self) -> None:
        self._metrics.close()


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def load_checkpoint(path: str | os.PathLike, roles: list[str]
                    ) -> tuple[dict, int, dict[str, tuple[dict, dict[str, np.ndarray]]]]:
    """(config dict, epoch, {role: (state, arrays)}) of a run directory's
    latest checkpoint; ValueError naming what is missing."""
    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())["config"]
        latest = json.loads((path / "checkpoints" / "latest.json").read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"argument --resume: {path} has no {Path(exc.filename).name}: "
                         "was it run with --checkpoint-every, and did a checkpoint complete?"
                         ) from None
    except (ValueError, KeyError) as exc:
        raise ValueError(f"argument --resume: {path}: unreadable run files ({exc})") from None
    d = path / "checkpoints" / latest["dir"]
    states = {}
    for role in roles:
        try:
            state = json.loads((d / f"{role}.json").read_text())
            with np.load(d / f"{role}.npz") as z:
                states[role] = (state, {k: z[k] for k in z.files})
        except (OSError, ValueError) as exc:
            raise ValueError(f"argument --resume: checkpoint {d} lacks {role}: {exc}") from None
    return config, int(latest["epoch"]), states


def resume_config(run_dir: str | os.PathLike, quiet: bool):
    """(Config, {role: (state, arrays)}) to go on with an interrupted run
    after its last checkpoint."""
    from pipeline.config import Config
    from pipeline.protocol import roles
    path = Path(run_dir)
    if not (path / "config.json").exists():
        raise ValueError(f"argument --resume: {path} is not a run directory")
    RunDir.check_resumable(path)
    cfg = Config.from_dict(json.loads((path / "config.json").read_text())["config"])
    config, epoch, states = load_checkpoint(path, roles(cfg.layers)[1:])
    cfg = Config.from_dict({**config, "start_epoch": epoch + 1, "run_dir": str(path),
                            "quiet": quiet})
    return cfg, states


# --- reading a finished run --------------------------------------------------------------

def load_run(run_dir: str | os.PathLike) -> dict:
    """{"path", "summary", "config", "events", "bad_lines"} of a finished run.

    Lines of metrics.jsonl that are not JSON objects (a run killed mid-write
    leaves half a line) are skipped and counted in ``bad_lines``. Raises
    ValueError naming the file if the directory is not a finished run.
    """
    path = Path(run_dir)
    if not path.is_dir():
        raise ValueError(f"{path}: not a directory")
    summary_path, metrics_path = path / "summary.json", path / "metrics.jsonl"
    if not summary_path.is_file():
        raise ValueError(f"{summary_path}: missing (the run has not finished, "
                         "or this is not a run directory)")
    if not metrics_path.is_file():
        raise ValueError(f"{metrics_path}: missing")
    summary = _json_object(summary_path)
    config_path = path / "config.json"
    config = _json_object(config_path) if config_path.is_file() else {}

    events: list[dict] = []
    bad = 0
    with open(metrics_path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                bad += 1
                continue
            if isinstance(event, dict):
                events.append(event)
            else:
                bad += 1
    return {"path": path, "summary": summary, "config": config, "events": events,
            "bad_lines": bad}


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
