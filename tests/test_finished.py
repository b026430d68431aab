"""Tests for pipeline.run.finished: a finished run's directory read back,
its damage named by file."""
from __future__ import annotations

import pytest

from pipeline.run.finished import load_run
from tests.test_report import SUMMARY, make_run

pytestmark = pytest.mark.timeout(30)


def test_load_run_reads_every_file_and_skips_the_corrupt_line(tmp_path):
    run = load_run(make_run(tmp_path / "run"))
    assert run["summary"] == SUMMARY
    assert run["config"]["config"]["layers"] == 3
    assert len(run["events"]) == 4 * 3 + 2
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
