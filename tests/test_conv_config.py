"""--conv and --kernel: the shapes a run's layers pass on, and the settings
refused before anything starts, each in one line naming its option."""
from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import Config, ConfigError
from pipeline.run import cli

MNIST = dict(dataset="mnist", data_dir="d", features=784, classes=10, examples=100,
             image=(28, 28, 1))


def test_shapes_from_the_image_through_each_pool():
    cfg = Config(**MNIST, conv=(16, 32), layers=4, hidden=(256,))
    assert cfg.conv_shapes() == [(28, 28, 1), (14, 14, 16), (7, 7, 32)]
    assert cfg.shapes == [(784,), (14, 14, 16), (7, 7, 32), (256,), (10,)]
    assert cfg.dims == [784, 14 * 14 * 16, 7 * 7 * 32, 256, 10]
    odd = Config(**{**MNIST, "image": (7, 5, 3), "features": 105}, conv=(4, 4), layers=3)
    assert odd.shapes[1:3] == [(3, 2, 4), (1, 1, 4)]   # a last odd row or column is dropped
    assert odd.hidden == ()                          # every hidden layer convolutional


@pytest.mark.parametrize("change, option, words", [
    (dict(kernel=4), "--kernel", "odd"),
    (dict(conv=(8, 8, 8, 8, 8), layers=6), "--conv", "nothing of a 28 x 28 image"),
    (dict(conv=(8, 8, 8), layers=3), "--conv", "--layers 4 or more"),
    (dict(conv=(0,)), "--conv", "positive"),
    (dict(layernorm=True, batchnorm=False), "--layernorm", "dense layers"),
    (dict(unlock="forward"), "--unlock", "dense layers only"),
    (dict(sg_lookahead=1.0), "--sg-lookahead", "dense layers"),
    (dict(image=(), features=784), "--conv", "flat data"),
    (dict(image=(28, 27, 1)), "--dataset", "not 784 features"),
])
def test_a_bad_setting_is_one_line_naming_its_option(change, option, words):
    settings = {**MNIST, "conv": (8,), "layers": 3, "hidden": (16,), **change}
    with pytest.raises(ConfigError) as err:
        Config(**settings)
    assert err.value.option == option and words in str(err.value)
    assert "\n" not in str(err.value)


def test_the_addition_task_takes_no_conv(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.parse(["--conv", "8", "--layers", "3"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--conv" in err and "image data" in err


def test_a_flat_dataset_with_conv_is_one_line(tmp_path, capsys):
    path = tmp_path / "flat.npz"
    rng = np.random.default_rng(0)
    np.savez(path, x_train=rng.random((20, 12), dtype=np.float32),
             y_train=rng.integers(0, 2, 20))
    with pytest.raises(SystemExit) as stop:
        cli.parse(["--dataset", f"npz:{path}", "--conv", "4", "--layers", "2"])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "flat data" in err


def test_a_config_with_conv_goes_through_its_dict():
    cfg = Config(**MNIST, conv=(16, 32), layers=4, hidden=(256,), kernel=3)
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("mode", ["cdni", "backprop"])
def test_a_frozen_layer_keeps_its_initial_weights_and_the_others_learn(mode):
    from pipeline.layers.build import make_hidden, make_output
    from tests.kit import reference
    cfg = Config(layers=3, freeze=(1, 3), epochs=3, mode=mode)
    result = reference(cfg)
    first, second = result.hidden
    for got, fresh in ((first, make_hidden(cfg, 1)), (result.output, make_output(cfg))):
        for name in ("w", "b"):
            assert np.array_equal(got.weights()[name], fresh.weights()[name]), name
        assert got.stats.weight_updates == 0 and got.stats.skipped_updates > 0
    assert not np.array_equal(second.w, make_hidden(cfg, 2).w)
    with pytest.raises(ConfigError, match="--freeze"):
        Config(layers=3, freeze=(4,))
