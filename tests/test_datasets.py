"""The IDX and npz readers, on small files the tests write byte by byte."""
from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.files import MNIST_FILES, load_mnist, load_npz, read_idx

pytestmark = pytest.mark.timeout(30)


def idx_bytes(code: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    """An IDX file as the format describes it: 0, 0, type, ndim, big-endian dims."""
    return bytes([0, 0, code, len(shape)]) + b"".join(struct.pack(">I", d) for d in shape) + payload


def write_mnist(d: Path, n_train=6, n_test=4, gz=False, labels=None) -> dict:
    rng = np.random.default_rng(0)
    data = {}
    for part, n in (("train", n_train), ("test", n_test)):
        x = rng.integers(0, 256, size=(n, 3, 2), dtype=np.uint8)
        y = np.array(labels if labels is not None else [i % 10 for i in range(n)], np.uint8)
        data[part] = (x, y)
        for name, body in zip(MNIST_FILES[part], (idx_bytes(0x08, x.shape, x.tobytes()),
                                                   idx_bytes(0x08, y.shape, y.tobytes()))):
            path = d / (name + (".gz" if gz else ""))
            path.write_bytes(gzip.compress(body) if gz else body)
    return data


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_files_plain_and_gzip(tmp_path, gz):
    want = write_mnist(tmp_path, gz=gz)
    got = load_mnist(tmp_path)
    for part, (x, y) in want.items():
        assert got[part].x.shape == (len(x), 6) and got[part].x.dtype == np.float32
        # pixels scaled to [0, 1] by 255, row-major flattening
        assert np.array_equal(got[part].x, x.reshape(len(x), 6).astype(np.float32) / 255)
        assert np.array_equal(got[part].y, y) and got[part].y.dtype == np.int64


def test_read_idx_other_types(tmp_path):
    p = tmp_path / "f.idx"
    values = np.array([[1.5, -2.0], [0.25, 8.0]], ">f4")
    p.write_bytes(idx_bytes(0x0D, (2, 2), values.tobytes()))
    assert np.array_equal(read_idx(p), values.astype(np.float32))


@pytest.mark.parametrize("content, reason", [
    (b"\x00\x00\x08", "not an IDX file"),
    (b"\x12\x34\x08\x01\x00\x00\x00\x01\x05", "not an IDX file"),
    (b"\x00\x00\x07\x01\x00\x00\x00\x01\x05", "not an IDX file"),          # unknown type
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "header truncated"),
    (idx_bytes(0x08, (2, 3), bytes(5)), "truncated or not this format"),  # one byte short
    (idx_bytes(0x08, (2, 3), bytes(7)), "truncated or not this format"),  # one byte long
    (gzip.compress(idx_bytes(0x08, (4,), bytes(4)), mtime=0)[:-6], "truncated gzip"),
])
def test_read_idx_rejects_with_the_file_named(tmp_path, content, reason):
    p = tmp_path / "bad-idx"
    p.write_bytes(content)
    with pytest.raises(ValueError, match=reason) as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_mnist_missing_file_and_bad_labels(tmp_path):
    with pytest.raises(ValueError) as info:
        load_mnist(tmp_path)
    assert str(info.value) == (f"{tmp_path}: no train-images-idx3-ubyte (or "
                               f"train-images-idx3-ubyte.gz) here; python launch.py data mnist "
                               f"{tmp_path} downloads MNIST there (data fashion-mnist: "
                               "Fashion-MNIST)")
    write_mnist(tmp_path, labels=[0, 1, 2, 3, 10, 5][:6], n_test=6)
    with pytest.raises(ValueError, match=r"labels must lie in 0\.\.9, found 0\.\.10"):
        load_mnist(tmp_path)


def test_a_missing_directory_names_the_command_that_fills_it(tmp_path):
    with pytest.raises(ValueError) as info:
        load_mnist(tmp_path / "no where")
    assert str(info.value) == (f"{tmp_path / 'no where'}: no such directory; python launch.py "
                               f"data mnist '{tmp_path / 'no where'}' downloads MNIST there "
                               "(data fashion-mnist: Fashion-MNIST)")
    (tmp_path / "a-file").write_bytes(b"")
    with pytest.raises(ValueError, match="a-file: not a directory$"):
        load_mnist(tmp_path / "a-file")


def test_mnist_count_mismatch(tmp_path):
    write_mnist(tmp_path)
    y = np.zeros(5, np.uint8)  # 6 images, 5 labels
    (tmp_path / MNIST_FILES["train"][1]).write_bytes(idx_bytes(0x08, y.shape, y.tobytes()))
    with pytest.raises(ValueError, match="pair up"):
        load_mnist(tmp_path)


def test_npz_round_trip_and_optional_test_split(tmp_path):
    x = np.arange(12, dtype=np.float64).reshape(4, 3) / 11
    y = np.array([0, 2, 1, 2])
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y)
    got = load_npz(tmp_path / "a.npz")
    assert set(got) == {"train"}
    assert np.array_equal(got["train"].x, x.astype(np.float32)) and np.array_equal(got["train"].y, y)
    np.savez(tmp_path / "b.npz", x_train=x, y_train=y, x_test=x[:2], y_test=y[:2])
    assert set(load_npz(tmp_path / "b.npz")) == {"train", "test"}


