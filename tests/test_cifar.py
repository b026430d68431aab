"""The CIFAR-10 binary reader, on small batch files the tests write record by
record, checked against a reference that unpacks each record with loops."""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from pipeline.data.files import CIFAR_FILES, CIFAR_SUBDIR, load_cifar10

pytestmark = pytest.mark.timeout(30)

RECORD = 3073
NAMES = [*CIFAR_FILES["train"], *CIFAR_FILES["test"]]


def record(label: int, red, green, blue) -> bytes:
    """One record as the format describes it: the label byte, then the red,
    green and blue 32x32 planes, each row-major."""
    planes = [bytes(int(p[h][w]) for h in range(32) for w in range(32)) for p in (red, green, blue)]
    return bytes([label]) + b"".join(planes)


def reference(rec: bytes) -> tuple[int, list]:
    """The label and the image [h][w][c] of one record, pixel by pixel."""
    image = [[[np.float32(rec[1 + c * 1024 + h * 32 + w]) / np.float32(255) for c in range(3)]
              for w in range(32)] for h in range(32)]
    return rec[0], image


def write_cifar(d: Path, per_file: int = 3) -> dict[str, list[bytes]]:
    """Six batch files of random records; file k's labels start at k so the
    order of the train files shows in the labels."""
    rng = np.random.default_rng(1)
    d.mkdir(parents=True, exist_ok=True)
    written = {}
    for k, name in enumerate(NAMES):
        recs = [bytes([(k + i) % 10]) + rng.integers(0, 256, 3072, dtype=np.uint8).tobytes()
                for i in range(per_file)]
        (d / name).write_bytes(b"".join(recs))
        written[name] = recs
    return written


def check_against_reference(splits, written) -> None:
    for part, names in CIFAR_FILES.items():
        recs = [r for name in names for r in written[name]]
        split = splits[part]
        assert split.shape == (32, 32, 3)
        assert split.x.shape == (len(recs), 3072) and split.x.dtype == np.float32
        assert split.y.dtype == np.int64
        images = split.x.reshape(len(recs), 32, 32, 3)
        for i, rec in enumerate(recs):
            label, image = reference(rec)
            assert split.y[i] == label
            assert np.array_equal(images[i], np.array(image, np.float32))


def test_round_trip_in_hwc_order(tmp_path):
    """Planes with distinct patterns come back with the channel last: pixel
    (h, w) of plane c is x[h, w, c], never a plane's bytes read as rows."""
    red = [[(h * 7 + w) % 256 for w in range(32)] for h in range(32)]
    green = [[(255 - 3 * h - 5 * w) % 256 for w in range(32)] for h in range(32)]
    blue = [[(h * w + 11) % 256 for w in range(32)] for h in range(32)]
    written = write_cifar(tmp_path)
    written["data_batch_3.bin"][1] = record(7, red, green, blue)
    (tmp_path / "data_batch_3.bin").write_bytes(b"".join(written["data_batch_3.bin"]))
    splits = load_cifar10(tmp_path)
    assert set(splits) == {"train", "test"}
    check_against_reference(splits, written)
    image = splits["train"].x.reshape(-1, 32, 32, 3)[2 * 3 + 1]   # file 3, record 1
    assert splits["train"].y[7] == 7
    for h, w in ((0, 0), (0, 31), (5, 2), (31, 0), (31, 31)):
        assert [round(float(v) * 255) for v in image[h, w]] == [red[h][w], green[h][w], blue[h][w]]
    # train files in order 1..5: file k's first label is k
    assert list(splits["train"].y[::3]) == [0, 1, 2, 3, 4]
    assert list(splits["test"].y) == [5, 6, 7]


def test_pixels_span_zero_to_one(tmp_path):
    write_cifar(tmp_path)
    rec = record(0, *[[[255 * ((h + w) % 2) for w in range(32)] for h in range(32)]] * 3)
    (tmp_path / "test_batch.bin").write_bytes(rec)
    x = load_cifar10(tmp_path)["test"].x
    assert x.min() == 0.0 and x.max() == 1.0


