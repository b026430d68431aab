"""The binary layouts of a data message (every act, input and grad: arrays
and no meta), the fast way through ``codec``: a header of fixed layout, and
for small messages one packed frame. Frame layouts: ``codec``'s docstring.

Everything before a binary header's last 16 bytes (batch, step) is the same
from batch to batch of one link: the sender packs it once and the receiver
checks it once (each keeps up to _CACHED of them)."""
from __future__ import annotations

import math
import struct

import numpy as np

from pipeline.wire.protocol import Message

PROTOCOL_VERSION = 2  # 2: data messages have a binary header
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 4

# Wire dtype strings (numpy ``dtype.str``, always little-endian), in the
# order of their codes in the binary header; and each one's dtype.
DTYPE_CODES = ("<f8", "<f4", "<i8", "<i4", "|u1")
ALLOWED_DTYPES: dict[str, np.dtype] = {s: np.dtype(s) for s in DTYPE_CODES}

DATA_MAGIC = b"DNI"
KIND_CODES = ("hello", "config", "ready", "start", "act", "input", "grad", "eval", "eof",
              "metric", "done", "error", "stopped", "stop", "heartbeat", "checkpoint")
_KIND_CODE = {k: i for i, k in enumerate(KIND_CODES)}
_DTYPE_CODE = {d: i for i, d in enumerate(DTYPE_CODES)}
_FIXED = struct.Struct("<3sBBBBB")     # magic, version, kind, n arrays, len(run id), len(sender)
_SPEC = struct.Struct("<BB")           # dtype, ndim
_DIM = struct.Struct("<q")
_TAIL = struct.Struct("<qq")           # batch, step
_INT64 = 1 << 63
_CACHED = 256
# A data message of at most PACK_BYTES of arrays goes as one frame: the
# packed magic, the header's length, the header after its magic, then each
# array at the next multiple of 8 bytes from the frame's start (zero padding).
# One frame costs pyzmq and ZeroMQ less than three, more than the copy up to
# about this size (the copy is the part that grows; docs/performance.md, "The
# wire", has the measurement).
PACKED_MAGIC = b"DNP"
PACK_BYTES = 128 * 1024
_LEN = struct.Struct("<H")
_ALIGN = 8
_prefixes: dict[tuple, tuple] = {}     # sender: (kind, run, sender, specs) -> (prefix, pads)
_parsed: dict[bytes, tuple] = {}       # receiver: prefix -> (kind, run, sender, specs)
_layouts: dict[bytes, tuple] = {}      # receiver: packed start -> (kind, run, sender, arrays, size)


def encode_data(msg: Message) -> list | None:
    """The frames of a message without meta whose arrays are all in wire
    form, or None to take the general way (which also says what is wrong)."""
    b, t = msg.batch, msg.step
    if not (type(b) is int and -1 <= b < _INT64 and type(t) is int and 0 <= t < _INT64
            and type(msg.run_id) is str and type(msg.sender) is str):
        return None  # (before the cache key: a field of another type may not hash)
    specs = []
    for a in msg.arrays:
        if not (type(a) is np.ndarray and a.flags.c_contiguous and a.ndim <= MAX_NDIM):
            return None
        dtype = a.dtype.str
        if dtype not in _DTYPE_CODE:
            return None
        specs.append((dtype, a.shape))
    key = (msg.kind, msg.run_id, msg.sender, *specs)
    plan = _prefixes.get(key)
    if plan is None:
        plan = _plan(msg.kind, msg.run_id, msg.sender, specs)
        _remember(_prefixes, key, plan)
    prefix, pads = plan
    if not prefix:
        return None  # fields the binary header cannot hold
    if pads is None:
        return [prefix + _TAIL.pack(b, t), *msg.arrays]
    parts = [prefix, _TAIL.pack(b, t)]
    for pad, a in zip(pads, msg.arrays):
        parts += (pad, a)
    return [b"".join(parts)]


def _plan(kind: str, run_id: str, sender: str, specs: list) -> tuple[bytes, tuple | None]:
    """(the header's fixed part, None) for a message of several frames;
    (the packed frame's start, each array's padding) for one packed frame."""
    prefix = _pack_prefix(kind, run_id, sender, specs)
    sizes = [math.prod(shape) * ALLOWED_DTYPES[dtype].itemsize for dtype, shape in specs]
    if not prefix or sum(sizes) > PACK_BYTES:
        return prefix, None
    rest = prefix[len(DATA_MAGIC):]  # the packed frame repeats the header after its magic
    start = PACKED_MAGIC + _LEN.pack(len(rest) + _TAIL.size) + rest
    at, pads = len(start) + _TAIL.size, []
    for size in sizes:
        pads.append(bytes(-at % _ALIGN))
        at += len(pads[-1]) + size
    return start, tuple(pads)


def _pack_prefix(kind: str, run_id: str, sender: str, specs: list) -> bytes:
    """The binary header but its batch and step; b"" if these fields need the general way."""
    try:
        run, who = run_id.encode(), sender.encode()
    except UnicodeEncodeError:  # a lone surrogate: msgpack's error names it
        return b""
    if kind not in _KIND_CODE or len(specs) > 255 or len(run) > 255 or len(who) > 255:
        return b""
    parts = [_FIXED.pack(DATA_MAGIC, PROTOCOL_VERSION, _KIND_CODE[kind], len(specs),
                         len(run), len(who)), run, who]
    for dtype, shape in specs:
        parts.append(_SPEC.pack(_DTYPE_CODE[dtype], len(shape)))
        parts.extend(_DIM.pack(d) for d in shape)
    prefix = b"".join(parts)
    return prefix if len(prefix) + _TAIL.size <= MAX_HEADER_BYTES else b""


