"""The progress watchdog's rule, pure: which role stopped a run that has
stopped moving while every process still heartbeats.

Each worker's heartbeat carries how many messages it has handled so far.
The run is stalled when no role still running has handled one for
``limit`` seconds; the role named is the one that stopped first (the
others then stopped for want of its messages), and of those that stopped
at the same moment (or never moved) the one nearest the source: the roles
below it never moved because nothing came from it.
"""
from __future__ import annotations


class Watchdog:
    """Per role: the last count heard and when it last changed."""

    def __init__(self, roles: list[str], now: float):
        self.roles = roles
        self.count = {r: 0 for r in roles}
        self.changed = {r: now for r in roles}

    def heard(self, role: str, count: int, now: float) -> None:
        if role in self.count and count != self.count[role]:
            self.count[role] = count
            self.changed[role] = now

    def stalled(self, done: set[str] | dict, now: float, limit: float) -> str | None:
        """The role that stopped first, when no running role has moved for
        ``limit`` seconds; else None. ``limit`` 0: never."""
        running = [r for r in self.roles if r not in done]
        if not limit or not running:
            return None
        if now - max(self.changed[r] for r in running) <= limit:
            return None
        first = min(self.changed[r] for r in running)
        return next(r for r in running if self.changed[r] == first)
