"""Classification data from files: MNIST-format IDX (plain or .gz, as MNIST
and Fashion-MNIST ship), CIFAR-10's binary version and NumPy archives,
checked on load."""
from __future__ import annotations

import contextlib
import gzip
import math
import os
import shlex
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import limits

npformat = np.lib.format
_NPY_HEADERS = {(1, 0): npformat.read_array_header_1_0, (2, 0): npformat.read_array_header_2_0}

# IDX magic: two zero bytes, a type code, the number of dimensions.
_IDX_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
MNIST_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
               "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

# CIFAR-10, binary version: records of a label byte, then 32x32 red, green and
# blue planes, each row-major. The official tarball unpacks into CIFAR_SUBDIR.
CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
               "test": ("test_batch.bin",)}
CIFAR_SUBDIR = "cifar-10-batches-bin"
CIFAR_SHAPE = (32, 32, 3)
CIFAR_RECORD = 1 + 32 * 32 * 3   # 3,073 bytes
_PICKLE_MAGIC = 0x80             # first byte of a pickle (protocol 2 and later)


@dataclass(frozen=True)
class Split:
    x: np.ndarray   # (n, features) float32 in [0, 1]
    y: np.ndarray   # (n,) int64 class labels
    # (H, W, C) of each example, channels last, or () for flat data; x holds
    # the images flattened row-major, so x.reshape(n, *shape) is NHWC.
    shape: tuple[int, ...] = ()

    def __post_init__(self):
        # our invariant: the shape folds a row of x back into one example
        assert not self.shape or math.prod(self.shape) == self.x.shape[1], \
            (self.shape, self.x.shape)


class _Refused(ValueError):
    """A file refused with a message that already names it."""


def _fail(path: Path, message: str) -> ValueError:
    return _Refused(f"{path}: {message}")


def _check_fits(path: Path, nbytes: int) -> None:
    """ValueError naming the file when what it declares exceeds the memory there is."""
    have = limits.available_bytes()
    if nbytes > have:
        raise _fail(path, f"declares {nbytes / (1 << 30):.1f} GiB of data, more than the "
                          f"{have / (1 << 30):.1f} GiB of memory available")


def read_idx(path: str | Path) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as an array of its shape. The
    header is read first; a compressed file is streamed, and never expanded
    beyond the size its header declares."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
            raw.seek(0)
            f = gzip.GzipFile(fileobj=raw) if gz else raw
            return _read_idx_stream(path, f, None if gz else os.fstat(raw.fileno()).st_size)
    except OSError as exc:  # gzip.BadGzipFile is one
        raise _fail(path, f"cannot read it ({exc.strerror or exc})") from None
    except (EOFError, zlib.error):
        raise _fail(path, "truncated gzip stream, or corrupt") from None
    except MemoryError:  # what it declares fits the estimate, not the machine
        raise _fail(path, "too large for this machine's memory") from None


def _read_idx_stream(path: Path, f, size: int | None) -> np.ndarray:
    head = f.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] not in _IDX_TYPES:
        raise _fail(path, f"not an IDX file (magic bytes {head.hex() or 'missing'})")
    ndim = head[3]
    dims = f.read(4 * ndim)
    if ndim == 0 or len(dims) < 4 * ndim:
        raise _fail(path, f"IDX header truncated or empty ({ndim} dimensions)")
    shape = tuple(int.from_bytes(dims[4 * i: 4 * i + 4], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_TYPES[head[2]])
    want = math.prod(shape) * dtype.itemsize  # Python ints: no wrap-around
    body = 4 + 4 * ndim
    if size is not None and size - body != want:
        raise _fail(path, f"header says {shape} of {dtype} ({want} bytes), "
                          f"file holds {size - body} bytes: truncated or not this format")
    _check_fits(path, want)
    data = f.read(want)
    if len(data) != want or f.read(1):
        got = f"{len(data)}" if len(data) != want else f"more than {want}"
        raise _fail(path, f"header says {shape} of {dtype} ({want} bytes), "
                          f"file holds {got} bytes: truncated or not this format")
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def _fetch_hint(dataset: str, directory: Path) -> str:
    """What a missing-data error ends with: the command that downloads the files."""
    what = {"mnist": "MNIST there (data fashion-mnist: Fashion-MNIST)",
            "cifar10": "CIFAR-10 there"}[dataset]
    return f"python launch.py data {dataset} {shlex.quote(str(directory))} downloads {what}"


def _check_directory(directory: Path, dataset: str) -> None:
    if not directory.is_dir():
        raise ValueError(f"{directory}: " + ("not a directory" if directory.exists() else
                                              f"no such directory; {_fetch_hint(dataset, directory)}"))


def _find(directory: Path, name: str) -> Path:
    # Some copies spell train-images-idx3-ubyte as train-images.idx3-ubyte.
    dotted = name.replace("-idx", ".idx")
    for candidate in (name, f"{name}.gz", dotted, f"{dotted}.gz"):
        if (directory / candidate).exists():
            return directory / candidate
    raise ValueError(f"{directory}: no {name} (or {name}.gz) here; "
                     f"{_fetch_hint('mnist', directory)}")


def _image_shape(x: np.ndarray) -> tuple[int, ...]:
    """(H, W, C) of each example of x: (n, H, W) is one channel, (n, H, W, C)
    channels last; anything else is flat data, ()."""
    if x.ndim == 3:
        return (*x.shape[1:], 1)
    return tuple(x.shape[1:]) if x.ndim == 4 else ()


def _split(x: np.ndarray, y: np.ndarray, where: str, classes: int | None) -> Split:
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{where}: {len(x)} inputs of shape {x.shape[1:]} but labels of "
                         f"shape {y.shape}: they must pair up one to one")
    if len(y) == 0:
        raise ValueError(f"{where}: no examples")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got {y.dtype}")
    top = classes if classes is not None else int(y.max()) + 1
    if y.min() < 0 or y.max() >= top:
        raise ValueError(f"{where}: labels must lie in 0..{top - 1}, "
                         f"found {int(y.min())}..{int(y.max())}")
    shape = _image_shape(x)
    x = x.reshape(len(x), -1)
    if np.issubdtype(x.dtype, np.integer):
        x = x.astype(np.float32) / np.float32(np.iinfo(x.dtype).max)  # pixels to [0, 1]
    else:
        x = x.astype(np.float32)
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{where}: inputs hold NaN or infinity")
    return Split(x, y.astype(np.int64), shape)


