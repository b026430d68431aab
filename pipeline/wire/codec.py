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
from typing import Any, Sequence

import msgpack
import numpy as np

from pipeline.wire.protocol import KINDS, Message
from pipeline.wire.protocol import is_int as _is_int
from pipeline.wire.binary import (ALLOWED_DTYPES, DATA_MAGIC, MAX_HEADER_BYTES, MAX_NDIM,
                                  PACKED_MAGIC, PROTOCOL_VERSION, array_at, decode_data,
                                  decode_packed, encode_data)

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
        frames = encode_data(msg)
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
        kind, run, sender, batch, step, arrays = decode_packed(head.toreadonly(), len(views))
        _own_run(run, run_id)
        return Message(kind, run, batch, sender, step, arrays, {})
    if magic == DATA_MAGIC:  # a data message's binary header
        kind, run, sender, specs, batch, step = decode_data(head.toreadonly())
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
        arrays.append(array_at(dtype, shape, body.toreadonly(), 0, i))
    return Message(kind, run, batch, sender, step, tuple(arrays), meta)
