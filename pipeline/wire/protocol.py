"""The pipeline's vocabulary: the roles and their order, the message kinds,
and the meta fields each kind carries, as small typed builders and readers.

Every sender builds its messages here and every receiver reads them here, so
a field is named once and checked once: a reader raises ``ValueError`` on a
missing or mistyped field, which a data inbox counts and drops like any
malformed message. ``wire`` turns a ``Message`` into frames and back.

Data links (activations flow down, gradients up):

==========  ============  ============================================
kind        arrays        meta
==========  ============  ============================================
act         x, labels     (none): a training batch, ``batch`` its index
input       x, labels     (none): ``--unlock forward``: the source's copy of
                          training batch ``batch`` for a layer above the
                          first (its own inbox), to predict its input from
grad        dx            (none); ``{"lost": true}`` and no array: the
                          gradient of ``batch`` will never come
eval        x, labels     ``{"test": epoch}``: the test split after that
                          epoch; none: the final pass over the training set
checkpoint  (none)        ``{"epoch": e}``: a barrier, save after epoch e
eof         (none)        (none): the stream has ended
==========  ============  ============================================

On the wire an epoch is its index from 0 (the eval's ``test``, a barrier's
and a layer state's ``epoch``); no user reads it. What a user reads counts
from 1: the metric events' ``epoch`` (``pipeline.layers.stats``), the
checkpoint after epoch e is ``epoch-(e + 1)``.

Control link (every worker to the coordinator and back): hello, config,
ready, start, metric, checkpoint (a layer's state), done, error, heartbeat
and stop, each built and read by the functions below. ``checks`` holds the
checks a data inbox makes of what arrives.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# Every process says it is alive at least every HEARTBEAT_S; one silent for
# LIVENESS_S is taken for dead (the coordinator's, and a worker's of it).
HEARTBEAT_S = 1.0
LIVENESS_S = 5.0

# --- roles ---------------------------------------------------------------------------

COORDINATOR, SOURCE, OUTPUT = "coordinator", "source", "output"


def layer_role(index: int, layers: int) -> str:
    """Weight layer ``index`` (1-based, the output layer is ``layers``) -> its role."""
    return OUTPUT if index == layers else f"layer{index}"


def roles(layers: int) -> list[str]:
    """Every worker role of a run, in pipeline order: source, layer1, ..., output."""
    if layers < 2:
        raise ValueError(f"a run has at least 2 weight layers, not {layers}")
    return [SOURCE] + [layer_role(i, layers) for i in range(1, layers + 1)]


def all_roles(layers: int) -> list[str]:
    """Every process of a run, the coordinator first."""
    return [COORDINATOR] + roles(layers)


def upstream(index: int, layers: int) -> str:
    """Who sends weight layer ``index`` its activations."""
    return SOURCE if index == 1 else layer_role(index - 1, layers)


def downstream(index: int, layers: int) -> str:
    """Who weight layer ``index`` (or the source, 0) sends its activations to."""
    return layer_role(index + 1, layers)


def input_port(role: str) -> str:
    """The source's port (and start-message peer) of a role's input inbox."""
    return "input:" + role


def data_inboxes(index: int, layers: int, unlocked: bool) -> tuple[str, ...]:
    """The data inboxes weight layer ``index`` binds, in order of their port
    offset (a cluster file's PORT, PORT+1, ...); ``unlocked``: it steps on
    synthetic inputs (``Config.unlocks``)."""
    hidden = ("act", "grad") if index < layers else ("act",)
    return hidden + (("input",) if unlocked else ())


# --- kinds ---------------------------------------------------------------------------

HELLO = "hello"
CONFIG = "config"
READY = "ready"
START = "start"
ACT = "act"
INPUT = "input"
GRAD = "grad"
EVAL = "eval"
EOF = "eof"
METRIC = "metric"
DONE = "done"
ERROR = "error"
STOPPED = "stopped"  # a worker stopped from outside the run (a signal), not by the coordinator
STOP = "stop"
HEARTBEAT = "heartbeat"
CHECKPOINT = "checkpoint"
KINDS = frozenset({HELLO, CONFIG, READY, START, ACT, INPUT, GRAD, EVAL, EOF, CHECKPOINT,
                   METRIC, DONE, ERROR, STOPPED, STOP, HEARTBEAT})


# eq=False: field-wise == on ndarray fields is ambiguous, and a dict field is unhashable.
# slots, not frozen: a message is made per hop, and a frozen one costs three times as much.
@dataclass(eq=False, slots=True)
class Message:
    """One message. Decoded arrays are read-only views that keep their frame alive."""
    kind: str
    run_id: str
    batch: int = -1  # batch id, -1 = none
    sender: str = ""  # role name, e.g. "layer1"
    step: int = 0  # sender's local update count
    arrays: tuple[np.ndarray, ...] = ()
    meta: dict = field(default_factory=dict)  # msgpack-able, str keys; tuples come back as lists


def is_int(value: object) -> bool:
    """An int that is not a bool (bool is an int subclass): the one check of an
    integer that came from outside (the wire, a config file)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_count(value: object) -> bool:
    """An int that is not a bool, at least 0: a batch, an epoch, a count."""
    return is_int(value) and value >= 0


def _need(msg: Message, key: str, ok, what: str):
    value = msg.meta.get(key)
    if key not in msg.meta or not ok(value):
        raise ValueError(f"{msg.kind} from {msg.sender!r} needs {key!r} as {what}, "
                         f"got {value!r}")
    return value


@dataclass(frozen=True)
class Speaker:
    """Builds the messages one role of one run sends."""
    run_id: str
    role: str

    def _msg(self, kind: str, batch: int = -1, step: int = 0, arrays: tuple = (),
             meta: dict | None = None) -> Message:
        return Message(kind, self.run_id, batch, self.role, step, arrays, meta or {})

    # data links
    def act(self, batch: int, step: int, x: np.ndarray, y: np.ndarray) -> Message:
        return self._msg(ACT, batch, step, (x, y))

    def input(self, batch: int, x: np.ndarray, y: np.ndarray) -> Message:
        """The source's copy of a training batch for an unlocked layer."""
        return self._msg(INPUT, batch, 0, (x, y))

    def grad(self, batch: int, step: int, dx: np.ndarray) -> Message:
        return self._msg(GRAD, batch, step, (dx,))

    def lost(self, batch: int, step: int) -> Message:
        """The gradient of ``batch`` will never come (dropped further down)."""
        return self._msg(GRAD, batch, step, (), {"lost": True})

    def evaluation(self, batch: int, step: int, x: np.ndarray, y: np.ndarray,
                   test_epoch: int | None) -> Message:
        return self._msg(EVAL, batch, step, (x, y),
                         {} if test_epoch is None else {"test": test_epoch})

    def barrier(self, batch: int, epoch: int) -> Message:
        return self._msg(CHECKPOINT, batch, meta={"epoch": epoch})

    def eof(self, batch: int) -> Message:
        return self._msg(EOF, batch)

    # control link
    def hello(self, token: str = "") -> Message:
        """``token``: the secret a local supervisor gave the processes it
        started, which proves membership of the run before any config is sent."""
        return self._msg(HELLO, meta={"token": token} if token else None)

    def config(self, config: dict, resume: tuple[dict, dict] | None = None) -> Message:
        meta: dict = {"config": config, "run_id": self.run_id}
        arrays: tuple = ()
        if resume is not None:
            state, weights = resume
            meta.update(state=state, weights=list(weights))
            arrays = tuple(weights.values())
        return self._msg(CONFIG, arrays=arrays, meta=meta)

    def ready(self, endpoints: dict[str, str]) -> Message:
        return self._msg(READY, meta={"endpoints": endpoints})

    def start(self, peers: dict[str, list[str]]) -> Message:
        return self._msg(START, meta={"peers": peers})

    def metric(self, event: dict) -> Message:
        return self._msg(METRIC, meta=event)

    def state(self, epoch: int, state: dict, arrays: dict[str, np.ndarray]) -> Message:
        """A layer's checkpoint after ``epoch``, for the coordinator to write."""
        return self._msg(CHECKPOINT, meta={"epoch": epoch, "state": state,
                                           "weights": list(arrays)},
                         arrays=tuple(arrays.values()))

    def done(self, counters: dict, decode_errors: int, peak_rss_mb: float, cpu_s: float,
             weights: dict[str, np.ndarray]) -> Message:
        return self._msg(DONE, meta={"counters": counters, "decode_errors": decode_errors,
                                     "peak_rss_mb": peak_rss_mb, "cpu_s": cpu_s,
                                     "weights": list(weights)},
                         arrays=tuple(weights.values()))

    def error(self, text: str, traceback: str) -> Message:
        return self._msg(ERROR, meta={"error": text, "traceback": traceback})

    def stopped(self, why: str) -> Message:
        return self._msg(STOPPED, meta={"why": why})

    def heartbeat(self, progress: int = 0) -> Message:
        """``progress``: messages the sender has handled so far (the watchdog's)."""
        return self._msg(HEARTBEAT, step=progress)

    def stop(self, report: bool = False) -> Message:
        """``report``: each layer sends its weights as they are (a DONE)
        before it stops, for a run that cannot go on (its disk is full)."""
        return self._msg(STOP, meta={"report": True} if report else None)


# --- readers ----------------------------------------------------------------------------

def is_lost(msg: Message) -> bool:
    return msg.meta.get("lost") is True


def test_epoch(msg: Message) -> int | None:
    """The epoch an eval message's test batch follows; None for the final pass."""
    if "test" not in msg.meta:
        return None
    return _need(msg, "test", is_count, "an epoch number")


def epoch(msg: Message) -> int:
    """The epoch of a checkpoint barrier or of a layer's checkpoint state."""
    return _need(msg, "epoch", is_count, "an epoch number")


def named_arrays(msg: Message) -> dict[str, np.ndarray]:
    """The arrays of a config, checkpoint or done message, by the names in 'weights'."""
    names = _need(msg, "weights", lambda v: isinstance(v, list)
                  and all(isinstance(n, str) for n in v) and len(v) == len(msg.arrays),
                  f"a list of {len(msg.arrays)} array names")
    return dict(zip(names, msg.arrays))


def state(msg: Message) -> dict:
    return _need(msg, "state", lambda v: isinstance(v, dict), "a map")


def config(msg: Message) -> tuple[dict, str, tuple[dict, dict] | None]:
    """(config dict, run id, (state, weights) of a resumed run or None)."""
    cfg = _need(msg, "config", lambda v: isinstance(v, dict), "a map")
    run_id = _need(msg, "run_id", lambda v: isinstance(v, str) and v, "a run id")
    resume = (state(msg), named_arrays(msg)) if "state" in msg.meta else None
    return cfg, run_id, resume


def endpoints(msg: Message) -> dict[str, str]:
    return _need(msg, "endpoints", lambda v: isinstance(v, dict)
                 and all(isinstance(e, str) for e in v.values()), "a map of endpoints")


def peers(msg: Message) -> dict[str, list[str]]:
    """start: where to connect: {"downstream": [endpoint, role], "upstream_grad": [...]}."""
    return _need(msg, "peers", lambda v: isinstance(v, dict) and all(
        isinstance(p, list) and len(p) == 2 and all(isinstance(s, str) for s in p)
        for p in v.values()), "a map of [endpoint, role] pairs")


def event(msg: Message) -> dict:
    """A metric message's event: its meta, with the kind of event named."""
    _need(msg, "event", lambda v: isinstance(v, str), "an event name")
    return dict(msg.meta)


def token(msg: Message) -> str:
    """A hello's proof of membership ("" when it carries none)."""
    value = msg.meta.get("token", "")
    return value if isinstance(value, str) else ""


def error_text(msg: Message) -> str:
    value = msg.meta.get("error")
    return value if isinstance(value, str) else "unknown error"


def stopped_why(msg: Message) -> str:
    """What stopped a worker from outside the run, at most 200 characters."""
    value = msg.meta.get("why")
    return value[:200] if isinstance(value, str) else "unknown"


def stop_report(msg: Message) -> bool:
    """Whether a stop asks for the layer's weights first."""
    return msg.meta.get("report") is True


def done(msg: Message) -> tuple[dict, int, dict[str, np.ndarray]]:
    """(counters, decode errors, weights) of a role's last report."""
    counters = _need(msg, "counters", lambda v: isinstance(v, dict), "a map")
    errors = _need(msg, "decode_errors", is_count, "a count")
    return counters, errors, named_arrays(msg)