def load_mnist(directory: str | Path, classes: int = 10) -> dict[str, Split]:
    """{"train": Split, "test": Split} from the four MNIST (or Fashion-MNIST)
    IDX files in ``directory``, plain or .gz; images of shape (rows, cols, 1)."""
    directory = Path(directory)
    _check_directory(directory, "mnist")
    out = {}
    for part, (images, labels) in MNIST_FILES.items():
        xi, yi = _find(directory, images), _find(directory, labels)
        x, y = read_idx(xi), read_idx(yi)
        if x.ndim != 3:
            raise _fail(xi, f"images must be 3-d (n, rows, cols), got shape {x.shape}")
        if y.ndim != 1:
            raise _fail(yi, f"labels must be 1-d, got shape {y.shape}")
        out[part] = _split(x, y, f"{xi.name} / {yi.name}", classes)
    return out


def _cifar_directory(directory: Path) -> Path:
    """Where the batch files are: ``directory`` itself, or the subdirectory
    the official tarball unpacks to."""
    names = [n for files in CIFAR_FILES.values() for n in files]
    _check_directory(directory, "cifar10")
    inner = directory / CIFAR_SUBDIR
    if not any((directory / n).exists() for n in names) and inner.is_dir():
        return inner
    return directory


def _open_cifar(directory: Path, name: str, stack: contextlib.ExitStack):
    """(path, open file, records) for one batch file, checked on its size and
    first byte before any record is read."""
    path = directory / name
    if not path.exists():
        pickled = (directory / name.removesuffix(".bin"), directory / "cifar-10-batches-py")
        hint = (" (this looks like the pickled 'python version'; use the binary version)"
                if any(p.exists() for p in pickled) else "")
        raise ValueError(f"{directory}: no {name} here (nor in {CIFAR_SUBDIR}/){hint}; "
                         f"{_fetch_hint('cifar10', directory)}")
    try:
        f = stack.enter_context(open(path, "rb"))
        size = os.fstat(f.fileno()).st_size
        first = f.read(1)
    except OSError as exc:
        raise _fail(path, f"cannot read it ({exc.strerror or exc})") from None
    if size == 0:
        raise _fail(path, "empty file: no CIFAR-10 records")
    if first and first[0] == _PICKLE_MAGIC:
        raise _fail(path, "starts with the pickle marker 0x80: this is the pickled "
                          "'python version'; use the binary version")
    if size % CIFAR_RECORD:
        raise _fail(path, f"{size} bytes is not a whole number of {CIFAR_RECORD}-byte records "
                          f"({size // CIFAR_RECORD} records and {size % CIFAR_RECORD} bytes over): "
                          "truncated or not CIFAR-10's binary version")
    return path, f, size // CIFAR_RECORD


