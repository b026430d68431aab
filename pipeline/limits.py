"""What a run may ask of the machine, checked before anything starts: the
numbers the wire and the clock can carry, the memory it will need against
the memory there is, and the sizes a data file may declare. Estimates, on
the side of too much: a refused run says what it would have needed and
which option made it that big."""
from __future__ import annotations

import dataclasses
import os

MIB = 1 << 20
PROCESS_MIB = 64          # a worker's resident size before its arrays, with room to spare
MAX_LAYERS = 1024         # whatever the memory: a process per layer, a port or two each
MAX_CLASSES = 100_000     # the output layer's width, from a file's labels
MAX_KERNEL = 99           # a convolution's kernel side (its im2col rows are K*K*C wide)
FILES_PER_PROCESS = 2     # the supervisor's connection to each worker, with room to spare
FILES_SPARE = 64          # its own sockets, the run directory, Python's files

# The wire packs integers as 64-bit (msgpack; the data header's batch and
# step are int64). Every count that grows as a run goes on (batch ids,
# clocks, steps, versions, histogram counts) is held to MAX_COUNT: exact as a
# float (JSON readers, means), and a run would need centuries at a batch per
# microsecond to reach it, so no sum of counts leaves the wire's range.
WIRE_INT = 2 ** 63 - 1
MAX_COUNT = 2 ** 53
MAX_QUEUE = 2 ** 20       # --max-inflight, --grad-delay, --input-delay: batches held;
                          # their sum is a ZeroMQ high-water mark, a C int
MAX_BLAS_THREADS = 1024   # per worker; BLAS libraries cap at their own build limit
# (Path lengths: files.check_path, from what the file system itself says.)
# The clock: a wait is a deadline of now + S, and a straggler sleeps FACTOR
# times its compute; both stay far inside what time_t and ZeroMQ's poll
# (milliseconds in a C int: 24 days) hold.
MAX_WAIT_S = 7 * 24 * 3600.0   # --watchdog, --link-delay: a week
MAX_SLOWDOWN = 1000.0          # --slow FACTOR


def say(n: float) -> str:
    """A bound as a reader would write it: 2**53, 2**63 - 1, 1024, 604800."""
    if isinstance(n, int) and n > 1 << 16 and n & (n - 1) == 0:
        return f"2**{n.bit_length() - 1}"
    if isinstance(n, int) and n > 1 << 16 and n & (n + 1) == 0:
        return f"2**{n.bit_length()} - 1"
    if isinstance(n, float):
        return str(int(n)) if n.is_integer() and abs(n) < 1e15 else f"{n:g}"
    return str(n)


def shown(value: object) -> str:
    """A value for an error line: an integer of hundreds of digits by its size."""
    if isinstance(value, int) and value.bit_length() > 128:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _numbers(cfg):
    """(option, what, value, most) of every number of a Config: its field's
    ``most``, else the wire's 64 bits for an integer (the memory estimate
    bounds the widths further)."""
    from pipeline.config import flag
    for f in dataclasses.fields(cfg):
        value, most, option = getattr(cfg, f.name), f.metadata["most"], flag(f.name)
        if f.name in ("hidden", "sg_hidden"):
            yield from ((option, "widths ", w, WIRE_INT) for w in value)
        elif f.name in ("slow", "layer_step_ms"):
            for layer, factor in value:
                yield option, "LAYER ", layer, WIRE_INT
                yield option, "FACTOR " if f.name == "slow" else "MS ", factor, most
        elif isinstance(f.default, bool) or not isinstance(f.default, (int, float)):
            continue
        elif most is not None:
            yield option, "", value, most
        elif isinstance(f.default, int) or isinstance(value, int):  # an int where a float goes
            yield option, "", value, WIRE_INT


def check_most(cfg) -> None:
    """ConfigError where a number of ``cfg`` is beyond what the wire and the
    clock carry: checked before anything is made from it (the Config checks
    the lower bounds, then ``check_wire``)."""
    from pipeline.config import ConfigError
    for option, what, v, most in _numbers(cfg):
        if v > most:
            raise ConfigError(option, f"{what}at most {say(most)}, got {shown(v)}")


def check_wire(cfg) -> None:
    """What the Config's own lower bounds left: no integer below the wire's."""
    from pipeline.config import ConfigError
    for option, what, v, _ in _numbers(cfg):
        if v < -WIRE_INT - 1:
            raise ConfigError(option, f"{what}at least -2**63, got {shown(v)}")


