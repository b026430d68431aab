"""Where each dataset's standard files come from: the public mirrors, and
each file's published size and SHA-256 (docs/mnist.md#getting-the-data
says where every value was found). Data only; ``download`` fetches."""
from __future__ import annotations

from dataclasses import dataclass

from pipeline.data.files import CIFAR_FILES, CIFAR_RECORD, CIFAR_SUBDIR, MNIST_FILES


@dataclass(frozen=True)
class Remote:
    """One file as its mirrors publish it."""
    name: str     # the name on every mirror and on disk
    size: int     # bytes, as published beside the checksum
    sha256: str   # lower-case hex, as published


@dataclass(frozen=True)
class Dataset:
    name: str                     # the word after ``launch.py data``
    mirrors: tuple[str, ...]      # base URLs, tried in this order; a file's URL is base + name
    files: tuple[Remote, ...]
    # An archive's members to take out, as (path inside the archive, size);
    # each is written to DIR/<path inside>. Every other member is left in.
    members: tuple[tuple[str, int], ...] = ()
    dataset_option: str = ""      # what ``launch.py`` trains on it with, for the closing line


def _mnist_format(sizes_and_digests: dict[str, tuple[int, str]]) -> tuple[Remote, ...]:
    """The four IDX files of the MNIST format, gzip-compressed, in the readers' order."""
    names = [f"{n}.gz" for pair in MNIST_FILES.values() for n in pair]
    assert sorted(names) == sorted(sizes_and_digests), names  # our table's invariant
    return tuple(Remote(n, *sizes_and_digests[n]) for n in names)


# Sizes and SHA-256 from TensorFlow Datasets' url_checksums/mnist.txt; the
# mirrors are torchvision's (Meta's bucket) and TensorFlow Datasets' (CVDF).
MNIST = Dataset(
    "mnist",
    ("https://ossci-datasets.s3.amazonaws.com/mnist/",
     "https://storage.googleapis.com/cvdf-datasets/mnist/"),
    _mnist_format({
        "train-images-idx3-ubyte.gz":
            (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz":
            (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz":
            (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz":
            (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    }),
    dataset_option="--dataset mnist")

# Sizes and SHA-256 from TensorFlow Datasets' url_checksums/fashion_mnist.txt;
# the mirror is the authors' bucket (zalandoresearch/fashion-mnist's README,
# torchvision's FashionMNIST). Plain HTTP there: the checksum is the guard.
FASHION_MNIST = Dataset(
    "fashion-mnist",
    ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
    _mnist_format({
        "train-images-idx3-ubyte.gz":
            (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz":
            (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz":
            (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz":
            (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    }),
    dataset_option="--dataset mnist")

# The binary version's one archive, from the University of Toronto's page;
# size and SHA-256 from TensorFlow Datasets' url_checksums/cifar10.txt. Each
# batch file holds 10,000 records.
CIFAR10 = Dataset(
    "cifar10",
    ("https://www.cs.toronto.edu/~kriz/",),
    (Remote("cifar-10-binary.tar.gz", 170052171,
            "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"),),
    members=tuple((f"{CIFAR_SUBDIR}/{n}", 10_000 * CIFAR_RECORD)
                  for names in CIFAR_FILES.values() for n in names),
    dataset_option="--dataset cifar10")

DATASETS = {d.name: d for d in (MNIST, FASHION_MNIST, CIFAR10)}
