"""Which of a virtual-time run's busy roles compute, and how fast (``--cores``,
``--quantum``). Pure integer arithmetic on nanoseconds of work.

* no cores given: every role has a machine of its own, and works at full
  speed whenever it is busy;
* ``--cores N``: the roles share N cores fairly and at once (processor
  sharing): while B > N roles are busy, each works at N/B of its speed;
* ``--cores N --quantum Q``: the way an operating system shares them: a busy
  role runs on a core for a slice of Q of work (its next handling goes on in
  the same slice), then, if another busy role waits for a core, goes to the
  back of the queue; a role that has nothing to do gives its core up, and
  waiting roles take free cores in the order they came.
"""
from __future__ import annotations

from collections import deque


class Cores:
    def __init__(self, cores: int = 0, quantum_ns: int = 0):
        self.cores, self.quantum = cores, quantum_ns
        self.slices: dict[int, int] = {}   # role on a core: work left in its slice
        self.waiting: deque[int] = deque()  # busy roles without a core, first come first

    @property
    def sliced(self) -> bool:
        return bool(self.cores and self.quantum)

    def _rate(self, busy: dict[int, list]) -> tuple[int, int]:
        """Work per nanosecond of each computing role, as a fraction."""
        if self.cores and not self.quantum and len(busy) > self.cores:
            return self.cores, len(busy)
        return 1, 1

    def computing(self, busy: dict[int, list]) -> list[int]:
        return sorted(self.slices) if self.sliced else sorted(busy)

    def next_ns(self, busy: dict[int, list]) -> int | None:
        """Nanoseconds until a handling or a slice ends (None: nothing computes)."""
        num, den = self._rate(busy)
        ends = [busy[p][0] for p in self.computing(busy)]
        if self.sliced:
            ends += list(self.slices.values())
        return -(-min(ends) * den // num) if ends else None

    def advance(self, busy: dict[int, list], ns: int) -> None:
        """``ns`` nanoseconds pass: the computing roles' work goes down."""
        num, den = self._rate(busy)
        done = ns * num // den
        for p in self.computing(busy):
            busy[p][0] -= done
            if self.sliced:
                self.slices[p] -= done

    def settle(self, busy: dict[int, list]) -> None:
        """After the ends and the starts of an instant: a role that became
        busy joins the queue; a role with nothing to do gives its core up; a
        slice used up goes to the back of the queue if someone waits (else a
        new slice); free cores go to the waiting, first come first."""
        if not self.sliced:
            return
        # (a handling of no work, a barrier or the end, ends without a core)
        self.waiting = deque(p for p in self.waiting if p in busy)
        for p in sorted(busy):  # roles that became busy this instant, in chain order
            if p not in self.slices and p not in self.waiting:
                self.waiting.append(p)
        for p in sorted(self.slices):
            if p not in busy:
                del self.slices[p]
            elif self.slices[p] <= 0:
                if self.waiting:
                    del self.slices[p]
                    self.waiting.append(p)
                else:
                    self.slices[p] = self.quantum
        while self.waiting and len(self.slices) < self.cores:
            self.slices[self.waiting.popleft()] = self.quantum
