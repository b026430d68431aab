"""Reading a finished run's directory (summary.json, config.json,
metrics.jsonl) for the report and the comparison of runs; ``rundir`` writes it."""
from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.run.runfiles import NUMBERING

# The events whose "epoch" a user reads; the base a run without a numbering
# line counted them from.
NUMBERED, OLD_BASE = frozenset({"epoch", "layer", "checkpoint"}), 0


def load_run(run_dir: str | os.PathLike) -> dict:
    """{"path", "summary", "config", "events", "bad_lines"} of a finished run,
    the events' epochs counted from 1 whichever numbering wrote them
    (``renumbered``).

    Lines of metrics.jsonl that are not JSON objects (a run killed mid-write
    leaves half a line) are skipped and counted in ``bad_lines``. Raises
    ValueError naming the file if the directory is not a finished run.
    """
    path = Path(run_dir)
    try:
        os.stat(path)
    except OSError as exc:  # absent, or a name too long for the file system
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
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
    return {"path": path, "summary": summary, "config": config, "events": renumbered(events),
            "bad_lines": bad}


def renumbered(events: list[dict]) -> list[dict]:
    """``events`` (of metrics.jsonl, in order) with every ``epoch`` of an
    epoch, layer or checkpoint event counted from 1 (the N-th epoch is N).
    Events count as the last numbering line before them says
    (``runfiles.NUMBERING``); those before any, a run's from before that
    line (or its part before a resume by this version), from 0."""
    base, out = OLD_BASE, []
    for e in events:
        if e.get("event") == NUMBERING["event"] and type(e.get("epoch_base")) is int:
            base = e["epoch_base"]
        epoch = e.get("epoch")
        if (base != 1 and e.get("event") in NUMBERED and isinstance(epoch, int)
                and not isinstance(epoch, bool)):
            e = {**e, "epoch": epoch + 1 - base}
        out.append(e)
    return out


def _json_object(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    return obj
