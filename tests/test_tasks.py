"""What a run trains on: datasets resolved from their files at launch, loaded
in the run's dtype with one-hot labels, and batches reshuffled per epoch."""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from pipeline.data import tasks
from pipeline.nodes import schedule
from pipeline.run import cli
from pipeline.config import Config, ConfigError
from tests.conftest import error_line, run_launch


def idx(path, array: np.ndarray, gz: bool = False) -> None:
    code = {np.dtype(np.uint8): 0x08}[array.dtype]
    head = bytes([0, 0, code, array.ndim]) + b"".join(
        int(n).to_bytes(4, "big") for n in array.shape)
    raw = head + array.tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for part, n in (("train", 30), ("t10k", 12)):
        idx(tmp_path / f"{part}-images-idx3-ubyte.gz",
            rng.integers(0, 256, (n, 4, 5), dtype=np.uint8), gz=True)
        idx(tmp_path / f"{part}-labels-idx1-ubyte",
            rng.integers(0, 10, n, dtype=np.uint8))
    return tmp_path


def test_mnist_resolves_from_its_files(mnist_dir):
    cfg = cli.parse(["--dataset", "mnist", "--data-dir", str(mnist_dir)])
    assert (cfg.features, cfg.classes, cfg.examples, cfg.test_examples) == (20, 10, 30, 12)
    assert cfg.dims == [20, 256, 256, 10]
    assert (cfg.dtype, cfg.optimizer, cfg.activation, cfg.shuffle, cfg.batch_size,
            cfg.batchnorm) == ("float32", "adam", "relu", True, 256, True)
    task = tasks.load(cfg)
    assert task.x.dtype == np.float32 and task.x.shape == (30, 20)
    assert 0 <= task.x.min() and task.x.max() <= 1
    # One-hot labels, the file's labels at the hot positions.
    labels = np.frombuffer(
        (mnist_dir / "train-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    assert np.array_equal(task.y.argmax(1), labels) and np.all(task.y.sum(1) == 1)
    assert task.test_x.shape == (12, 20) and task.test_y.shape == (12, 10)


def test_examples_takes_the_first_n_and_no_more_than_there_are(mnist_dir):
    cfg = cli.parse(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--examples", "7"])
    assert cfg.examples == 7 and tasks.load(cfg).x.shape == (7, 20)
    with pytest.raises(ConfigError, match="30 training examples, asked for 31"):
        tasks.resolve(Config(dataset="mnist", data_dir=str(mnist_dir), examples=31))


def test_options_said_on_the_command_line_beat_the_task_defaults(mnist_dir):
    cfg = cli.parse(["--dataset", "mnist", "--data-dir", str(mnist_dir), "--lr", "0.1",
                     "--optimizer", "sgd", "--dtype", "float64", "--no-shuffle",
                     "--activation", "sigmoid", "--hidden", "9", "--no-batchnorm"])
    assert (cfg.lr, cfg.optimizer, cfg.dtype, cfg.shuffle, cfg.activation, cfg.hidden,
            cfg.batchnorm) == (0.1, "sgd", "float64", False, "sigmoid", (9, 9), False)
    assert tasks.load(cfg).x.dtype == np.float64
    # And the addition task keeps the notebook's settings.
    seed = cli.parse([])
    assert (seed.lr, seed.optimizer, seed.dtype, seed.shuffle, seed.batch_size,
            seed.batchnorm) == (0.5, "sgd", "float64", False, 10, False)
    assert cli.parse(["--batchnorm"]).batchnorm


def test_npz_without_a_test_split(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, x_train=np.arange(24.0).reshape(8, 3), y_train=np.array([0, 1, 2] * 2 + [0, 1]))
    cfg = tasks.resolve(Config(dataset=f"npz:{path}", examples=8))
    assert (cfg.features, cfg.classes, cfg.test_examples) == (3, 3, 0)
    assert tasks.load(cfg).test_x is None


def test_shuffled_batches_are_a_fresh_permutation_each_epoch():
    cfg = Config(examples=23, batch_size=5, shuffle=True, seed=4)
    epochs = [schedule.epoch_batches(cfg, e) for e in range(3)]
    for batches in epochs:
        assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
        assert sorted(np.concatenate(batches).tolist()) == list(range(23))
    flat = [np.concatenate(b).tolist() for b in epochs]
    assert flat[0] != flat[1] != flat[2]
    # The same seed and epoch give the same order in every process.
    assert [b.tolist() for b in schedule.epoch_batches(cfg, 1)] == [b.tolist() for b in epochs[1]]
    # Without shuffle: the notebook's fixed order.
    plain = schedule.epoch_batches(Config(examples=23, batch_size=5), 2)
    assert [(s.start, s.stop) for s in plain] == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]


@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--dataset", "mnist"], "--data-dir: --dataset mnist needs --data-dir"),
    (["--dataset", "cifar"], "--dataset: must be addition, mnist, cifar10 or npz:PATH"),
    (["--dataset", "npz:"], "--dataset: must be addition, mnist, cifar10 or npz:PATH"),
    (["--data-dir", "x"], "--data-dir"),
    (["--dataset", "mnist", "--data-dir", "/nonexistent-dir"],
     "/nonexistent-dir: no such directory; python launch.py data mnist /nonexistent-dir "
     "downloads MNIST there"),
    (["--dataset", "npz:/nonexistent.npz"], "not a readable NumPy archive"),
    (["--sg-hidden", "0"], "--sg-hidden: widths must be positive"),
    (["--optimizer", "rmsprop"], "--optimizer"),
    (["--dtype", "float16"], "--dtype"),
])
def test_bad_data_options_get_one_clear_line(args, message):
    line = error_line(run_launch(*args))
    assert message in line and "Traceback" not in line, line