def test_the_official_tarballs_subdirectory(tmp_path):
    written = write_cifar(tmp_path / CIFAR_SUBDIR)
    check_against_reference(load_cifar10(tmp_path), written)


def one_line_error(directory: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        load_cifar10(directory)
    message = str(info.value)
    assert "\n" not in message, message
    for needle in needles:
        assert needle in message, message
    return message


def test_a_missing_directory_or_file_is_named(tmp_path):
    one_line_error(tmp_path / "nowhere", f"{tmp_path / 'nowhere'}: no such directory; python "
                   f"launch.py data cifar10 {tmp_path / 'nowhere'} downloads CIFAR-10 there")
    (tmp_path / "a-file").write_bytes(b"")
    one_line_error(tmp_path / "a-file", "not a directory")
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4.bin").unlink()
    one_line_error(tmp_path, str(tmp_path), "no data_batch_4.bin here", CIFAR_SUBDIR,
                   f"; python launch.py data cifar10 {tmp_path} downloads CIFAR-10 there")
    write_cifar(tmp_path)
    (tmp_path / "test_batch.bin").unlink()
    one_line_error(tmp_path, "no test_batch.bin here")


@pytest.mark.parametrize("name", ["data_batch_2.bin", "test_batch.bin"])
@pytest.mark.parametrize("size, reason", [
    (RECORD - 1, "3072 bytes is not a whole number of 3073-byte records"),
    (2 * RECORD + 5, "6151 bytes is not a whole number of 3073-byte records"),
    (0, "empty file"),
])
def test_a_size_that_is_not_whole_records(tmp_path, name, size, reason):
    write_cifar(tmp_path)
    (tmp_path / name).write_bytes(bytes(size))
    one_line_error(tmp_path, str(tmp_path / name), reason)


def test_a_label_beyond_nine(tmp_path):
    written = write_cifar(tmp_path)
    recs = written["data_batch_5.bin"]
    recs[2] = bytes([12]) + recs[2][1:]
    (tmp_path / "data_batch_5.bin").write_bytes(b"".join(recs))
    one_line_error(tmp_path, str(tmp_path / "data_batch_5.bin"), "record 2 has label 12",
                   "0..9")


def test_the_pickled_python_version_is_refused(tmp_path):
    write_cifar(tmp_path)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [1, 2],
             b"data": np.zeros((2, 3072), np.uint8)}
    (tmp_path / "data_batch_1.bin").write_bytes(pickle.dumps(batch, protocol=2))
    one_line_error(tmp_path, str(tmp_path / "data_batch_1.bin"), "0x80",
                   "this is the pickled 'python version'; use the binary version")


def test_the_python_versions_directory_gets_a_hint(tmp_path):
    (tmp_path / "cifar-10-batches-py").mkdir()
    (tmp_path / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"\x80\x02}q\x00.")
    one_line_error(tmp_path, "no data_batch_1.bin", "pickled 'python version'")
    one_line_error(tmp_path / "cifar-10-batches-py", "no data_batch_1.bin",
                   "pickled 'python version'")


def test_an_unreadable_file(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2.bin"
    path.unlink()
    path.mkdir()   # root reads any file; a directory in its place cannot be read
    one_line_error(tmp_path, str(path), "cannot read it")


def test_refused_before_reading_when_it_cannot_fit(tmp_path, monkeypatch):
    from pipeline import limits
    write_cifar(tmp_path)
    monkeypatch.setattr(limits, "available_bytes", lambda: 1000)
    one_line_error(tmp_path, str(tmp_path), "GiB of data, more than")


def test_memory_is_the_files_plus_the_float32_output(tmp_path):
    """One batch file's bytes at a time beside the output, never a second
    copy of the data set (no float64, no concatenation of the images)."""
    import tracemalloc
    per_file = 200
    write_cifar(tmp_path, per_file)
    output = 6 * per_file * 3072 * 4
    tracemalloc.start()
    try:
        splits = load_cifar10(tmp_path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert sum(s.x.nbytes for s in splits.values()) == output
    assert peak < output + 2 * per_file * RECORD + (1 << 20), peak
