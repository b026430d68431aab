"""The wire format: ``encode(msg) -> frames`` and ``decode(frames) -> msg``, pure and socket-free.

Frame layout of one message (a ZeroMQ multipart message)::

    frame 0      the header: a data message without meta (every act, input
                 and grad) has the binary header below; any other message a
                 msgpack map of at most MAX_HEADER_BYTES with exactly these keys:
                   v  int        PROTOCOL_VERSION
                   k  str        message kind, one of protocol.KINDS
                   r  str        run id (lets a worker drop frames of another run)
                   b  int        batch id, -1 = none
                   s  str        sender role, e.g. "layer1"
                   t  int        sender's local update count, >= 0
                   a  list       one [dtype_str, shape] per array, e.g. ["<f8", [32, 16]]
                   m  map        small meta dict with str keys (metrics, config, ...)
    frame 1..n   raw C-order little-endian bytes of array i, one frame per array

The binary header carries the same fields but meta, little-endian::

    "DNI"  v:u8  kind:u8  n:u8  R:u8  S:u8   run id (R bytes UTF-8)  sender (S bytes)
    n x [dtype:u8  ndim:u8  ndim x dim:i64]   batch:i64  step:i64

kind and dtype index KIND_CODES and DTYPE_CODES. A data message whose arrays
total at most PACK_BYTES is one frame instead::

    "DNP"  L:u16  the binary header after "DNI" (L bytes)
    then each array at the next multiple of 8 bytes from the frame's start

A msgpack map never starts with "D", so the first bytes tell the layouts
apart. msgpack and struct only (bin type on, str map keys); never pickle, so
a peer cannot run code here.
"""
from __future__ import annotations

import math
import struct
from typing import Any, Sequence

import msgpack
import numpy as np

from pipeline.protocol import KINDS, Message
from pipeline.protocol import is_int as _is_int

PROTOCOL_VERSION = 2  # 2: data messages have a binary header
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 4

# Wire dtype strings (numpy ``dtype.str``, always little-endian), in the
# order of their codes in the binary header; and each one's dtype.
DTYPE_CODES = ("<f8", "<f4", "<i8", "<i4", "|u1")
ALLOWED_DTYPES: dict[str, np.dtype] = {s: np.dtype(s) for s in DTYPE_CODES}
_HEADER_KEYS = frozenset("vkrbstam")


def _wire_array(arr: Any, i: int) -> np.ndarray:
    """Return ``arr`` as a C-contiguous little-endian array, copying only if it is not one already."""
    if type(arr) is np.ndarray and arr.flags.c_contiguous and arr.dtype.str in ALLOWED_DTYPES:
        return arr  # already in wire form (every data message): nothing to check or copy
    if not isinstance(arr, np.ndarray):
        raise ValueError(f"array {i} is a {type(arr).__name__}, not a numpy.ndarray")
    le = arr.dtype.newbyteorder("<")  # no-op for "|u1" and for native dtypes on little-endian hosts
    if le.str not in ALLOWED_DTYPES:
        raise ValueError(f"array {i} has dtype {arr.dtype.str!r}; allowed: {sorted(ALLOWED_DTYPES)}")
    return np.asarray(arr, dtype=le, order="C")  # unlike ascontiguousarray, keeps 0-d shapes


def encode(msg: Message) -> list:
    """Message -> [header bytes, one C-contiguous little-endian array per
    array frame, a buffer ZeroMQ sends as is]; arrays already in wire form
    are not copied."""
    if not msg.meta:
        frames = _encode_data(msg)
        if frames is not None:
            return frames
    if msg.kind not in KINDS:
        raise ValueError(f"unknown message kind {msg.kind!r}")
    arrays = [_wire_array(a, i) for i, a in enumerate(msg.arrays)]
    header = {"v": PROTOCOL_VERSION, "k": msg.kind, "r": msg.run_id, "b": msg.batch,
              "s": msg.sender, "t": msg.step, "m": msg.meta,
              "a": [[a.dtype.str, list(a.shape)] for a in arrays]}
    try:
        packed = msgpack.packb(header, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"header cannot be packed with msgpack (check meta): {e}") from e
    # Never emit what decode rejects: run the receiver's checks on our own header.
    _parse_header(memoryview(packed))
    return [packed, *arrays]


