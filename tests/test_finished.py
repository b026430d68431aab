"""Tests for pipeline.run.finished: a finished run's directory read back,
its damage named by file."""
from __future__ import annotations

import json

import pytest

from pipeline.run import compare
from pipeline.run.finished import load_run, renumbered
from tests.test_report import SUMMARY, _events, make_run

pytestmark = pytest.mark.timeout(30)


def test_load_run_reads_every_file_and_skips_the_corrupt_line(tmp_path):
    run = load_run(make_run(tmp_path / "run"))
    assert run["summary"] == SUMMARY
    assert run["config"]["config"]["layers"] == 3
    assert len(run["events"]) == 1 + 4 * 3 + 2  # the numbering line, 4 epochs, 2 more
    assert run["bad_lines"] == 1
    assert [e["event"] for e in run["events"]].count("layer") == 8


def test_load_run_without_config_json_still_loads(tmp_path):
    path = make_run(tmp_path / "run")
    (path / "config.json").unlink()
    assert load_run(path)["config"] == {}


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
        load_run(target)


def test_load_run_rejects_a_file_given_as_the_directory(tmp_path):
    f = tmp_path / "summary.json"
    f.write_text("{}")
    with pytest.raises(ValueError, match="not a directory"):
        load_run(f)


# --- the epoch numbering ---------------------------------------------------------------------

NEW = {"event": "numbering", "epoch_base": 1}


@pytest.mark.parametrize("events, want", [
    # this numbering: as written
    ([NEW, {"event": "epoch", "epoch": 1}, {"event": "layer", "epoch": 1},
      {"event": "checkpoint", "epoch": 1}],
     [NEW, {"event": "epoch", "epoch": 1}, {"event": "layer", "epoch": 1},
      {"event": "checkpoint", "epoch": 1}]),
    # before it (no numbering line): from 0, moved up by one; others as they are
    ([{"event": "epoch", "epoch": 0}, {"event": "layer", "epoch": 0},
      {"event": "checkpoint", "epoch": 0}, {"event": "final", "epoch": 0},
      {"event": "epoch", "epoch": True}, {"event": "epoch", "epoch": "3"},
      {"event": "epoch"}],
     [{"event": "epoch", "epoch": 1}, {"event": "layer", "epoch": 1},
      {"event": "checkpoint", "epoch": 1}, {"event": "final", "epoch": 0},
      {"event": "epoch", "epoch": True}, {"event": "epoch", "epoch": "3"},
      {"event": "epoch"}]),
    # an old run resumed by this version: each part as its numbering says
    ([{"event": "epoch", "epoch": 0}, {"event": "epoch", "epoch": 1},
      {"event": "checkpoint", "epoch": 1}, {"event": "epoch", "epoch": 2},
      NEW, {"event": "epoch", "epoch": 3}, {"event": "epoch", "epoch": 4}],
     [{"event": "epoch", "epoch": 1}, {"event": "epoch", "epoch": 2},
      {"event": "checkpoint", "epoch": 2}, {"event": "epoch", "epoch": 3},
      NEW, {"event": "epoch", "epoch": 3}, {"event": "epoch", "epoch": 4}]),
    # a numbering line whose base is no int changes nothing
    ([{"event": "numbering", "epoch_base": True}, {"event": "epoch", "epoch": 0}],
     [{"event": "numbering", "epoch_base": True}, {"event": "epoch", "epoch": 1}]),
])
def test_renumbered_counts_every_epoch_from_1(events, want):
    assert renumbered(events) == want


def test_a_run_directory_from_before_the_numbering_reads_as_one_written_now(tmp_path):
    """Epochs from 0 and no numbering line, written by hand as such runs
    wrote them: the report and the comparison see epochs 1 to 4."""
    old = load_run(make_run(tmp_path / "old", events=_events(base=0)))
    now = load_run(make_run(tmp_path / "now"))
    assert [json.dumps(e) for e in old["events"]] == [
        json.dumps(e) for e in now["events"] if e["event"] != "numbering"]
    assert [e["epoch"] for e in old["events"] if e["event"] == "epoch"] == [1, 2, 3, 4]
    assert compare.curves(old["events"]) == compare.curves(now["events"])
    assert compare.curves(old["events"])["loss"][0] == [1, 2, 3, 4]


def test_an_old_run_resumed_now_reads_as_one_numbering(tmp_path):
    """Killed after its 3rd epoch (logged as 2) with the checkpoint of epoch
    2 in force, then resumed by this version: epoch 3 logged again, now as 3."""
    before = [e for e in _events(base=0) if e["event"] == "epoch" and e["epoch"] < 3]
    after = [NEW] + [e for e in _events() if e["event"] == "epoch" and e["epoch"] >= 3]
    path = make_run(tmp_path / "run", events=before + [{"event": "checkpoint", "epoch": 1}]
                    + after)
    events = load_run(path)["events"]
    assert [(e["event"], e.get("epoch")) for e in events] == [
        ("epoch", 1), ("epoch", 2), ("epoch", 3), ("checkpoint", 2), ("numbering", None),
        ("epoch", 3), ("epoch", 4)]
    assert compare.curves(events)["loss"] == ([1, 2, 3, 4], [6.47, 6.47 / 2, 6.47 / 3,
                                                             6.47 / 4])
