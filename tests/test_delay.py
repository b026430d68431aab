"""Tests for pipeline.net.delay: DelayLine release times on a fake clock (the caller passes
``now``), and straggle's idle time measured on the real one."""
from __future__ import annotations

import time

import numpy as np
import pytest

from pipeline.net.delay import DelayLine, straggle

pytestmark = pytest.mark.timeout(30)


def releases(line: DelayLine, now: float) -> list[tuple[float, object]]:
    """Drain ``line`` by jumping the fake clock to each next release, as a poll
    loop with ``wait_s`` as its timeout would: (release time, item) in order."""
    out = []
    while (wait := line.wait_s(now)) is not None:
        now += wait
        ready = line.pop_ready(now)
        if not ready:  # now + (release - now) may round one ulp short of release
            now = float(np.nextafter(now, np.inf))
            ready = line.pop_ready(now)
        assert ready, "wait_s pointed at a time when nothing was released"
        out += [(now, item) for item in ready]
    return out


def test_empty_line():
    line = DelayLine(0.5, 0.0, np.random.default_rng(0))
    assert len(line) == 0 and line.wait_s(0.0) is None and line.pop_ready(1e9) == []


def test_fixed_delay_exact_table():
    line = DelayLine(1.0, 0.0, np.random.default_rng(0))
    line.push("a", 0.0)
    line.push("b", 0.5)
    line.push("c", 0.5)
    assert len(line) == 3
    assert line.wait_s(0.0) == 1.0 and line.wait_s(0.25) == 0.75
    assert line.pop_ready(0.0) == [] and line.pop_ready(0.999) == []  # never before the delay
    assert line.pop_ready(1.0) == ["a"]
    assert line.wait_s(1.0) == 0.5
    assert line.wait_s(7.0) == 0.0  # overdue: no negative wait
    assert line.pop_ready(1.49) == []
    assert line.pop_ready(1.5) == ["b", "c"]
    assert len(line) == 0 and line.wait_s(2.0) is None


def test_interleaved_push_and_pop():
    line = DelayLine(0.25, 0.0, np.random.default_rng(0))
    line.push(0, 0.0)
    line.push(1, 0.1)
    assert line.pop_ready(0.3) == [0]
    line.push(2, 0.3)
    assert line.pop_ready(0.35) == [1]
    assert line.pop_ready(0.54) == []
    assert line.pop_ready(0.55) == [2]


def test_zero_delay_releases_at_once():
    line = DelayLine(0.0, 0.0, np.random.default_rng(0))
    line.push("x", 3.0)
    assert line.wait_s(3.0) == 0.0 and line.pop_ready(3.0) == ["x"]


def test_pop_takes_the_head_released_or_not():
    line = DelayLine(10.0, 0.0, np.random.default_rng(0))
    line.push("a", 0.0)
    line.push("b", 1.0)
    assert line.pop() == "a"
    assert len(line) == 1 and line.wait_s(0.0) == 11.0
    assert line.pop() == "b" and len(line) == 0


@pytest.mark.parametrize("delay, jitter", [(1.0, 0.5), (0.01, 0.01), (0.002, 0.001)])
def test_jitter_exact_against_the_same_draws(delay, jitter):
    # Each message is held delay + U(-jitter, jitter), never less than 0, and
    # never released before the message ahead of it.
    pushes = np.cumsum(np.random.default_rng(1).exponential(delay / 3, size=200))
    line = DelayLine(delay, jitter, np.random.default_rng(42))
    for i, t in enumerate(pushes):
        line.push(i, float(t))
    got = releases(line, 0.0)

    twin = np.random.default_rng(42)
    want, last = [], float("-inf")
    for t in pushes:
        last = max(last, t + max(0.0, delay + twin.uniform(-jitter, jitter)))
        want.append(last)
    assert [item for _, item in got] == list(range(200))  # never reordered
    np.testing.assert_allclose([r for r, _ in got], want, rtol=0, atol=1e-12)
    held = np.array([r for r, _ in got]) - pushes
    assert held.min() >= max(0.0, delay - jitter) - 1e-12
    assert held.max() <= delay + jitter + 1e-12
    # the jitter does act: some messages are held less than the delay, some more
    assert held.min() < delay < held.max()


def test_never_released_before_its_push():
    # Config keeps jitter <= delay; the line itself still never holds a message
    # for negative time.
    line = DelayLine(0.001, 0.01, np.random.default_rng(0))
    pushes = np.arange(100) * 0.05  # far apart: no message waits for the one ahead
    for i, t in enumerate(pushes):
        line.push(i, float(t))
    held = np.array([r for r, _ in releases(line, 0.0)]) - pushes
    assert held.min() >= 0.0 and (held == 0.0).sum() > 10  # many draws were below zero


def test_jitter_stretches_rather_than_reorders():
    # Two messages pushed at once: whatever their draws, the second is not released first.
    for seed in range(20):
        line = DelayLine(1.0, 1.0, np.random.default_rng(seed))
        line.push("first", 0.0)
        line.push("second", 0.0)
        got = releases(line, 0.0)
        assert [item for _, item in got] == ["first", "second"]
        assert got[0][0] <= got[1][0] <= 2.0


def test_same_seed_same_releases():
    def run(seed):
        line = DelayLine(0.5, 0.25, np.random.default_rng(seed))
        for i in range(20):
            line.push(i, i * 0.1)
        return releases(line, 0.0)

    assert run(3) == run(3)
    assert run(3) != run(4)


# --- straggle, on the real clock --------------------------------------------------------------

def test_straggle_factor_one_does_not_sleep():
    started = time.perf_counter() - 10.0  # as if the work had taken 10 s
    t0 = time.perf_counter()
    straggle(started, 1.0)
    assert time.perf_counter() - t0 < 0.005


def test_straggle_factor_three_idles_twice_the_work():
    started = time.perf_counter()
    while time.perf_counter() - started < 0.1:  # 100 ms of work
        pass
    t0 = time.perf_counter()
    straggle(started, 3.0)
    slept = time.perf_counter() - t0
    work = t0 - started
    assert slept >= 2 * work - 0.002         # sleep is at least what was asked
    # generous (a loaded machine oversleeps), but short of three times the work
    assert slept <= 2 * work + 0.06
