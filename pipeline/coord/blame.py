"""Whom a run under an engine blames when ranks go: from when each rank's
connection to the coordinator closed and which ranks said they were stopped
from outside, as pure functions (tests/test_engines.py has their table).

When a rank dies the engine ends the others, and when a whole host goes its
processes die in any order. A rank the engine ends says so first
(``stopped``, as every worker stopped by a signal does); a connection that
closes without that word is a death."""
from __future__ import annotations

# A rank's connection that closes without a word is taken for its death only
# if no signal from the engine follows within this long (a Ctrl-C on mpiexec
# reaches every rank, and each says it was stopped).
SIGNAL_GRACE_S = 0.1
# A rank that said it was stopped from outside is named only if no silent
# death shows within this long (see blame).
STOPPED_GRACE_S = 1.0


def first_silent(closed: dict[str, float], stopped: dict[str, str]) -> str | None:
    """The first role whose connection closed without saying it was stopped."""
    silent = [(t, role) for role, t in closed.items() if role not in stopped]
    return min(silent)[1] if silent else None


def blame(closed: dict[str, float], stopped: dict[str, str], now: float,
          explained: set[str] = frozenset()) -> str | None:
    """The role whose loss a closed connection shows, from when each role's
    connection closed (``closed``) and which of them said they were stopped
    from outside (``stopped``), or None: none yet. The first silent closure,
    SIGNAL_GRACE_S after it (a signal to us may yet show it was a Ctrl-C).
    With none, the first rank stopped from outside, STOPPED_GRACE_S after the
    first closure (a silent death may yet show meanwhile), leaving out those
    whose stop we can explain otherwise (``explained``: our own engine
    process went, and so did this host's ranks) while there are others: the
    ranks of a host whose engine daemon died are stopped by the kernel
    (their parent died), and the engine, learning of it, ends the job."""
    first = first_silent(closed, stopped)
    if first is not None:
        return first if now - closed[first] >= SIGNAL_GRACE_S else None
    if not closed or now - min(closed.values()) < STOPPED_GRACE_S:
        return None
    unexplained = [(t, role) for role, t in closed.items() if role not in explained]
    return min(unexplained or [(t, role) for role, t in closed.items()])[1]