# --- data messages: a binary header of fixed layout ---------------------------------
# Everything before a binary header's last 16 bytes (batch, step) is the same
# from batch to batch of one link: the sender packs it once and the receiver
# checks it once (each keeps up to _CACHED of them).
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
# about this size (one in flight, with the workers' allocator settings: one
# frame took 0.71-0.78 of three's time from 64 to 128 KiB, one reading at
# 160 KiB 1.30; the copy is the part that grows).
PACKED_MAGIC = b"DNP"
PACK_BYTES = 128 * 1024
_LEN = struct.Struct("<H")
_ALIGN = 8
_prefixes: dict[tuple, tuple] = {}     # sender: (kind, run, sender, specs) -> (prefix, pads)
_parsed: dict[bytes, tuple] = {}       # receiver: prefix -> (kind, run, sender, specs)
_layouts: dict[bytes, tuple] = {}      # receiver: packed start -> (kind, run, sender, arrays, size)


def _encode_data(msg: Message) -> list | None:
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


def _decode_data(head: memoryview) -> tuple:
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


def _decode_packed(frame: memoryview, frames: int) -> tuple:
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
        kind, run, sender, specs, _, _ = _decode_data(memoryview(DATA_MAGIC + frame[at - size:at]))
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
        built = tuple(_array(dtype, shape, frame, start, i)  # raises, saying which array
                      for i, (dtype, shape, start) in enumerate(arrays))
    return kind, run, sender, batch, step, built


def _array(dtype: np.dtype, shape: tuple, buf: memoryview, start: int, i: int) -> np.ndarray:
    try:
        return np.ndarray(shape, dtype, buf, start)
    except (ValueError, OverflowError, TypeError) as e:  # e.g. a zero-size shape, absurd dim
        raise ValueError(f"array {i} shape {list(shape)} is not representable: {e}") from e


def _buffer(frame: Any, i: int) -> memoryview:
    # zmq.Frame, bytes, memoryview and bytearray are buffers themselves.
    try:
        mv = memoryview(frame)
    except TypeError as e:
        raise ValueError(f"frame {i} is a {type(frame).__name__}, not a buffer") from e
    if not mv.c_contiguous:
        raise ValueError(f"frame {i} is not a contiguous buffer")
    if mv.format != "B" or mv.ndim != 1:  # e.g. an array: as bytes, which slices count
        mv = mv.cast("B") if mv.nbytes else memoryview(b"")
    return mv