def _parse_prefix(prefix: bytes) -> tuple:
    """(kind, run id, sender, ((dtype, shape, bytes), ...)) of a binary
    header's fixed part; ValueError saying what is wrong with it."""
    if len(prefix) < _FIXED.size:
        raise ValueError(f"binary header is {len(prefix) + _TAIL.size} bytes, "
                         f"too short for its fixed fields")
    _, version, kind, n, r, s = _FIXED.unpack_from(prefix)
    if version != PROTOCOL_VERSION:
        raise ValueError(f"protocol version mismatch: message has v={version}, "
                         f"this side speaks v={PROTOCOL_VERSION}")
    if kind >= len(KIND_CODES):
        raise ValueError(f"unknown message kind code {kind}")
    at = _FIXED.size + r + s
    if at > len(prefix):
        raise ValueError("binary header ends inside its run id or sender")
    try:
        run_id = prefix[_FIXED.size:_FIXED.size + r].decode()
        sender = prefix[_FIXED.size + r:at].decode()
    except UnicodeDecodeError as e:
        raise ValueError(f"run id or sender is not UTF-8: {e}") from e
    specs = []
    for i in range(n):
        if at + _SPEC.size > len(prefix):
            raise ValueError(f"binary header ends inside array spec {i}")
        code, ndim = _SPEC.unpack_from(prefix, at)
        at += _SPEC.size
        if code >= len(DTYPE_CODES):
            raise ValueError(f"array {i} has unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise ValueError(f"array {i} has {ndim} dims, more than {MAX_NDIM}")
        if at + ndim * _DIM.size > len(prefix):
            raise ValueError(f"binary header ends inside array spec {i}")
        shape = struct.unpack_from(f"<{ndim}q", prefix, at)
        at += ndim * _DIM.size
        if any(d < 0 for d in shape):
            raise ValueError(f"array {i} has a negative dim in shape {list(shape)}")
        dtype = ALLOWED_DTYPES[DTYPE_CODES[code]]
        specs.append((dtype, shape, math.prod(shape) * dtype.itemsize))
    if at != len(prefix):
        raise ValueError(f"binary header has {len(prefix) - at} bytes after its array specs")
    return KIND_CODES[kind], run_id, sender, tuple(specs)


def decode_data(head: memoryview) -> tuple:
    """(kind, run id, sender, specs, batch, step) of a binary header."""
    if head.nbytes > MAX_HEADER_BYTES:
        raise ValueError(f"header is {head.nbytes} bytes, more than MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    cut = head.nbytes - _TAIL.size
    if cut < 0:
        raise ValueError(f"binary header is {head.nbytes} bytes, too short for its fixed fields")
    prefix = bytes(head[:cut])
    fields = _parsed.get(prefix)
    if fields is None:
        fields = _parse_prefix(prefix)  # raises: nothing unchecked is kept
        _remember(_parsed, prefix, fields)
    batch, step = _batch_step(head, cut)
    return (*fields, batch, step)


def _remember(cache: dict, key: bytes, value: tuple) -> None:
    if len(cache) >= _CACHED:
        cache.clear()
    cache[key] = value


def _batch_step(buf: memoryview, at: int) -> tuple[int, int]:
    batch, step = _TAIL.unpack_from(buf, at)
    if batch < -1 or step < 0:
        raise ValueError(f"batch ('b') must be an int >= -1 and step ('t') >= 0, "
                         f"got {batch} and {step}")
    return batch, step


def decode_packed(frame: memoryview, frames: int) -> tuple:
    """(kind, run id, sender, batch, step, arrays) of a packed message (a
    read-only view). Everything before its batch and step is looked up in
    the cache: the fields and where each array starts."""
    if frames != 1:
        raise ValueError(f"a packed data message is one frame, got {frames}")
    n = frame.nbytes
    if n < len(PACKED_MAGIC) + _LEN.size:
        raise ValueError(f"packed message is {n} bytes, too short for its header")
    (size,) = _LEN.unpack_from(frame, len(PACKED_MAGIC))
    at = len(PACKED_MAGIC) + _LEN.size + size
    if at > n:
        raise ValueError(f"packed message is {n} bytes, its header alone needs {at}")
    cut = at - _TAIL.size
    key = bytes(frame[:cut]) if cut >= len(PACKED_MAGIC) + _LEN.size else b""
    layout = _layouts.get(key)
    if layout is None:  # raises, if the header is short too
        kind, run, sender, specs, _, _ = decode_data(memoryview(DATA_MAGIC + frame[at - size:at]))
        arrays = []
        for dtype, shape, nbytes in specs:
            at += -at % _ALIGN
            arrays.append((dtype, shape, at))
            at += nbytes
        layout = (kind, run, sender, tuple(arrays), at)
        _remember(_layouts, key, layout)
    kind, run, sender, arrays, end = layout
    if end != n:
        raise ValueError(f"packed message is {n} bytes, but its header and arrays take {end}")
    batch, step = _batch_step(frame, cut)
    try:  # one comprehension, not a call per array: this runs for every small message
        built = tuple([np.ndarray(shape, dtype, frame, start) for dtype, shape, start in arrays])
    except (ValueError, OverflowError, TypeError):
        built = tuple(array_at(dtype, shape, frame, start, i)  # raises, saying which array
                      for i, (dtype, shape, start) in enumerate(arrays))
    return kind, run, sender, batch, step, built


def array_at(dtype: np.dtype, shape: tuple, buf: memoryview, start: int, i: int) -> np.ndarray:
    try:
        return np.ndarray(shape, dtype, buf, start)
    except (ValueError, OverflowError, TypeError) as e:  # e.g. a zero-size shape, absurd dim
        raise ValueError(f"array {i} shape {list(shape)} is not representable: {e}") from e


