"""Tests for pipeline.wire: round trips, zero-copy, every malformed-input rejection, fuzzing."""
from __future__ import annotations

import contextlib

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.wire import binary, protocol
from pipeline.wire import codec as wire
from pipeline.wire.codec import decode, encode
from pipeline.wire.protocol import Message

pytestmark = pytest.mark.timeout(60)

ALL_KINDS = ["hello", "config", "ready", "start", "act", "input", "grad", "eval", "eof",
             "metric", "done", "error", "stopped", "stop", "heartbeat", "checkpoint"]
WIRE_DTYPES = ["<f8", "<f4", "<i8", "<i4", "|u1"]
SHAPES = [(), (0, 3), (1,), (7,), (2, 3), (1, 2, 3, 4)]


@contextlib.contextmanager
def _unpacked():
    """Data messages in several frames, however small (packing off; the
    sender's plans made with packing on are forgotten, and those made without)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(binary, "PACK_BYTES", -1)
        binary._prefixes.clear()
        try:
            yield
        finally:
            binary._prefixes.clear()


@pytest.fixture
def unpacked():
    with _unpacked():
        yield


def _sample(dtype: str, shape: tuple, seed: int = 0) -> np.ndarray:
    """Distinct, exactly representable values, so equality is a real check."""
    rng = np.random.default_rng(seed)
    x = rng.integers(1, 250, size=shape).astype(dtype)
    return np.asarray(x)  # a 0-d result would otherwise be a numpy scalar


def _roundtrip(msg: Message, **kw) -> Message:
    return decode(encode(msg), **kw)


def _assert_same(got: Message, want: Message) -> None:
    assert (got.kind, got.run_id, got.batch, got.sender, got.step, got.meta) == \
        (want.kind, want.run_id, want.batch, want.sender, want.step, want.meta)
    assert len(got.arrays) == len(want.arrays)
    for g, w in zip(got.arrays, want.arrays):
        assert g.dtype.str == w.dtype.newbyteorder("<").str
        assert g.shape == w.shape
        assert np.array_equal(g, w)
        assert not g.flags.writeable


# ---------------------------------------------------------------- constants

def test_constants():
    assert wire.PROTOCOL_VERSION == 2
    assert protocol.KINDS == frozenset(ALL_KINDS)
    assert sorted(binary.KIND_CODES) == sorted(ALL_KINDS)  # every kind, each once
    assert list(binary.DTYPE_CODES) == WIRE_DTYPES
    assert all(getattr(protocol, k.upper()) == k for k in ALL_KINDS)
    assert sorted(wire.ALLOWED_DTYPES) == sorted(WIRE_DTYPES)
    assert all(wire.ALLOWED_DTYPES[s].str == s for s in WIRE_DTYPES)


# ---------------------------------------------------------------- round trips

@pytest.mark.parametrize("kind", ALL_KINDS)
def test_roundtrip_every_kind(kind):
    msg = Message(kind, "run-7", batch=12, sender="layer2", step=5,
                  arrays=(_sample("<f4", (3, 2)),),
                  meta={"loss": 0.25, "epoch": 3, "tags": ["a", "b"], "blob": b"\x00\xff",
                        "nested": {"ok": True, "none": None}})
    _assert_same(_roundtrip(msg), msg)


def test_roundtrip_defaults_no_arrays():
    got = _roundtrip(Message("heartbeat", "r"))
    assert (got.batch, got.sender, got.step, got.arrays, got.meta) == (-1, "", 0, (), {})


@pytest.mark.parametrize("dtype", WIRE_DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_roundtrip_every_dtype_and_shape(dtype, shape):
    msg = Message("act", "r", batch=0, arrays=(_sample(dtype, shape),))
    _assert_same(_roundtrip(msg), msg)


@pytest.mark.parametrize("meta, frames", [({}, 1), ({"general": "way"}, 6)])
def test_roundtrip_several_arrays_mixed(meta, frames):
    arrays = tuple(_sample(d, s, seed=i) for i, (d, s) in
                   enumerate(zip(WIRE_DTYPES, [(4, 3), (0, 3), (), (5,), (2, 2, 2)])))
    msg = Message("grad", "r", batch=3, sender="layer3", step=9, arrays=arrays, meta=meta)
    got = encode(msg)
    assert len(got) == frames  # a small data message is packed into one frame
    _assert_same(decode(got), msg)


def test_roundtrip_several_arrays_mixed_in_several_frames(unpacked):
    arrays = tuple(_sample(d, s, seed=i) for i, (d, s) in
                   enumerate(zip(WIRE_DTYPES, [(4, 3), (0, 3), (), (5,), (2, 2, 2)])))
    msg = Message("grad", "r", batch=3, sender="layer3", step=9, arrays=arrays)
    frames = encode(msg)
    assert len(frames) == 1 + len(arrays)
    _assert_same(decode(frames), msg)


def test_float_specials_roundtrip_bitwise():
    x = np.array([np.nan, np.inf, -np.inf, -0.0, 5e-324, 1.7976931348623157e308])
    got = _roundtrip(Message("act", "r", arrays=(x,))).arrays[0]
    assert got.tobytes() == x.tobytes()


def test_non_contiguous_inputs_roundtrip():
    base = _sample("<f8", (6, 8))
    views = (base[:, ::2], base.T, np.asfortranarray(base), base[::3, 1:5][:, ::-1])
    assert not any(v.flags.c_contiguous for v in views)
    _assert_same(_roundtrip(Message("act", "r", arrays=views)), Message("act", "r", arrays=views))


@pytest.mark.parametrize("dtype", [">f8", ">f4", ">i8", ">i4"])
def test_big_endian_inputs_arrive_little_endian(dtype):
    x = _sample(dtype, (3, 4))
    frames = encode(Message("act", "r", arrays=(x,)))
    spec = msgpack.unpackb(frames[0], raw=False)["a"][0]
    assert spec == ["<" + dtype[1:], [3, 4]]
    assert bytes(frames[1]) == x.astype("<" + dtype[1:]).tobytes()
    got = decode(frames).arrays[0]
    assert got.dtype.str == "<" + dtype[1:] and np.array_equal(got, x)


def test_native_dtype_spellings_are_accepted():
    x = np.arange(4, dtype=np.float64)  # "=f8" / native, not written "<f8"
    assert decode(encode(Message("act", "r", arrays=(x,)))).arrays[0].dtype.str == "<f8"


def test_header_layout():
    h = msgpack.unpackb(encode(Message("act", "r", 1, "layer1", 2, (np.zeros((2, 3)),), {"x": 1}))[0],
                        raw=False)
    assert h == {"v": 2, "k": "act", "r": "r", "b": 1, "s": "layer1", "t": 2,
                 "a": [["<f8", [2, 3]]], "m": {"x": 1}}


# ---------------------------------------------------------------- zero copy

@pytest.mark.parametrize("shape", [(100, 100), (), (0, 3)], ids=str)
def test_encode_does_not_copy_contiguous_arrays(shape, unpacked):
    x = _sample("<f8", shape)
    for meta in ({}, {"general": "way"}):
        frame = encode(Message("act", "r", arrays=(x,), meta=meta))[1]
        assert memoryview(frame).nbytes == x.nbytes and memoryview(frame).c_contiguous
        if x.size:
            assert np.shares_memory(np.frombuffer(frame, np.uint8), x)
    x[...] = 42.0  # the frame is a view: a write to the array shows through
    assert np.all(np.frombuffer(frame, "<f8") == 42.0)


def test_decode_is_zero_copy_and_read_only(unpacked):
    frames = [bytearray(f) for f in encode(Message("act", "r", arrays=(np.arange(6.0).reshape(2, 3),)))]
    got = decode(frames).arrays[0]
    frames[1][0:8] = np.float64(-1.0).tobytes()  # writing the frame shows in the view
    assert got[0, 0] == -1.0
    assert not got.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        got[0, 0] = 3.0


def test_decoded_array_outlives_frame_list():
    frames = [bytes(f) for f in encode(Message("act", "r", arrays=(np.arange(5, dtype="<i4"),)))]
    got = decode(frames).arrays[0]
    del frames
    assert np.array_equal(got, np.arange(5))


# ---------------------------------------------------------------- encode rejects

@pytest.mark.parametrize("arr", [np.array([object()]), np.zeros(2, "<c16"), np.zeros(2, bool),
                                 np.zeros(2, "<f2"), np.zeros(2, "<u4"), np.zeros(2, "<M8[s]")],
                         ids=lambda a: a.dtype.str)
def test_encode_rejects_bad_dtype(arr):
    with pytest.raises(ValueError, match="dtype"):
        encode(Message("act", "r", arrays=(arr,)))


@pytest.mark.parametrize("msg, match", [
    (Message("bogus", "r"), "unknown message kind"),
    (Message("act", "r", meta={"x": object()}), "msgpack"),
    (Message("act", "r", meta={"x": np.int64(3)}), "msgpack"),
    (Message("act", "r", meta={"x": 2 ** 70}), "msgpack"),
    (Message("act", "r", meta={1: "int key"}), "str keys|msgpack"),
    (Message("act", "r", meta={"x": {1: "nested int key"}}), "msgpack"),
    (Message("act", "r", meta=[1, 2]), "meta"),
    (Message("act", "r", batch=True), "batch"),
    (Message("act", "r", batch=-2), "batch"),
    (Message("act", "r", step=-1), "step"),
    (Message("act", "r", step=1.0), "step"),
    (Message("act", 5), "run id"),
    (Message("act", ["r"]), "run id"),          # unhashable: the data shortcut's cache key
    (Message("act", "r", sender=None), "sender"),
    (Message("act", "r", sender=["layer1"]), "sender"),
    (Message("act", "r", arrays=([1.0, 2.0],)), "not a numpy.ndarray"),
    (Message("act", "r", arrays=(np.zeros((1,) * 5),)), "5 dims"),
    (Message("act", "r", meta={"big": "x" * (70 * 1024)}), "MAX_HEADER_BYTES"),
], ids=lambda x: x if isinstance(x, str) else None)
def test_encode_rejects(msg, match):
    with pytest.raises(ValueError, match=match):
        encode(msg)


# ---------------------------------------------------------------- decode rejects

_DROP = object()


def _header(**over) -> bytes:
    h = {"v": 2, "k": "act", "r": "run", "b": 0, "s": "layer1", "t": 0,
         "a": [["<f8", [2, 3]]], "m": {}}
    for k, v in over.items():
        if v is _DROP:
            del h[k]
        else:
            h[k] = v
    return msgpack.packb(h, use_bin_type=True)


BODY = bytes(48)  # 2 * 3 * 8 bytes, matching the default header

DECODE_CASES = [
    ("empty", [], {}, "empty frame list"),
    ("single buffer", _header(), {}, "not a single buffer"),
    ("not iterable", 5, {}, "sequence of buffers"),
    ("frame not buffer", [_header(), "text"], {}, "frame 1 is a str, not a buffer"),
    ("frame not contiguous", [_header(), memoryview(bytes(96))[::2]], {}, "not a contiguous"),
    ("garbage header", [b"\xc1\xc1\xc1", BODY], {}, "not valid msgpack"),
    ("truncated header", [_header()[:-3], BODY], {}, "not valid msgpack"),
    ("trailing header bytes", [_header() + b"\x00", BODY], {}, "not valid msgpack"),
    ("bad utf8 header", [b"\xa2\xff\xfe", BODY], {}, "not valid msgpack"),
    ("int map key", [msgpack.packb({1: 2}), BODY], {}, "not valid msgpack"),
    ("header is list", [msgpack.packb([1, "act"]), BODY], {}, "msgpack list, not a map"),
    ("header is int", [msgpack.packb(7)], {}, "msgpack int, not a map"),
    ("oversized header", [_header(m={"x": "y" * 70000}), BODY], {}, "MAX_HEADER_BYTES"),
    ("no version", [_header(v=_DROP), BODY], {}, "no version"),
    ("wrong version", [_header(v=1), BODY], {}, r"version mismatch.*v=1.*speaks v=2"),
    ("bool version", [_header(v=True), BODY], {}, "version mismatch"),
    ("missing key", [_header(m=_DROP), BODY], {}, r"missing \['m'\]"),
    ("extra key", [_header(x=1), BODY], {}, r"extra \[\"'x'\"\]"),
    ("unknown kind", [_header(k="pickle"), BODY], {}, "unknown message kind 'pickle'"),
    ("kind not str", [_header(k=3), BODY], {}, "unknown message kind 3"),
    ("foreign run id", [_header(r="other"), BODY], {"run_id": "run"}, "foreign run id 'other'"),
    ("run id bytes", [_header(r=b"run"), BODY], {}, r"run id \('r'\) must be a str"),
    ("sender not str", [_header(s=1), BODY], {}, "sender"),
    ("bool batch", [_header(b=True), BODY], {}, r"batch \('b'\) must be an int"),
    ("str batch", [_header(b="3"), BODY], {}, "batch"),
    ("batch below -1", [_header(b=-2), BODY], {}, "batch"),
    ("float step", [_header(t=1.5), BODY], {}, r"step \('t'\) must be an int"),
    ("negative step", [_header(t=-1), BODY], {}, "step"),
    ("bool step", [_header(t=False), BODY], {}, "step"),
    ("meta not map", [_header(m=[1]), BODY], {}, "meta"),
    ("meta bytes key", [_header(m={b"k": 1}), BODY], {}, "str keys"),
    ("specs not list", [_header(a={"x": 1}), BODY], {}, "must be a list"),
    ("spec not pair", [_header(a=[["<f8"]]), BODY], {}, "array spec 0"),
    ("spec shape not list", [_header(a=[["<f8", 48]]), BODY], {}, "array spec 0"),
    ("spec float dim", [_header(a=[["<f8", [2.0, 3]]]), BODY], {}, "array spec 0"),
    ("spec bool dim", [_header(a=[["<f8", [True, 6]]]), BODY], {}, "array spec 0"),
    ("object dtype", [_header(a=[["|O", [6]]]), BODY], {}, "dtype '|O'"),
    ("complex dtype", [_header(a=[["<c16", [3]]]), BODY], {}, "dtype '<c16'"),
    ("big-endian dtype", [_header(a=[[">f8", [2, 3]]]), BODY], {}, "dtype '>f8'"),
    ("negative dim", [_header(a=[["<f8", [-2, -3]]]), BODY], {}, "negative dim"),
    ("five dims", [_header(a=[["<f8", [1, 1, 2, 1, 3]]]), BODY], {}, "5 dims"),
    ("missing array frame", [_header()], {}, "declares 1 arrays but 0 array frames"),
    ("extra array frame", [_header(), BODY, BODY], {}, "declares 1 arrays but 2 array frames"),
    ("truncated array frame", [_header(), BODY[:-1]], {}, r"47 bytes, but shape \[2, 3\].*needs 48"),
    ("long array frame", [_header(), BODY + b"\x00"], {}, "49 bytes"),
    ("shape mismatch", [_header(a=[["<f8", [3, 3]]]), BODY], {}, "needs 72"),
    ("itemsize mismatch", [_header(a=[["<i4", [2, 3]]]), BODY], {}, "needs 24"),
    ("absurd empty shape", [_header(a=[["<f8", [0, 2 ** 63 - 1]]]), b""], {}, "not representable"),
    ("over max_bytes", [_header(), BODY], {"max_bytes": 60}, "more than max_bytes=60"),
]


@pytest.mark.parametrize("frames, kw, match", [c[1:] for c in DECODE_CASES],
                         ids=[c[0] for c in DECODE_CASES])
def test_decode_rejects(frames, kw, match):
    with pytest.raises(ValueError, match=match):
        decode(frames, **kw)


def test_decode_reference_frames_are_valid():
    """The malformed cases above are one edit away from this frame list, which decodes."""
    got = decode([_header(), BODY], run_id="run", max_bytes=len(_header()) + 48)
    assert got.kind == "act" and got.arrays[0].shape == (2, 3) and not got.arrays[0].any()


def test_decode_accepts_matching_run_id_and_any_run_id_by_default():
    frames = encode(Message("stop", "abc"))
    assert decode(frames, run_id="abc").run_id == "abc"
    assert decode(frames).run_id == "abc"


# ---------------------------------------------------------------- over a real socket

@pytest.fixture
def pair():
    ctx = zmq.Context()
    a, b = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    try:
        for s in (a, b):
            s.linger = 0
            s.rcvtimeo = 5000  # fail, don't hang
            s.sndtimeo = 5000
        port = a.bind_to_random_port("tcp://127.0.0.1")
        b.connect(f"tcp://127.0.0.1:{port}")
        yield a, b
    finally:
        a.close(linger=0)
        b.close(linger=0)
        ctx.term()


def test_roundtrip_over_zmq_pair(pair):
    tx, rx = pair
    # 100x100 float64 is above pyzmq's copy threshold, so copy=False really sends the buffer.
    arrays = (_sample("<f8", (100, 100)), _sample("|u1", (0, 3)), _sample("<i8", ()),
              _sample(">f4", (3, 5))[:, ::2])
    msg = Message("act", "run-z", batch=4, sender="layer1", step=2, arrays=arrays, meta={"lr": 1e-3})
    tx.send_multipart(encode(msg), copy=False)
    frames = rx.recv_multipart(copy=False)
    assert all(isinstance(f, zmq.Frame) for f in frames)
    _assert_same(decode(frames, run_id="run-z"), msg)


# ---------------------------------------------------------------- fuzzing

def _check_decode_total(frames) -> None:
    """decode either returns a consistent Message or raises ValueError: nothing else."""
    try:
        msg = decode(frames)
    except ValueError as e:
        assert str(e)
        return
    assert msg.kind in protocol.KINDS and all(not a.flags.writeable for a in msg.arrays)
    if bytes(memoryview(frames[0])[:3]) == b"DNP":  # packed: the arrays are in the one frame
        assert len(frames) == 1
        assert sum(a.nbytes for a in msg.arrays) <= memoryview(frames[0]).nbytes
        return
    assert len(msg.arrays) == len(frames) - 1
    assert all(a.nbytes == memoryview(f).nbytes for a, f in zip(msg.arrays, frames[1:]))


_msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 64 - 1) | st.floats() | st.text(max_size=8)
    | st.binary(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=3), inner, max_size=4),
    max_leaves=12,
)
# Near-valid headers, so the fuzzer gets past the msgpack layer into the field checks.
_headers = st.fixed_dictionaries(
    {"v": st.sampled_from([2, 2, 2, 1, True]), "k": st.sampled_from(ALL_KINDS + ["x", 1]),
     "r": st.text(max_size=4) | st.binary(max_size=2), "b": st.integers(-3, 3) | st.booleans(),
     "s": st.text(max_size=4), "t": st.integers(-2, 3),
     "a": st.lists(st.tuples(st.sampled_from(WIRE_DTYPES + ["|O", ">f8", 3]),
                             st.lists(st.integers(-1, 3), max_size=5)).map(list), max_size=3)
          | _msgpack_values,
     "m": st.dictionaries(st.text(max_size=3), _msgpack_values, max_size=3) | _msgpack_values},
    optional={"x": _msgpack_values},
)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_random_frames(frames):
    _check_decode_total(frames)


@settings(max_examples=300, deadline=None)
@given(_headers, st.lists(st.binary(max_size=80), max_size=4))
def test_fuzz_near_valid_headers(header, bodies):
    _check_decode_total([msgpack.packb(header, use_bin_type=True), *bodies])


def _mutated(data, frames: list[bytes]) -> list[bytes]:
    """One frame of ``frames`` with a byte changed or cut short."""
    i = data.draw(st.integers(0, len(frames) - 1))
    f = bytearray(frames[i])
    if data.draw(st.booleans()) and f:
        f[data.draw(st.integers(0, len(f) - 1))] = data.draw(st.integers(0, 255))
    else:
        f = f[:data.draw(st.integers(0, len(f)))]
    return frames[:i] + [bytes(f)] + frames[i + 1:]


@settings(max_examples=300, deadline=None)
@given(st.data())
def test_fuzz_mutated_valid_messages(data):
    arrays = (_sample("<f8", (2, 3)), _sample("|u1", (4,)))
    frames = [bytes(f) for f in encode(Message("grad", "r", 1, "layer1", 1, arrays, {"k": [1, 2]}))]
    _check_decode_total(_mutated(data, frames))


# ---------------------------------------------------------------- data messages
# A data message (no meta) has a binary header of fixed layout, and a small
# one is packed into one frame; each must say what the msgpack header says.

def _binary_header(kind: str, run_id: str, sender: str, specs, batch: int, step: int) -> bytes:
    """A data message's binary header, byte by byte from the layout in wire's docs."""
    out = bytearray(b"DNI")
    out += bytes([2, ALL_KINDS.index(kind), len(specs)])
    run, who = run_id.encode(), sender.encode()
    out += bytes([len(run), len(who)]) + run + who
    for dt, shape in specs:
        out += bytes([WIRE_DTYPES.index(np.dtype(dt).str), len(shape)])
        for d in shape:
            out += d.to_bytes(8, "little", signed=True)
    return bytes(out + batch.to_bytes(8, "little", signed=True)
                 + step.to_bytes(8, "little", signed=True))


def test_the_binary_header_byte_by_byte(unpacked):
    msg = Message("grad", "run-1", 7, "layer2", 300, (_sample("<f4", (2, 3)), _sample("|u1", ())))
    want = (b"DNI" b"\x02" b"\x06" b"\x02" b"\x05" b"\x06" b"run-1" b"layer2"
            b"\x01\x02" + (2).to_bytes(8, "little") + (3).to_bytes(8, "little")
            + b"\x04\x00" + (7).to_bytes(8, "little") + (300).to_bytes(8, "little"))
    assert bytes(encode(msg)[0]) == want == _binary_header(
        "grad", "run-1", "layer2", [("<f4", (2, 3)), ("|u1", ())], 7, 300)


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(ALL_KINDS), st.text(max_size=6), st.integers(-1, 2 ** 40),
       st.text(max_size=6), st.integers(0, 2 ** 40),
       st.lists(st.tuples(st.sampled_from(WIRE_DTYPES), st.sampled_from(SHAPES)), max_size=3))
def test_a_data_message_has_the_binary_header_and_decodes_as_the_msgpack_one(
        kind, run_id, batch, sender, step, specs):
    with _unpacked():  # (hypothesis: no function-scoped fixture)
        _check_binary_and_msgpack_alike(kind, run_id, batch, sender, step, specs)


def _check_binary_and_msgpack_alike(kind, run_id, batch, sender, step, specs):
    arrays = tuple(_sample(dt, shape) for dt, shape in specs)
    msg = Message(kind, run_id, batch, sender, step, arrays)
    general = {"v": 2, "k": kind, "r": run_id, "b": batch, "s": sender, "t": step, "m": {},
               "a": [[np.dtype(dt).str, list(shape)] for dt, shape in specs]}
    for _ in range(2):  # the header's fixed part packed and parsed, then reused from the caches
        frames = encode(msg)
        assert bytes(frames[0]) == _binary_header(kind, run_id, sender, specs, batch, step)
        got = decode(frames)
        _assert_same(got, msg)
        _assert_same(decode([msgpack.packb(general, use_bin_type=True), *frames[1:]]), got)


def test_fields_the_binary_header_cannot_hold_take_the_general_way():
    for msg in (Message("act", "r" * 256, 1, "layer1"), Message("act", "r", 2 ** 63, "layer1"),
                Message("act", "r", 1, "s" * 300, 2 ** 64 - 1)):
        frames = encode(msg)
        assert bytes(frames[0])[:3] != b"DNI"
        _assert_same(decode(frames), msg)


def test_a_small_data_message_is_one_frame_byte_by_byte():
    f4, u1 = _sample("<f4", (2, 3)), _sample("|u1", ())
    head = _binary_header("grad", "run-1", "layer2", [("<f4", (2, 3)), ("|u1", ())], 7, 300)
    # "DNP", the header's length after its magic (52), the header, zeros up to
    # byte 64, the 24 bytes of f4 (ending at 88, a multiple of 8), the byte of u1.
    want = (b"DNP" + (52).to_bytes(2, "little") + head[3:] + bytes(7) + f4.tobytes()
            + u1.tobytes())
    frames = encode(Message("grad", "run-1", 7, "layer2", 300, (f4, u1)))
    assert len(head) == 55 and [bytes(f) for f in frames] == [want] and len(want) == 89
    got = decode([bytearray(want)])
    _assert_same(got, Message("grad", "run-1", 7, "layer2", 300, (f4, u1)))
    assert [a.ctypes.data - got.arrays[0].ctypes.data for a in got.arrays] == [0, 24]


def test_packing_stops_at_pack_bytes():
    for rows, frames in ((binary.PACK_BYTES // 8, 1), (binary.PACK_BYTES // 8 + 1, 2)):
        msg = Message("act", "r", 1, "source", 0, (np.ones(rows),))
        got = encode(msg)
        assert len(got) == frames
        _assert_same(decode(got), msg)


def test_a_packed_messages_arrays_are_read_only_views_of_its_frame():
    frame = bytearray(encode(Message("act", "r", 1, "source", 0, (np.arange(6.0),)))[0])
    got = decode([frame]).arrays[0]
    frame[-8:] = np.float64(-1.0).tobytes()
    assert got[-1] == -1.0 and not got.flags.writeable


_PACKED = bytes(encode(Message("act", "run", 0, "layer1", 0, (np.zeros((2, 3)),)))[0])
PACKED_CASES = [
    ("two frames", [_PACKED, BODY], "one frame, got 2"),
    ("unknown binary magic", [b"DNX" + _PACKED[3:]], r"unknown binary header b'DNX'"),
    ("too short", [b"DNP\x01"], "too short for its header"),
    ("header past the end", [_PACKED[:3] + b"\xff\x00" + _PACKED[5:]], "its header alone needs"),
    ("arrays past the end", [_PACKED[:-1]], "arrays take"),
    ("bytes after the arrays", [_PACKED + b"\x00"], "arrays take"),
    ("its header's version", [_PACKED[:5] + b"\x01" + _PACKED[6:]], "version mismatch"),
    ("foreign run id", [bytes(encode(Message("act", "x", 0, "layer1", 0,
                                             (np.zeros((2, 3)),)))[0])], "foreign run id"),
]


@pytest.mark.parametrize("frames, match", [c[1:] for c in PACKED_CASES],
                         ids=[c[0] for c in PACKED_CASES])
def test_decode_rejects_packed(frames, match):
    assert decode([_PACKED], run_id="run").arrays[0].shape == (2, 3)  # one edit away
    with pytest.raises(ValueError, match=match):
        decode(frames, run_id="run")


_GOOD = _binary_header("act", "run", "layer1", [("<f8", (2, 3))], 0, 0)
_TAIL16 = bytes(16)
BINARY_CASES = [
    ("truncated fixed part", [b"DNI\x02\x04", BODY], "too short"),
    ("no tail", [_GOOD[:-16], BODY], "too short|ends inside|bytes after"),
    ("wrong version", [b"DNI\x01" + _GOOD[4:], BODY], r"version mismatch.*v=1.*speaks v=2"),
    ("unknown kind code", [_GOOD[:4] + b"\x10" + _GOOD[5:], BODY], "unknown message kind code 16"),
    ("run id past the end", [_GOOD[:6] + b"\xff" + _GOOD[7:], BODY], "ends inside its run id"),
    ("bad utf8 run id", [_GOOD[:8] + b"\xff\xfe\xfd" + _GOOD[11:], BODY], "not UTF-8"),
    ("unknown dtype code", [_GOOD[:17] + b"\x05" + _GOOD[18:], BODY], "unknown dtype code 5"),
    ("five dims", [_GOOD[:18] + b"\x05" + _GOOD[19:], BODY], "5 dims"),
    ("spec past the end", [_GOOD[:18] + b"\x04" + _GOOD[19:], BODY], "ends inside array spec 0"),
    ("negative dim", [_GOOD[:19] + (-2).to_bytes(8, "little", signed=True) + _GOOD[27:], BODY],
     "negative dim"),
    ("bytes after the specs", [_GOOD[:-16] + b"\x00" + _TAIL16, BODY], "1 bytes after"),
    ("batch below -1", [_GOOD[:-16] + (-2).to_bytes(8, "little", signed=True) + bytes(8), BODY],
     "batch"),
    ("negative step", [_GOOD[:-8] + (-1).to_bytes(8, "little", signed=True), BODY], "step"),
    ("missing array frame", [_GOOD], "declares 1 arrays but 0"),
    ("short array frame", [_GOOD, BODY[:-1]], r"47 bytes, but shape \[2, 3\]"),
    ("foreign run id", [_binary_header("act", "x", "layer1", [("<f8", (2, 3))], 0, 0), BODY],
     "foreign run id 'x'"),
]


@pytest.mark.parametrize("frames, match", [c[1:] for c in BINARY_CASES],
                         ids=[c[0] for c in BINARY_CASES])
def test_decode_rejects_binary(frames, match):
    assert decode([_GOOD, BODY], run_id="run").arrays[0].shape == (2, 3)  # one edit away
    with pytest.raises(ValueError, match=match):
        decode(frames, run_id="run")


def test_a_rejected_binary_header_is_not_remembered():
    bad = _GOOD[:17] + b"\x05" + _GOOD[18:]
    for _ in range(3):  # the receiver's cache keeps checked fields only
        with pytest.raises(ValueError, match="dtype code"):
            decode([bad, BODY])
    assert bytes(bad)[:-16] not in binary._parsed


def test_a_rejected_packed_header_is_not_remembered():
    bad = _PACKED[:5] + b"\x01" + _PACKED[6:]  # its header's version
    for _ in range(3):
        with pytest.raises(ValueError, match="version mismatch"):
            decode([bad])
    decode([_PACKED])
    cut = 5 + int.from_bytes(_PACKED[3:5], "little") - 16  # up to its batch and step
    assert _PACKED[:cut] in binary._layouts and bad[:cut] not in binary._layouts


@settings(max_examples=400, deadline=None)
@given(st.data())
def test_fuzz_mutated_binary_messages(data):
    arrays = (_sample("<f8", (2, 3)), _sample("|u1", (4,)))
    msg = Message("act", "r", 1, "layer1", 1, arrays)
    packed = [bytes(f) for f in encode(msg)]
    assert len(packed) == 1 and packed[0][:3] == b"DNP"
    with _unpacked():
        frames = [bytes(f) for f in encode(msg)]
    assert frames[0][:3] == b"DNI"
    _check_decode_total(_mutated(data, frames))
    _check_decode_total(_mutated(data, packed))