def _parse_header(buf: memoryview) -> dict:
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ValueError(f"header is {buf.nbytes} bytes, more than MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"header is not valid msgpack: {e}") from e
    _check_header(h)
    return h


def _check_header(h: Any) -> None:
    """ValueError saying what is wrong with an unpacked header, if anything."""
    if not isinstance(h, dict):
        raise ValueError(f"header is a msgpack {type(h).__name__}, not a map")
    # Version first: another version may legitimately have other keys, and that is the real error.
    if "v" not in h:
        raise ValueError("header has no version key 'v'")
    if not _is_int(h["v"]) or h["v"] != PROTOCOL_VERSION:
        raise ValueError(f"protocol version mismatch: message has v={h['v']!r}, "
                         f"this side speaks v={PROTOCOL_VERSION}")
    if h.keys() != _HEADER_KEYS:
        missing, extra = sorted(_HEADER_KEYS - h.keys()), sorted(map(repr, h.keys() - _HEADER_KEYS))
        raise ValueError(f"header keys wrong: missing {missing}, extra {extra}")
    if not isinstance(h["k"], str) or h["k"] not in KINDS:
        raise ValueError(f"unknown message kind {h['k']!r}")
    for key, name in (("r", "run id"), ("s", "sender")):
        if not isinstance(h[key], str):
            raise ValueError(f"{name} ({key!r}) must be a str, got {type(h[key]).__name__}")
    for key, name, low in (("b", "batch", -1), ("t", "step", 0)):
        if not _is_int(h[key]) or h[key] < low:
            raise ValueError(f"{name} ({key!r}) must be an int >= {low}, got {h[key]!r}")
    if not isinstance(h["m"], dict) or not all(isinstance(k, str) for k in h["m"]):
        raise ValueError("meta ('m') must be a map with str keys")
    specs = h["a"]
    if type(specs) is not list:
        raise ValueError(f"array specs ('a') must be a list, got {type(specs).__name__}")
    for i, spec in enumerate(specs):
        # type() is: msgpack gives exact lists, ints, strs; a bool is not an int here
        if not (type(spec) is list and len(spec) == 2 and type(spec[0]) is str
                and type(spec[1]) is list):
            raise ValueError(f"array spec {i} must be [dtype str, list of int], got {spec!r}")
        dtype, shape = spec
        for d in shape:
            if type(d) is not int:
                raise ValueError(f"array spec {i} must be [dtype str, list of int], got {spec!r}")
            if d < 0:
                raise ValueError(f"array {i} has a negative dim in shape {shape}")
        if dtype not in ALLOWED_DTYPES:
            raise ValueError(f"array {i} has dtype {dtype!r}; allowed: {sorted(ALLOWED_DTYPES)}")
        if len(shape) > MAX_NDIM:
            raise ValueError(f"array {i} has {len(shape)} dims, more than {MAX_NDIM}")


def _own_run(run: str, run_id: str | None) -> None:
    """Refuse a message of another run than ``run_id`` (None: take any)."""
    if run_id is not None and run != run_id:
        raise ValueError(f"foreign run id {run!r} (expected {run_id!r})")


def decode(frames: Sequence[Any], *, run_id: str | None = None, max_bytes: int = 1 << 30) -> Message:
    """Frames (bytes, memoryview or zmq.Frame) -> Message; any malformed input raises ValueError.

    The arrays are zero-copy, read-only views over the frames: they stay valid as
    long as they are referenced (they hold the frame), and np.array(x) gives a
    writable copy. If ``run_id`` is given, a message of another run is rejected.
    """
    if isinstance(frames, (bytes, bytearray, memoryview, str)):
        raise ValueError("decode takes a sequence of frames, not a single buffer")
    try:
        views = [_buffer(f, i) for i, f in enumerate(frames)]
    except TypeError as e:  # not iterable
        raise ValueError(f"frames must be a sequence of buffers: {e}") from e
    if not views:
        raise ValueError("empty frame list: a message needs at least a header frame")
    total = sum(v.nbytes for v in views)
    if total > max_bytes:
        raise ValueError(f"message is {total} bytes, more than max_bytes={max_bytes}")
    head = views[0]
    magic = head[:3]
    if magic == PACKED_MAGIC:  # a data message in one frame
        kind, run, sender, batch, step, arrays = _decode_packed(head.toreadonly(), len(views))
        _own_run(run, run_id)
        return Message(kind, run, batch, sender, step, arrays, {})
    if magic == DATA_MAGIC:  # a data message's binary header
        kind, run, sender, specs, batch, step = _decode_data(head.toreadonly())
        meta: dict = {}
    elif magic[:1] == b"D":
        raise ValueError(f"unknown binary header {bytes(magic)!r} (a peer of another "
                         f"protocol version than {PROTOCOL_VERSION}?)")
    else:
        h = _parse_header(head)
        kind, run, sender, batch, step, meta = h["k"], h["r"], h["s"], h["b"], h["t"], h["m"]
        specs = [(ALLOWED_DTYPES[dt], shape, math.prod(shape) * ALLOWED_DTYPES[dt].itemsize)
                 for dt, shape in h["a"]]  # Python ints: no overflow on hostile shapes
    bodies = views[1:]
    _own_run(run, run_id)
    if len(bodies) != len(specs):
        raise ValueError(f"header declares {len(specs)} arrays but {len(bodies)} array "
                         f"frames follow")
    arrays = []
    for i, ((dtype, shape, want), body) in enumerate(zip(specs, bodies)):
        if body.nbytes != want:
            raise ValueError(f"array {i} frame is {body.nbytes} bytes, but shape {list(shape)} "
                             f"of {dtype.str} needs {want}")
        # Over a read-only view: frames may be writable (zmq.Frame, bytearray), arrays never.
        arrays.append(_array(dtype, shape, body.toreadonly(), 0, i))
    return Message(kind, run, batch, sender, step, tuple(arrays), meta)
