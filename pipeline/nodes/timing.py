"""The timing model of a virtual-time run (``--simulate``): how long each
role takes over each message, and how long each message takes on its link.
Pure: numbers in, times out, in whole nanoseconds (so that equal times are
equal, and the scheduler's tie rule decides); the draws come from their own
seeded streams.

A role's *step* S is its time for one training batch, forward and gradient
together (``--step-ms``, ``--layer-step-ms``; ``--slow`` multiplies it). A
hidden layer spends it in two handlings, split as its mode works: the SG
modes do most of their work when the activation comes (forward, synthetic
gradient, dx, update: 2/3 of S) and train the SG module when the true
gradient comes (1/3); the backprop modes only forward when the activation
comes (1/3) and do backward and update with the gradient (2/3). An unlocked
layer's synthetic step costs what a forward handling does. The output layer
does its whole step on the activation. An evaluation batch is a forward pass,
1/3 of S; a checkpoint barrier and the end of the stream cost nothing. The
source's step (layer 0, default 0) is its time to send a batch.

``--step-jitter S`` spreads every handling's time as a lognormal with that
sigma and its mean at the modelled time. ``--timing-from RUN_DIR`` replaces
the modelled handling times and spreads by what a real run measured
(``measured``).

A link delays a message by ``--link-delay`` (gradient links; activation
links too with ``--delay-activations``; ``+-jitter`` uniform) after the
message has crossed it at ``--bandwidth`` megabytes per second; a link keeps
order, as TCP does: no message arrives before the one sent ahead of it. The
delay starts at the send, as a network's does; with ``--emulated-links``,
when the receiving role reads the message from its socket (between two
handlings), as this tool's own emulation of a slow link does
(``pipeline.net.delay``).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.config import SG_MODES, Config
from pipeline.wire.protocol import ACT, CHECKPOINT, EOF, EVAL, GRAD, INPUT, Message

FORWARD = 1 / 3  # the share of a step that one forward pass takes
HEADER_BYTES = 64  # a message's bytes beside its arrays, on a link with a bandwidth
_STREAM = 0x5113  # the timing draws' streams: [timing seed, this, role, purpose]
STEP, GRAD_LINK, ACT_LINK = 0, 1, 2


def split(cfg: Config, position: int, step_s: float) -> dict[str, float]:
    """The seconds a role at ``position`` (0 the source, 1..N-1 hidden,
    N the output layer) spends on each kind of message, for a step of
    ``step_s``."""
    if position == 0:
        return {ACT: step_s, EVAL: step_s}
    forward = FORWARD * step_s
    if position == cfg.layers:
        return {ACT: step_s, INPUT: forward, EVAL: forward}
    on_act = (1 - FORWARD) * step_s if cfg.mode in SG_MODES else forward
    return {ACT: on_act, INPUT: on_act, GRAD: step_s - on_act, EVAL: forward}


Measured = dict[int, dict[str, tuple[float, float]]]  # index: kind: (seconds, sigma)


def measured(run_dir: str | Path) -> Measured:
    """What a real run measured, by layer index: for each kind of message,
    the mean seconds of a handling and the sigma of a lognormal with the
    measured spread. The seconds are the handling's CPU time, scaled so that
    they add up to the worker's whole CPU time (the pump's own work, its
    polls, reads and sends, shared out in proportion); the source (index 0)
    gets its CPU time over the batches it sent. ValueError in one line where
    the run directory has none."""
    path = Path(run_dir) / "summary.json"
    try:
        summary = json.loads(path.read_text())
        cpu = summary.get("cpu_s") or {}
        out: Measured = {}
        for L in summary["layers"]:
            h = {k: v for k, v in L["handling"].items() if k in (ACT, INPUT, GRAD, EVAL)}
            handled = sum(v["count"] * v["cpu_ms"] for v in h.values()) / 1000
            scale = cpu[L["role"]] / handled if cpu.get(L["role"]) and handled > 0 else 1.0
            out[int(L["index"])] = {k: (v["cpu_ms"] / 1000 * scale, _sigma(v)) for k, v in h.items()}
        source, batches = cpu.get("source"), summary.get("batches")
        if out and source and batches:
            out[0] = {ACT: (float(source) / batches, 0.0)}
    except FileNotFoundError:
        raise ValueError(f"--timing-from: no summary.json in {run_dir}") from None
    except (ValueError, KeyError, TypeError, AttributeError, ZeroDivisionError):
        raise ValueError(f"--timing-from: {path} holds no handling times (a real run of this "
                         f"version writes them: handling in each layer's entry)") from None
    if not out:
        raise ValueError(f"--timing-from: {path} lists no layer")
    return out


def _sigma(v: dict) -> float:
    """The lognormal sigma whose coefficient of variation is the measured one."""
    mean, sd = float(v["cpu_ms"]), float(v["cpu_sd_ms"])
    return math.sqrt(math.log1p((sd / mean) ** 2)) if mean > 0 else 0.0


@dataclass
class _Link:
    """One link's state: when its wire is free, when its last message arrives."""
    rng: np.random.Generator
    free: int = 0
    last: int = -1


