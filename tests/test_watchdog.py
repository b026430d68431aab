"""The watchdog's rule against exact tables: when a run counts as stalled,
and which role it names."""
from __future__ import annotations

import pytest

from pipeline.coord.watchdog import Watchdog

ROLES = ["source", "layer1", "layer2", "output"]


def dog(changes: list[tuple[str, int, float]]) -> Watchdog:
    w = Watchdog(ROLES, now=0.0)
    for role, count, t in changes:
        w.heard(role, count, t)
    return w


@pytest.mark.parametrize("changes, done, now, limit, named", [
    ([], set(), 10.0, 10.0, None),                                   # exactly at the limit
    ([], set(), 10.5, 10.0, "source"),                               # nobody moved: nearest the source
    ([("source", 5, 2.0)], set(), 10.5, 10.0, None),                 # the source moved at 2
    ([("source", 5, 2.0)], set(), 12.5, 10.0, "layer1"),             # ... layer1 never took one
    ([("source", 5, 2.0), ("layer1", 3, 3.0), ("output", 1, 4.0)], set(), 14.5, 10.0, "layer2"),
    ([("source", 5, 2.0), ("layer1", 3, 3.0), ("layer2", 2, 4.0), ("output", 1, 4.0)],
     set(), 14.5, 10.0, "source"),                                    # the first to stop
    ([("source", 5, 2.0), ("source", 5, 9.0)], set(), 12.5, 10.0, "layer1"),  # same count: no move
    ([], {"source", "layer1", "layer2", "output"}, 99.0, 10.0, None),  # all done
    ([("source", 9, 50.0)], {"source"}, 40.0, 10.0, "layer1"),         # done roles do not count
    ([], set(), 99.0, 0.0, None),                                      # 0: off
    ([("nobody", 1, 50.0)], set(), 20.0, 10.0, "source"),              # unknown roles ignored
])
def test_stalled(changes, done, now, limit, named):
    assert dog(changes).stalled(done, now, limit) == named