def _read_cifar(path: Path, f, n: int, out: np.ndarray) -> np.ndarray:
    """The n records of an open batch file: pixels into out (n, 3072) as HWC
    float32 in [0, 1]; returns the labels. Reads exactly n records."""
    try:
        f.seek(0)
        data = f.read(n * CIFAR_RECORD)
    except OSError as exc:
        raise _fail(path, f"cannot read it ({exc.strerror or exc})") from None
    if len(data) != n * CIFAR_RECORD:
        raise _fail(path, f"holds {len(data)} bytes, {n * CIFAR_RECORD} a moment ago: "
                          "changed while being read")
    records = np.frombuffer(data, np.uint8).reshape(n, CIFAR_RECORD)
    labels = records[:, 0]
    bad = np.flatnonzero(labels > 9)
    if bad.size:
        raise _fail(path, f"record {bad[0]} has label {labels[bad[0]]}: CIFAR-10's labels are "
                          "0..9 (not CIFAR-10's binary version?)")
    chw = records[:, 1:].reshape(n, 3, 32, 32)
    # (n, C, H, W) planes into (n, H, W, C) rows, scaled as _split scales pixels
    np.divide(chw.transpose(0, 2, 3, 1), np.float32(255), out=out.reshape(n, *CIFAR_SHAPE),
              dtype=np.float32)
    return labels.astype(np.int64)


def load_cifar10(directory: str | Path) -> dict[str, Split]:
    """{"train": Split, "test": Split} from CIFAR-10's binary version
    (data_batch_1.bin .. data_batch_5.bin, test_batch.bin) in ``directory`` or
    its cifar-10-batches-bin/; images of shape (32, 32, 3), channels last.
    Every file is checked on its size and first byte before any is read."""
    directory = _cifar_directory(Path(directory))
    with contextlib.ExitStack() as stack:
        opened = {part: [_open_cifar(directory, name, stack) for name in names]
                  for part, names in CIFAR_FILES.items()}
        n_all = sum(n for files in opened.values() for _, _, n in files)
        biggest = max(n for files in opened.values() for _, _, n in files) * CIFAR_RECORD
        _check_fits(directory, n_all * (CIFAR_RECORD - 1) * 4 + n_all * 8 + biggest)
        out = {}
        try:
            for part, files in opened.items():
                x = np.empty((sum(n for _, _, n in files), CIFAR_RECORD - 1), np.float32)
                y, start = [], 0
                for path, f, n in files:
                    y.append(_read_cifar(path, f, n, x[start:start + n]))
                    start += n
                out[part] = Split(x, np.concatenate(y), CIFAR_SHAPE)
        except MemoryError:
            raise _fail(directory, "too large for this machine's memory") from None
    return out


def _check_npz_members(path: Path) -> None:
    """Every array's header, before any array is read: real numbers only, and
    no more than the memory there is."""
    with zipfile.ZipFile(path) as z:
        total = 0
        for info in z.infolist():
            with z.open(info) as f:
                version = npformat.read_magic(f)
                read = _NPY_HEADERS.get(version)
                if read is None:
                    raise _fail(path, f"{info.filename}: .npy format {version} not supported")
                shape, _, dtype = read(f)
            if dtype.kind not in "biuf":
                raise _fail(path, f"{info.filename}: arrays must hold real numbers, "
                                  f"got {dtype}")
            total += math.prod(shape) * dtype.itemsize
        _check_fits(path, total)


def load_npz(path: str | Path) -> dict[str, Split]:
    """{"train": Split[, "test": Split]} from an archive with x_train, y_train
    and optionally x_test, y_test (integer class labels). Inputs of shape
    (n, features) are flat data; (n, H, W) are one-channel images, shape
    (H, W, 1); (n, H, W, C) are images with channels last (NHWC, not NCHW),
    shape (H, W, C). Each split is flattened row-major to (n, features)."""
    path = Path(path)
    try:
        _check_npz_members(path)
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except _Refused:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise _fail(path, f"not a readable NumPy archive ({exc})") from None
    except MemoryError:
        raise _fail(path, "too large for this machine's memory") from None
    for key in ("x_train", "y_train"):
        if key not in arrays:
            raise _fail(path, f"needs arrays x_train and y_train; has {sorted(arrays)}")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise _fail(path, "x_test and y_test come together or not at all")
    classes = int(max(arrays["y_train"].max(initial=0), arrays.get("y_test", np.zeros(1, int)).max(initial=0))) + 1
    out = {"train": _split(arrays["x_train"], arrays["y_train"], f"{path} train", classes)}
    if "x_test" in arrays:
        out["test"] = _split(arrays["x_test"], arrays["y_test"], f"{path} test", classes)
        if out["test"].x.shape[1] != out["train"].x.shape[1]:
            raise _fail(path, "x_test and x_train have different numbers of features")
    return out
