"""``launch.py --simulate`` as a user runs it: the same weights bit for bit
with the machine busy or quiet, and the handling times a real run records
taken up by ``--timing-from``."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import run_launch

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]

SIM = ["--simulate", "--epochs", "60", "--step-ms", "2", "--layer-step-ms", "2:5",
       "--link-delay", "3:2", "--step-jitter", "0.3", "--quiet"]


def _weights(run_dir: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted((run_dir / "weights").glob("*.npz")):
        with np.load(f) as z:
            out.update({f"{f.stem}/{k}": z[k] for k in z.files})
    return out


def test_a_virtual_run_is_bit_for_bit_the_same_on_a_busy_machine(tmp_path):
    quiet = run_launch(*SIM, "--run-dir", str(tmp_path / "quiet"))
    assert quiet.returncode == 0, quiet.stderr
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded = run_launch(*SIM, "--run-dir", str(tmp_path / "busy"), timeout=180)
    finally:
        for p in busy:
            p.kill()
            p.wait(10)
    assert loaded.returncode == 0, loaded.stderr
    a, b = _weights(tmp_path / "quiet"), _weights(tmp_path / "busy")
    assert a.keys() == b.keys() and len(a) >= 6
    assert all(np.array_equal(a[k], b[k]) for k in a)
    sa, sb = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("quiet", "busy"))
    assert sa["virtual_s"] == sb["virtual_s"] and sa["simulate"]
    assert [L["staleness_steps"] for L in sa["layers"]] == [L["staleness_steps"]
                                                            for L in sb["layers"]]


def test_a_real_run_records_its_handling_times_and_a_virtual_run_takes_them(tmp_path):
    real = run_launch("--epochs", "40", "--quiet", "--run-dir", str(tmp_path / "real"))
    assert real.returncode == 0, real.stderr
    layers = json.loads((tmp_path / "real" / "summary.json").read_text())["layers"]
    for L in layers:
        act = L["handling"]["act"]
        assert act["count"] == 400 and 0 < act["cpu_ms"] and 0 < act["wall_ms"], L
        assert ("grad" in L["handling"]) == (L["role"] != "output"), L
    sim = run_launch("--simulate", "--timing-from", str(tmp_path / "real"), "--epochs", "40",
                     "--run-dir", str(tmp_path / "sim"))
    assert sim.returncode == 0, sim.stderr
    assert "(virtual time)" in sim.stdout and "s virtual" in sim.stdout
    s = json.loads((tmp_path / "sim" / "summary.json").read_text())
    assert s["status"] == "completed" and s["virtual_s"] > 0
    # 400 batches, each through the output layer at its measured CPU time at least
    assert s["virtual_s"] >= 400 * layers[-1]["handling"]["act"]["cpu_ms"] / 1000 * 0.999
    bad = run_launch("--simulate", "--timing-from", str(tmp_path), "--epochs", "2")
    assert bad.returncode != 0 and "--timing-from: no summary.json" in bad.stderr