def available_bytes() -> int:
    """Memory available to new processes (Linux: MemAvailable), else all of it."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: do not refuse on a guess


def batch_rows(cfg) -> int:
    """The most examples one batch holds."""
    return min(cfg.batch_size, max(cfg.examples, cfg.test_examples))


def _layer_bytes(cfg, index: int, rows: int | None = None) -> int:
    """One weight layer's arrays: weights, optimiser state, SG module, and the
    batches of ``rows`` (default: ``batch_rows``) it may hold in flight."""
    rows = batch_rows(cfg) if rows is None else rows
    d, item = cfg.dims, cfg.np_dtype.itemsize
    fan_in, fan_out = d[index - 1], d[index]
    slots = {"adam": 3, "sgd": 2 if cfg.momentum else 1}[cfg.optimizer]
    if index <= len(getattr(cfg, "conv", ())):
        return _conv_layer_bytes(cfg, index, rows, slots)
    params = (fan_in + 1) * fan_out
    if index < cfg.layers and cfg.mode in ("dni", "cdni"):
        widths = [fan_out + (d[-1] if cfg.mode == "cdni" else 0), *cfg.sg_hidden, fan_out]
        params += sum((a + 1) * b for a, b in zip(widths, widths[1:])) * (2 if cfg.sg_lookahead
                                                                           else 1)
    inflight = (cfg.grad_delay + cfg.max_inflight + 2) * rows
    cached = inflight * (fan_in + 3 * fan_out + d[-1])  # inputs, outputs, SG inputs, messages
    return (params * slots + 4 * cached) * item


def _conv_layer_bytes(cfg, index: int, rows: int, slots: int) -> int:
    """A convolutional layer (``_layer_bytes``): besides what a dense layer
    holds, the im2col rows of a step (k*k times its input, and 9 times its
    SG module's input) and the convolution's output before the pool."""
    (h, w, c_in), (ho, wo, c) = cfg.conv_shapes()[index - 1:index + 1]
    labels = cfg.dims[-1] if cfg.mode == "cdni" else 0
    k2, item = cfg.kernel * cfg.kernel, cfg.np_dtype.itemsize
    params = k2 * c_in * c + 3 * c
    sg_in = ho * wo * (c + labels)
    if cfg.mode in ("dni", "cdni"):
        params += 9 * (c + labels) * c + (1 + labels) * ho * wo * c
    inflight = (cfg.grad_delay + cfg.max_inflight + 2) * rows
    cached = inflight * (h * w * c_in + 3 * ho * wo * c + sg_in + labels)
    step = rows * (h * w * (k2 * c_in + 3 * c) + 9 * sg_in)   # im2col rows, z, its gradient
    return (params * slots + 4 * cached + 2 * step) * item


class _Resized:
    """A Config with some sizes set otherwise, for the estimate alone (no
    Config is made: the sizes need not combine into a valid one)."""

    def __init__(self, cfg, **sizes):
        self._cfg, self._sizes = cfg, sizes

    def __getattr__(self, name: str):
        return self._sizes[name] if name in self._sizes else getattr(self._cfg, name)

    @property
    def dims(self) -> list[int]:
        d = self._cfg.dims
        return [*d[:1 + len(self._cfg.conv)], *self.hidden, d[-1]]


# The sizes a run's memory grows with, each at its smallest.
SMALLEST = {"hidden": lambda cfg: (1,) * len(cfg.hidden), "sg_hidden": lambda cfg: (),
            "batch_size": lambda cfg: 1, "max_inflight": lambda cfg: 1,
            "grad_delay": lambda cfg: 0, "examples": lambda cfg: 1,
            "test_examples": lambda cfg: 0}


def blame(cfg) -> str:
    """The option that makes a run too big: the size that alone, at its
    smallest, would save the most memory."""
    from pipeline.config import flag
    need, rows = run_bytes(cfg)[0], batch_rows(cfg)
    # The data's size alone: the rows of a batch are the batch size's to answer for.
    saved = {name: need - run_bytes(_Resized(cfg, **{name: smallest(cfg)}),
                                    None if name == "batch_size" else rows)[0]
             for name, smallest in SMALLEST.items()}
    return flag(max(saved, key=saved.get))


def run_bytes(cfg, rows: int | None = None) -> tuple[int, int]:
    """(bytes, processes) a run of ``cfg`` would need on one machine, its
    batches of ``rows`` examples (default: ``batch_rows``)."""
    rows = batch_rows(cfg) if rows is None else rows
    item = cfg.np_dtype.itemsize
    data = (cfg.examples + cfg.test_examples) * (cfg.dims[0] + cfg.dims[-1]) * item
    arrays = sum(_layer_bytes(cfg, k, rows) for k in range(1, cfg.layers + 1)) + 2 * data
    processes = 1 if cfg.in_process or cfg.simulate else cfg.layers + 2  # the workers and the supervisor
    return arrays + processes * PROCESS_MIB * MIB, processes


def open_files(wanted: int) -> int:
    """The open-file limit, raised towards ``wanted`` as far as the hard limit
    lets (the supervisor holds a connection per worker)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 1 << 30  # not POSIX: nothing to check
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (OSError, ValueError):
            pass
    return 1 << 30 if soft == resource.RLIM_INFINITY else soft


def check(cfg) -> None:
    """ConfigError, before anything starts, where the run cannot fit."""
    from pipeline.config import ConfigError
    need, processes = run_bytes(cfg)
    files = FILES_PER_PROCESS * processes + FILES_SPARE
    if not (cfg.in_process or cfg.simulate) and open_files(files) < files:
        raise ConfigError("--layers", f"{processes} processes need about {files} open files; "
                                      f"this process may open {open_files(files)} (ulimit -n)")
    have = available_bytes()
    if need > have:
        many = processes * PROCESS_MIB * MIB > need / 2
        raise ConfigError("--layers" if many else blame(cfg),
                          f"a run this size needs about {need / (1 << 30):.1f} GiB "
                          f"({processes} process{'es' if processes > 1 else ''}); this machine "
                          f"has {have / (1 << 30):.1f} GiB available")
