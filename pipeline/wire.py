"""The wire format: ``encode(msg) -> frames`` and ``decode(frames) -> msg``, pure and socket-free.

Frame layout of one message (a ZeroMQ multipart message)::

    frame 0      msgpack map, at most MAX_HEADER_BYTES, exactly these keys:
                   v  int        PROTOCOL_VERSION
                   k  str        message kind, one of protocol.KINDS
                   r  str        run id (lets a worker drop frames of another run)
                   b  int        batch id, -1 = none
                   s  str        sender role, e.g. "layer1"
                   t  int        sender's local update count, >= 0
                   a  list       one [dtype_str, shape] per array, e.g. ["<f8", [32, 16]]
                   m  map        small meta dict with str keys (metrics, config, ...)
    frame 1..n   raw C-order little-endian bytes of array i, one frame per array

msgpack only (bin type on, str map keys); never pickle, so a peer cannot run code here.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import msgpack
import numpy as np

from pipeline.protocol import KINDS, Message
from pipeline.protocol import is_int as _is_int

PROTOCOL_VERSION = 1
MAX_HEADER_BYTES = 64 * 1024
MAX_NDIM = 4

# Wire dtype string (numpy ``dtype.str``, always little-endian) -> dtype.
ALLOWED_DTYPES: dict[str, np.dtype] = {
    np.dtype(s).str: np.dtype(s) for s in ("<f8", "<f4", "<i8", "<i4", "|u1")
}
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
    """Message -> [header bytes, one flat byte memoryview per array]; arrays already in wire form are not copied."""
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
    return [packed, *(_flat(a) for a in arrays)]


def _flat(a: np.ndarray) -> memoryview:
    # reshape(-1) and view(uint8) are views of a contiguous array: no copy, even for 0-d or empty.
    return memoryview(a.reshape(-1).view(np.uint8))


# A data message's header is the same from batch to batch but for the batch
# id and the step: its other six fields are packed once per (kind, run,
# sender, array specs) and the two numbers appended (a msgpack map's keys
# may come in any order). At most _PREFIXES of them are kept.
_prefixes: dict[tuple, bytes] = {}
_PREFIXES = 256


def _encode_data(msg: Message) -> list | None:
    """The frames of a message without meta whose arrays are all in wire
    form, or None to take the general way (which also says what is wrong)."""
    b, t = msg.batch, msg.step
    if not (type(b) is int and b >= -1 and type(t) is int and t >= 0
            and type(msg.run_id) is str and type(msg.sender) is str):
        return None  # (before the cache key: a field of another type may not hash)
    specs = []
    for a in msg.arrays:
        if not (type(a) is np.ndarray and a.flags.c_contiguous and a.ndim <= MAX_NDIM):
            return None
        dtype = a.dtype.str
        if dtype not in ALLOWED_DTYPES:
            return None
        specs.append((dtype, a.shape))
    key = (msg.kind, msg.run_id, msg.sender, *specs)
    prefix = _prefixes.get(key)
    if prefix is None:
        if msg.kind not in KINDS:
            return None
        if len(_prefixes) >= _PREFIXES:
            _prefixes.clear()
        packer = msgpack.Packer(use_bin_type=True, autoreset=False)
        packer.pack_map_header(len(_HEADER_KEYS))
        for k, v in (("v", PROTOCOL_VERSION), ("k", msg.kind), ("r", msg.run_id),
                     ("s", msg.sender), ("m", {}),
                     ("a", [[dt, list(shape)] for dt, shape in specs])):
            packer.pack(k)
            packer.pack(v)
        prefix = _prefixes[key] = packer.bytes()
    header = b"".join((prefix, _B, _packb(b), _T, _packb(t)))
    if len(header) > MAX_HEADER_BYTES:
        return None
    return [header, *(_flat(a) for a in msg.arrays)]


_packb = msgpack.Packer(use_bin_type=True).pack
_B, _T = _packb("b"), _packb("t")


def _buffer(frame: Any, i: int) -> memoryview:
    # zmq.Frame exposes its bytes as .buffer; bytes/memoryview/bytearray are buffers themselves.
    try:
        mv = memoryview(getattr(frame, "buffer", frame))
    except TypeError as e:
        raise ValueError(f"frame {i} is a {type(frame).__name__}, not a buffer") from e
    if not mv.c_contiguous:
        raise ValueError(f"frame {i} is not a contiguous buffer")
    return mv


def _parse_header(buf: memoryview) -> dict:
    if buf.nbytes > MAX_HEADER_BYTES:
        raise ValueError(f"header is {buf.nbytes} bytes, more than MAX_HEADER_BYTES={MAX_HEADER_BYTES}")
    try:
        h = msgpack.unpackb(buf, raw=False, strict_map_key=True, use_list=True)
    except (ValueError, TypeError, msgpack.UnpackException) as e:
        raise ValueError(f"header is not valid msgpack: {e}") from e
    if not (type(h) is dict and _data_header_ok(h)):  # every data message: one cheap pass
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


def _data_header_ok(h: dict) -> bool:
    """The header of a message without meta passes _check_header (False:
    let it say what is wrong, or check the meta)."""
    if not (h.keys() == _HEADER_KEYS and type(h["v"]) is int and h["v"] == PROTOCOL_VERSION
            and type(h["m"]) is dict and not h["m"] and type(h["k"]) is str and h["k"] in KINDS
            and type(h["r"]) is str and type(h["s"]) is str
            and type(h["b"]) is int and h["b"] >= -1 and type(h["t"]) is int and h["t"] >= 0
            and type(h["a"]) is list):
        return False
    for spec in h["a"]:
        if not (type(spec) is list and len(spec) == 2 and type(spec[0]) is str
                and spec[0] in ALLOWED_DTYPES and type(spec[1]) is list
                and len(spec[1]) <= MAX_NDIM):
            return False
        for d in spec[1]:
            if type(d) is not int or d < 0:
                return False
    return True


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
    h = _parse_header(views[0])
    if run_id is not None and h["r"] != run_id:
        raise ValueError(f"foreign run id {h['r']!r} (expected {run_id!r})")
    specs, bodies = h["a"], views[1:]
    if len(bodies) != len(specs):
        raise ValueError(f"header declares {len(specs)} arrays but {len(bodies)} array frames follow")
    arrays = []
    for i, ((dtype_str, shape), body) in enumerate(zip(specs, bodies)):
        dtype = ALLOWED_DTYPES[dtype_str]
        want = math.prod(shape) * dtype.itemsize  # Python ints: no overflow on hostile shapes
        if body.nbytes != want:
            raise ValueError(f"array {i} frame is {body.nbytes} bytes, but shape {shape} "
                             f"of {dtype_str} needs {want}")
        try:
            # Over a read-only view: frames may be writable (zmq.Frame, bytearray), arrays never.
            arr = np.ndarray(shape, dtype, body.toreadonly())
        except (ValueError, OverflowError, TypeError) as e:  # e.g. a zero-size shape, absurd dim
            raise ValueError(f"array {i} shape {shape} is not representable: {e}") from e
        arrays.append(arr)
    return Message(kind=h["k"], run_id=h["r"], batch=h["b"], sender=h["s"], step=h["t"],
                   arrays=tuple(arrays), meta=h["m"])