@pytest.mark.slow
def test_a_truncated_image_file_names_the_file(mnist_dir):
    path = mnist_dir / "t10k-labels-idx1-ubyte"
    path.write_bytes(path.read_bytes()[:-3])
    proc = run_launch("--dataset", "mnist", "--data-dir", str(mnist_dir))
    assert proc.returncode == 2
    assert "t10k-labels-idx1-ubyte" in proc.stderr and "truncated" in proc.stderr


# Limits: checked before anything starts, one line naming the option.

def test_layers_beyond_the_hard_bound_are_refused():
    from pipeline import limits
    with pytest.raises(ConfigError, match=f"--layers: at most {limits.MAX_LAYERS}, got 1025"):
        tasks.resolve(Config(layers=1025, hidden=(64,)))


def test_a_run_bigger_than_memory_names_what_to_shrink(monkeypatch):
    from pipeline import limits
    monkeypatch.setattr(limits, "available_bytes", lambda: 2 << 30)
    tasks.resolve(Config(layers=3))                       # 5 processes: fits in 2 GiB
    with pytest.raises(ConfigError, match=r"--layers: a run this size needs about 3\.9 GiB "
                                          r"\(62 processes\)"):
        tasks.resolve(Config(layers=60, hidden=(64,)))                  # the 62 processes
    tasks.resolve(Config(layers=60, hidden=(64,), in_process=True))      # one process: fits
    with pytest.raises(ConfigError, match=r"--hidden: a run this size needs about \d+\.\d GiB"):
        tasks.resolve(Config(hidden=(200_000,)))


def test_estimate_covers_the_arrays_it_counts():
    """Independent count for one layer of the addition task: weights and bias,
    SGD with no momentum (one slot), the SG module of a cDNI layer."""
    from pipeline import limits
    cfg = Config()
    d = cfg.dims
    params = (d[0] + 1) * d[1] + (d[1] + d[-1] + 1) * d[1]
    assert limits._layer_bytes(cfg, 1) >= params * cfg.np_dtype.itemsize


def test_more_classes_than_the_bound_is_one_line(tmp_path):
    from pipeline import limits
    y = np.array([0, limits.MAX_CLASSES])
    np.savez(tmp_path / "labels.npz", x_train=np.zeros((2, 3)), y_train=y)
    with pytest.raises(ConfigError, match=f"labels name {limits.MAX_CLASSES + 1} classes"):
        tasks.resolve(Config(dataset=f"npz:{tmp_path / 'labels.npz'}", examples=2))
