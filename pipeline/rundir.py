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

import numpy as np


def default_path(mode: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{mode}-{secrets.token_hex(2)}"


class RunDir:
    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if (self.path / "summary.json").exists():
            raise ValueError(f"argument --run-dir: {self.path} already holds a finished run; "
                             "choose another directory")
        self.path.mkdir(parents=True, exist_ok=True)
        self._metrics = open(self.path / "metrics.jsonl", "a", encoding="utf-8")

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

    def write_weights(self, role: str, arrays: dict[str, np.ndarray]) -> Path:
        return self._atomic(f"weights/{role}.npz", lambda f: np.savez(f, **arrays))

    def close(self) -> None:
        self._metrics.close()


def _jsonable(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (Path, tuple)):
        return str(value) if isinstance(value, Path) else list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