@dataclass
class Timing:
    """The run's model: ``steps[p][kind]`` seconds of work for role ``p``,
    ``sigmas[p][kind]`` the lognormal spread of each handling around it, and
    ``slow[p]`` its straggler factor (its idling after each handling);
    the links' delay, jitter and bandwidth; the seed of the draws. What it
    returns is in nanoseconds."""
    steps: list[dict[str, float]]
    sigmas: list[dict[str, float]] = field(default_factory=list)
    delay_s: float = 0.0
    jitter_s: float = 0.0
    act_links: bool = False          # --delay-activations
    bytes_per_s: float = 0.0         # 0: no limit
    seed: int = 1
    slow: list[float] = field(default_factory=list)  # --slow's factor by role
    at_receiver: bool = False        # --emulated-links: the delay starts when read
    _rngs: dict = field(default_factory=dict, repr=False)
    _links: dict = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, cfg: Config, measured_s: Measured | None = None) -> "Timing":
        """The model ``cfg`` asks for (``measured_s``: ``measured``'s, which
        replace the modelled handling times and spreads of the kinds they name)."""
        per = dict(cfg.layer_step_ms)
        steps, sigmas = [], []
        for p in range(cfg.layers + 1):
            ms = per.get(p, 0.0 if p == 0 else cfg.step_ms)
            times = split(cfg, p, ms / 1000)
            spread = {k: cfg.step_jitter for k in times}
            for kind, (seconds, sigma) in (measured_s or {}).get(p, {}).items():
                times[kind], spread[kind] = seconds, sigma
            steps.append(times)
            sigmas.append(spread)
        slow = [cfg.slowdown(p) if p else 1.0 for p in range(cfg.layers + 1)]
        return cls(steps, sigmas, cfg.link_delay_ms / 1000, cfg.link_jitter_ms / 1000,
                   cfg.delay_activations, cfg.bandwidth * 1e6, cfg.timing_seed, slow,
                   cfg.emulated_links)

    def _rng(self, position: int, purpose: int) -> np.random.Generator:
        key = (position, purpose)
        if key not in self._rngs:
            self._rngs[key] = np.random.default_rng([self.seed, _STREAM, position, purpose])
        return self._rngs[key]

    def handling_ns(self, position: int, kind: str) -> int:
        """How long role ``position`` takes over a message of ``kind`` (one draw
        of its spread per handling that takes time)."""
        s = self.steps[position].get(kind, 0.0) if kind not in (CHECKPOINT, EOF) else 0.0
        sigma = self.sigmas[position].get(kind, 0.0) if self.sigmas else 0.0
        if s > 0 and sigma > 0:  # lognormal with its mean at s
            s *= math.exp(self._rng(position, STEP).normal(-sigma * sigma / 2, sigma))
        return _ns(s)

    def idle_ns(self, position: int, took_ns: int) -> int:
        """A straggler's (``--slow``) idling after a handling that took
        ``took_ns`` from its start (waits for a core included): (factor - 1)
        times that, time that needs no core, as the real straggler sleeps it
        (``pipeline.net.delay.straggle``); its sends leave after it."""
        factor = self.slow[position] if self.slow else 1.0
        return round(took_ns * (factor - 1.0))

    def delayed(self, box: str) -> bool:
        """Does ``--link-delay`` hold messages to an inbox ``box``?"""
        return self.delay_s > 0 and (box == "grad" or (box == "act" and self.act_links))

    def _link(self, to: int, box: str) -> _Link:
        link = self._links.get((to, box))
        if link is None:
            purpose = GRAD_LINK if box == "grad" else ACT_LINK
            link = self._links[(to, box)] = _Link(self._rng(to, purpose))
        return link

    def arrival_ns(self, sent: int, to: int, box: str, msg: Message) -> int:
        """When a message released at ``sent`` reaches role ``to``'s inbox
        ``box`` ("act", "grad" or "input"); with ``at_receiver``, when it
        reaches the receiver's socket, the delay still to come (``held_ns``)."""
        link = self._link(to, box)
        start = max(sent, link.free)
        if self.bytes_per_s > 0:
            size = HEADER_BYTES + sum(a.nbytes for a in msg.arrays)
            link.free = start + _ns(size / self.bytes_per_s)
        else:
            link.free = start
        if self.at_receiver and self.delayed(box):
            return link.free
        return self.held_ns(link.free, to, box)

    def held_ns(self, start: int, to: int, box: str) -> int:
        """The link's delay, from ``start``: when the message reaches the
        inbox, never before the one ahead of it."""
        link = self._link(to, box)
        delay = 0.0
        if self.delayed(box):
            delay = self.delay_s
            if self.jitter_s > 0:
                delay = max(0.0, delay + link.rng.uniform(-self.jitter_s, self.jitter_s))
        link.last = max(link.last, start + _ns(delay))
        return link.last


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)