@pytest.mark.parametrize("arrays, reason", [
    (dict(x_train=np.zeros((3, 2))), "x_train and y_train"),
    (dict(x_train=np.zeros((3, 2)), y_train=np.zeros(2, int)), "pair up"),
    (dict(x_train=np.zeros((3, 2)), y_train=np.array([0.0, 1.0, 1.0])), "integers"),
    (dict(x_train=np.zeros((3, 2)), y_train=np.array([0, -1, 1])), "labels must lie"),
    (dict(x_train=np.full((2, 2), np.nan), y_train=np.array([0, 1])), "NaN"),
    (dict(x_train=np.zeros((2, 2)), y_train=np.array([0, 1]), x_test=np.zeros((1, 2))), "together"),
    (dict(x_train=np.zeros((2, 2)), y_train=np.array([0, 1]), x_test=np.zeros((1, 3)),
          y_test=np.array([0])), "different numbers of features"),
])
def test_npz_rejects(tmp_path, arrays, reason):
    np.savez(tmp_path / "c.npz", **arrays)
    with pytest.raises(ValueError, match=reason):
        load_npz(tmp_path / "c.npz")


def test_npz_not_an_archive(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"hello")
    with pytest.raises(ValueError, match="not a readable NumPy archive"):
        load_npz(tmp_path / "d.npz")


# Sizes: a file is refused on what its header declares, before the data is read.

def test_gzip_streamed_no_further_than_its_header_declares(tmp_path):
    """A small .gz that would expand to 64 MiB behind a 6-byte IDX body: refused
    after reading the declared bytes and one more, never expanded whole."""
    import tracemalloc
    p = tmp_path / "bomb.gz"
    with gzip.open(p, "wb", compresslevel=9) as f:
        f.write(idx_bytes(0x08, (2, 3), bytes(6)))
        for _ in range(64):
            f.write(bytes(1 << 20))
    assert p.stat().st_size < 200_000
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="more than 6 bytes") as info:
            read_idx(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert str(p) in str(info.value)
    assert peak < 4 << 20


def test_a_declared_size_beyond_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from pipeline import limits
    monkeypatch.setattr(limits, "available_bytes", lambda: 1 << 20)
    p = tmp_path / "big.gz"
    p.write_bytes(gzip.compress(idx_bytes(0x08, (2048, 1024), b"")))  # declares 2 MiB, holds none
    with pytest.raises(ValueError, match=r"declares 0\.0 GiB of data, more than") as info:
        read_idx(p)
    assert str(p) in str(info.value)


def test_idx_sizes_are_computed_without_wrapping(tmp_path):
    """Dims whose product overflows int64 (2**32-1 cubed, times 8 bytes): the
    message still names the file and the declared shape."""
    p = tmp_path / "wrap-idx"
    p.write_bytes(idx_bytes(0x0E, (2**32 - 1,) * 3, bytes(8)))
    with pytest.raises(ValueError, match=r"\(4294967295, 4294967295, 4294967295\)") as info:
        read_idx(p)
    assert str(p) in str(info.value) and str((2**32 - 1) ** 3 * 8) in str(info.value)


def _npz_with_header_only(path: Path, name: str, dtype: str, shape: tuple[int, ...]) -> None:
    """An archive whose member's .npy header declares ``shape`` but holds no data."""
    import io
    import zipfile
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        head, {"descr": dtype, "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(name + ".npy", head.getvalue())  # the writer puts the magic first
        z.writestr("y_train.npy", _npy(np.zeros(2, np.int64)))


def _npy(a: np.ndarray) -> bytes:
    import io
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


def test_npz_declaring_more_than_memory_is_one_line(tmp_path):
    p = tmp_path / "huge.npz"
    _npz_with_header_only(p, "x_train", "<f8", (10**12,))
    with pytest.raises(ValueError, match="GiB of data, more than") as info:
        load_npz(p)
    assert str(p) in str(info.value)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128, "U3", "V4"])
def test_npz_refuses_arrays_that_are_not_real_numbers(tmp_path, dtype):
    p = tmp_path / "c.npz"
    np.savez(p, x_train=np.zeros((2, 2), dtype), y_train=np.array([0, 1]))
    with pytest.raises(ValueError, match="x_train.npy: arrays must hold real numbers"):
        load_npz(p)


# The image shape of each example, channels last: x.reshape(n, *shape) is NHWC.

def test_mnist_images_are_one_channel(tmp_path):
    want = write_mnist(tmp_path)
    for part, split in load_mnist(tmp_path).items():
        assert split.shape == (3, 2, 1)
        x = want[part][0]
        assert np.array_equal(split.x.reshape(len(x), *split.shape)[..., 0],
                              x.astype(np.float32) / 255)


@pytest.mark.parametrize("x, shape", [
    (np.arange(24, dtype=np.uint8).reshape(2, 12), ()),                 # flat
    (np.arange(24, dtype=np.uint8).reshape(2, 4, 3), (4, 3, 1)),        # (n, H, W)
    (np.arange(48, dtype=np.uint8).reshape(2, 4, 3, 2), (4, 3, 2)),     # (n, H, W, C)
])
def test_npz_shape_follows_the_arrays_dimensions(tmp_path, x, shape):
    y = np.array([0, 1])
    np.savez(tmp_path / "a.npz", x_train=x, y_train=y, x_test=x, y_test=y)
    for split in load_npz(tmp_path / "a.npz").values():
        assert split.shape == shape
        assert split.x.shape == (2, x[0].size) and split.x.dtype == np.float32
        # row-major in H, W, C: the example's own layout, not transposed
        assert np.array_equal(split.x, x.reshape(2, -1).astype(np.float32) / 255)
        if shape:
            assert np.array_equal(split.x.reshape(2, *shape),
                                  x.reshape(2, *shape).astype(np.float32) / 255)
