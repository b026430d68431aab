"""Going on from a run directory's last checkpoint: read what ``latest.json``
names, check every role's state against the run's layers
(``checkpoint.check_states``), and give the run's Config and states back,
before any process starts."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np

from pipeline import files, limits
from pipeline.layers.state import check_states, refuse
from pipeline.wire.protocol import is_count, roles
from pipeline.run.runfiles import LONGEST_INSIDE, checkpoint_dir


def latest_epochs(latest) -> int | None:
    """The epochs done by the checkpoint a ``latest.json`` names, None if it
    names none: ``{"epochs_done": N, "dir": "epoch-N"}``, or as runs wrote
    it before they counted checkpoints from 1, ``{"epoch": N - 1, "dir":
    "epoch-(N - 1)"}`` (the epoch's index from 0)."""
    if not isinstance(latest, dict):
        return None
    if "epochs_done" in latest:
        done = latest["epochs_done"]
        named = done
    else:
        named = latest.get("epoch")
        done = named + 1 if is_count(named) else None
    if (not is_count(done) or not 1 <= done <= limits.MAX_COUNT
            or latest.get("dir") != checkpoint_dir(named)):
        return None
    return done


def read_latest(path: Path, roles: list[str]
                ) -> tuple[int, dict[str, tuple[dict, dict[str, np.ndarray]]]]:
    """(epochs done, {role: (state, arrays)}) of the checkpoint
    ``latest.json`` names, which must be inside this run directory;
    ValueError naming the file and what is wrong with it."""
    latest_path = path / "checkpoints" / "latest.json"
    try:
        latest = json.loads(latest_path.read_text())
    except FileNotFoundError:
        raise refuse(f"{path} has no checkpoints/latest.json: was it run with "
                      "--checkpoint-every, and did a checkpoint complete?") from None
    except (OSError, ValueError) as exc:
        raise refuse(f"{latest_path}: unreadable ({exc})") from None
    done = latest_epochs(latest)
    if done is None:
        raise refuse(f"{latest_path} must name an epoch and its directory "
                      f"epoch-NNNNNN in this run, got {latest!r}")
    d = path / "checkpoints" / latest["dir"]
    root = path.resolve()
    states = {}
    for role in roles:
        for f in (d / f"{role}.json", d / f"{role}.npz"):
            if not f.resolve().is_relative_to(root):  # a link out of the run
                raise refuse(f"checkpoint {d}: {f.name} leads outside {path}")
        try:
            state = json.loads((d / f"{role}.json").read_text())
            with np.load(d / f"{role}.npz", allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
            raise refuse(f"checkpoint {d}: {role}: unreadable ({exc})") from None
        if not isinstance(state, dict):
            raise refuse(f"checkpoint {d}: {role}.json is not a JSON object")
        states[role] = (state, arrays)
    return done, states


def resume_config(run_dir, quiet: bool):
    """(Config, {role: (state, arrays)}) to go on with an interrupted run
    after its last checkpoint, every array checked against the run's layers."""
    from pipeline.config import Config
    from pipeline.run.rundir import RunDir
    path = Path(run_dir)
    files.check_path(path, "--resume", LONGEST_INSIDE)
    try:
        # A run from before checkpoint retention kept every checkpoint: so
        # does its resume. A resume goes on; it never replaces the run.
        saved = json.loads((path / "config.json").read_text())["config"]
        config = {"keep_checkpoints": 0, **saved, "overwrite": False}
        Config.from_dict(config)
    except FileNotFoundError:
        raise refuse(f"{path} is not a run directory") from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise refuse(f"{path / 'config.json'}: unreadable ({exc})") from None
    RunDir.check_resumable(path)
    done, states = read_latest(path, roles(config.get("layers", 0))[1:])
    cfg = Config.from_dict({**config, "start_epoch": done, "run_dir": str(path),
                            "quiet": quiet})
    latest = json.loads((path / "checkpoints" / "latest.json").read_text())
    check_states(cfg, states, str(path / "checkpoints" / latest["dir"]))
    return cfg, states
