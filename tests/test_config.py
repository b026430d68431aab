"""Tests for pipeline.config and pipeline.cli: every rejection names its flag; launch.py's argv handling."""
from __future__ import annotations

import dataclasses
import json
import math

import pytest

from pipeline.cli import parse
from pipeline.config import Config, ConfigError
from tests.conftest import error_line, run_launch

pytestmark = pytest.mark.timeout(60)


# --- Config -----------------------------------------------------------------------------

INVALID = [
    (dict(layers=1), "--layers"),
    (dict(layers=0, hidden=(8,)), "--layers"),
    (dict(layers=-2, hidden=(8,)), "--layers"),
    (dict(layers=4, hidden=(128, 64)), "--hidden"),
    (dict(layers=3, hidden=(1, 2, 3)), "--hidden"),
    (dict(layers=3, hidden=()), "--hidden"),
    (dict(layers=3, hidden=(0,)), "--hidden"),
    (dict(layers=3, hidden=(16, -1)), "--hidden"),
    (dict(mode="foo"), "--mode"),
    (dict(mode="DNI"), "--mode"),
    (dict(activation="tanh"), "--activation"),
    (dict(epochs=0), "--epochs"),
    (dict(epochs=-5), "--epochs"),
    (dict(batch_size=0), "--batch-size"),
    (dict(lr=0.0), "--lr"),
    (dict(lr=-1.0), "--lr"),
    (dict(lr=math.nan), "--lr"),
    (dict(sg_lr=0.0), "--sg-lr"),
    (dict(sg_lr=-0.01), "--sg-lr"),
    (dict(sg_lr=math.nan), "--sg-lr"),
    (dict(seed=-1), "--seed"),
    (dict(seed=2 ** 32), "--seed"),
    (dict(bits=1), "--bits"),
    (dict(bits=63), "--bits"),
    (dict(examples=0), "--examples"),
    (dict(max_inflight=0), "--max-inflight"),
    (dict(blas_threads=0), "--blas-threads"),
    # staleness injection
    (dict(mode="backprop", grad_delay=1), "--grad-delay"),
    (dict(mode="async-backprop", grad_delay=-1), "--grad-delay"),
    (dict(grad_delay=-1), "--grad-delay"),
    (dict(link_delay_ms=-1.0), "--link-delay"),
    (dict(link_delay_ms=5.0, link_jitter_ms=5.5), "--link-delay"),
    (dict(link_delay_ms=5.0, link_jitter_ms=-1.0), "--link-delay"),
    (dict(link_jitter_ms=1.0), "--link-delay"),
    (dict(delay_activations=True), "--delay-activations"),
    (dict(slow=((0, 2.0),)), "--slow"),
    (dict(slow=((4, 2.0),)), "--slow"),
    (dict(layers=2, hidden=(8,), slow=((3, 2.0),)), "--slow"),
    (dict(slow=((2, 0.5),)), "--slow"),
    (dict(slow=((2, 0.0),)), "--slow"),
    (dict(slow=((2, 2.0), (2, 3.0))), "--slow"),
    (dict(slow=((1, 2.0), (3, 2.0), (1, 2.0))), "--slow"),
    (dict(update_prob=-0.1), "--update-prob"),
    (dict(update_prob=1.5), "--update-prob"),
    (dict(update_prob=math.nan), "--update-prob"),
    (dict(drop_prob=-0.01), "--drop-prob"),
    (dict(drop_prob=1.01), "--drop-prob"),
    (dict(link_delay_ms=5.0, in_process=True), "--in-process"),
    (dict(slow=((1, 2.0),), in_process=True), "--in-process"),
    # momentum and the staleness remedies
    (dict(momentum=-0.1), "--momentum"),
    (dict(momentum=1.0), "--momentum"),
    (dict(momentum=0.9, optimizer="adam"), "--momentum"),
    (dict(sg_boost=-1.0), "--sg-boost"),
    (dict(sg_boost=math.inf), "--sg-boost"),
    (dict(lr_staleness=-0.5), "--lr-staleness"),
    (dict(sg_lookahead=-1.0), "--sg-lookahead"),
    (dict(delay_comp=-0.1), "--delay-comp"),
    (dict(mode="async-backprop", sg_boost=1.0), "--sg-boost"),
    (dict(mode="backprop", sg_lookahead=1.0), "--sg-lookahead"),
    (dict(mode="backprop", lr_staleness=1.0), "--lr-staleness"),
    (dict(mode="cdni", delay_comp=0.5), "--delay-comp"),
    (dict(mode="backprop", delay_comp=0.5), "--delay-comp"),
]


@pytest.mark.parametrize("kw, flag", INVALID, ids=[f"{f}:{kw}" for kw, f in INVALID])
def test_invalid_field_raises_config_error_naming_flag(kw, flag):
    with pytest.raises(ConfigError) as info:
        Config(**kw)
    assert info.value.option == flag
    assert str(info.value).startswith(f"argument {flag}: ")
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("kw", [
    dict(seed=0), dict(seed=2 ** 32 - 1), dict(bits=2), dict(bits=62),
    dict(layers=2, hidden=(7,)), dict(layers=2, hidden=[7]), dict(epochs=1, batch_size=1, examples=1),
    dict(lr=1e-9, sg_lr=1e-9), dict(max_inflight=1, blas_threads=1), dict(mode="backprop"),
    dict(mode="dni", activation="relu"), dict(mode="async-backprop"),
    dict(mode="async-backprop", grad_delay=3), dict(mode="cdni", grad_delay=1),
    dict(link_delay_ms=5.0, link_jitter_ms=5.0), dict(link_delay_ms=0.5, delay_activations=True),
    dict(link_delay_ms=0.0, link_jitter_ms=0.0), dict(slow=((1, 1.0), (3, 2.5))),
    dict(update_prob=0.0, drop_prob=0.0), dict(update_prob=1.0, drop_prob=1.0),
    # what is not wall-clock runs in process too
    dict(in_process=True, grad_delay=2, update_prob=0.5, drop_prob=0.5, mode="async-backprop"),
])
def test_boundary_values_are_accepted(kw):
    cfg = Config(**kw)
    for k, v in kw.items():
        assert getattr(cfg, k) == (tuple(v) if k == "hidden" else v)


def test_slow_pairs_are_normalised():
    cfg = Config(slow=[[2, 3], [1, 1.5]])
    assert cfg.slow == ((2, 3.0), (1, 1.5))
    assert all(type(i) is int and type(f) is float for i, f in cfg.slow)
    assert (cfg.slowdown(1), cfg.slowdown(2), cfg.slowdown(3)) == (1.5, 3.0, 1.0)
    assert Config().slowdown(1) == 1.0


@pytest.mark.parametrize("layers, hidden, want", [
    (2, (32,), (32,)),
    (3, (32,), (32, 32)),
    (5, (8,), (8, 8, 8, 8)),
    (3, [16, 4], (16, 4)),
    (4, (3, 2, 1), (3, 2, 1)),
])
def test_hidden_widths_single_repeats(layers, hidden, want):
    cfg = Config(layers=layers, hidden=hidden)
    assert cfg.hidden == want
    assert type(cfg.hidden) is tuple and all(type(h) is int for h in cfg.hidden)


@pytest.mark.parametrize("kw, dims, bpe, total", [
    (dict(), [16, 128, 64, 8], 10, 8000),
    (dict(bits=4, layers=4, hidden=(5,), examples=25, batch_size=10, epochs=3),
     [8, 5, 5, 5, 4], 3, 9),
    (dict(bits=3, layers=2, hidden=(2,), examples=7, batch_size=7, epochs=2), [6, 2, 3], 1, 2),
    (dict(examples=1, batch_size=10, epochs=4), [16, 128, 64, 8], 1, 4),
])
def test_derived_sizes(kw, dims, bpe, total):
    cfg = Config(**kw)
    assert cfg.dims == dims
    assert cfg.batches_per_epoch == bpe
    assert cfg.total_batches == total


def test_defaults_are_the_seed_task():
    cfg = Config()
    assert (cfg.layers, cfg.hidden, cfg.activation, cfg.bits, cfg.examples, cfg.batch_size) == \
        (3, (128, 64), "sigmoid", 8, 100, 10)
    assert cfg.mode == "cdni"


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().layers = 5  # type: ignore[misc]


@pytest.mark.parametrize("kw", [
    dict(),
    dict(layers=4, hidden=(9,), mode="dni", activation="relu", epochs=3, batch_size=4, lr=0.25,
         sg_lr=0.001, seed=77, bits=5, examples=33, lockstep=True, max_inflight=2,
         blas_threads=3, in_process=True, run_dir="runs/x", quiet=True),
    dict(mode="async-backprop", grad_delay=2, link_delay_ms=3.5, link_jitter_ms=1.25,
         delay_activations=True, slow=((2, 3.0), (1, 1.5)), update_prob=0.5, drop_prob=0.125),
])
def test_to_dict_from_dict_round_trip_through_json(kw):
    cfg = Config(**kw)
    d = cfg.to_dict()
    assert set(d) == {f.name for f in dataclasses.fields(Config)}
    assert d["hidden"] == list(cfg.hidden)
    wire = json.loads(json.dumps(d))
    back = Config.from_dict(wire)
    assert back == cfg
    assert wire["hidden"] == list(cfg.hidden)  # from_dict does not mutate its input
    assert d["slow"] == [list(p) for p in cfg.slow]
    for k, v in kw.items():
        if k not in ("hidden", "slow"):
            assert d[k] == v


def test_from_dict_partial_uses_defaults():
    assert Config.from_dict({}) == Config()
    assert Config.from_dict({"mode": "dni", "hidden": [4]}).hidden == (4, 4)


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match="hiden"):
        Config.from_dict({"layers": 3, "hiden": [1, 2]})
    with pytest.raises(ValueError, match="learning_rate"):
        Config.from_dict({"learning_rate": 0.1})


def test_from_dict_still_validates():
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"layers": 1})
    assert info.value.option == "--layers"


@pytest.mark.parametrize("d, option", [
    ({"layers": "3"}, "--layers"), ({"hidden": 5}, "--hidden"), ({"hidden": ["8"]}, "--hidden"),
    ({"lr": "0.1"}, "--lr"), ({"lr": float("inf")}, "--lr"), ({"epochs": 2.5}, "--epochs"),
    ({"lockstep": 1}, "--lockstep"), ({"mode": 3}, "--mode"), ({"batch_size": True}, "--batch-size"),
    ({"grad_delay": 1.0}, "--grad-delay"), ({"update_prob": "1"}, "--update-prob"),
    ({"drop_prob": math.inf}, "--drop-prob"), ({"delay_activations": 1}, "--delay-activations"),
    ({"slow": "2:3"}, "--slow"), ({"slow": [[2]]}, "--slow"), ({"slow": [["2", 3.0]]}, "--slow"),
    ({"slow": [[2, True]]}, "--slow"), ({"slow": [[2, math.nan]]}, "--slow"),
    ({"slow": [[2.0, 3.0]]}, "--slow"), ({"slow": [[2, 3.0, 1]]}, "--slow"),
], ids=["layers-str", "hidden-int", "hidden-str", "lr-str", "lr-inf", "epochs-float",
        "lockstep-int", "mode-int", "batch-bool", "grad-delay-float", "update-prob-str",
        "drop-prob-inf", "delay-activations-int", "slow-str", "slow-short-pair",
        "slow-layer-str", "slow-factor-bool", "slow-factor-nan", "slow-layer-float",
        "slow-triple"])
def test_from_dict_rejects_wrong_types_with_value_error(d, option):
    # A config arrives over the wire in a worker's handshake: bad types are
    # bad input, refused with the flag named, never coerced.
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert info.value.option == option


@pytest.mark.parametrize("d", [{"link_delay_ms": math.nan}, {"link_delay_ms": math.inf},
                               {"link_delay_ms": 5.0, "link_jitter_ms": "1"}],
                         ids=["delay-nan", "delay-inf", "jitter-str"])
def test_wrong_link_delay_type_names_the_link_delay_flag(d):
    with pytest.raises(ConfigError) as info:
        Config.from_dict(d)
    assert info.value.option == "--link-delay"


# --- the command line, in process ---------------------------------------------------------

def test_parse_defaults_equal_config_defaults():
    assert parse([]) == Config()


def test_parse_every_option():
    argv = ["--layers", "4", "--hidden", "128", "--activation", "relu", "--mode", "backprop",
            "--epochs", "7", "--batch-size", "5", "--lr", "0.125", "--sg-lr", "0.0625",
            "--seed", "9", "--bits", "6", "--examples", "40", "--lockstep", "--max-inflight", "3",
            "--blas-threads", "2", "--in-process", "--run-dir", "out/r1", "--quiet"]
    assert parse(argv) == Config(
        layers=4, hidden=(128, 128, 128), activation="relu", mode="backprop", epochs=7,
        batch_size=5, lr=0.125, sg_lr=0.0625, seed=9, bits=6, examples=40, lockstep=True,
        max_inflight=3, blas_threads=2, in_process=True, run_dir="out/r1", quiet=True)


def test_parse_staleness_options():
    argv = ["--mode", "async-backprop", "--grad-delay", "2", "--link-delay", "5:1.5",
            "--delay-activations", "--slow", "2:3", "--slow", "1:1.5", "--update-prob", "0.5",
            "--drop-prob", "0.125", "--max-inflight", "4"]
    assert parse(argv) == Config(
        mode="async-backprop", grad_delay=2, link_delay_ms=5.0, link_jitter_ms=1.5,
        delay_activations=True, slow=((2, 3.0), (1, 1.5)), update_prob=0.5, drop_prob=0.125,
        max_inflight=4)


def test_parse_staleness_remedies():
    assert parse(["--sg-boost", "0.5", "--lr-staleness", "0.25", "--sg-lookahead", "1",
                  "--momentum", "0.9"]) == Config(sg_boost=0.5, lr_staleness=0.25,
                                                  sg_lookahead=1.0, momentum=0.9)
    assert parse(["--mode", "async-backprop", "--delay-comp", "0.04"]) == Config(
        mode="async-backprop", delay_comp=0.04)


@pytest.mark.parametrize("argv, fields", [
    (["--link-delay", "7"], dict(link_delay_ms=7.0, link_jitter_ms=0.0)),
    (["--link-delay", "0.25:0.25"], dict(link_delay_ms=0.25, link_jitter_ms=0.25)),
    (["--link-delay", "0"], dict(link_delay_ms=0.0, link_jitter_ms=0.0)),
    (["--slow", "3:1"], dict(slow=((3, 1.0),))),
    (["--slow", "1:2.5", "--slow", "3:4"], dict(slow=((1, 2.5), (3, 4.0)))),
    (["--grad-delay", "0", "--mode", "backprop"], dict(grad_delay=0, mode="backprop")),
    (["--grad-delay", "5"], dict(grad_delay=5)),                  # cdni by default
    (["--update-prob", "0", "--drop-prob", "1"], dict(update_prob=0.0, drop_prob=1.0)),
    (["--in-process", "--grad-delay", "1", "--drop-prob", "0.5"],
     dict(in_process=True, grad_delay=1, drop_prob=0.5)),
])
def test_parse_staleness_option_forms(argv, fields):
    assert parse(argv) == Config(**fields)


@pytest.mark.parametrize("argv, flag", [
    (["--slow", "2"], "--slow"), (["--slow", "x:2"], "--slow"), (["--slow", "2:3:4"], "--slow"),
    (["--link-delay", "a:b"], "--link-delay"), (["--link-delay", "5:"], "--link-delay"),
    (["--link-delay", "1:2:3"], "--link-delay"), (["--grad-delay", "1.5"], "--grad-delay"),
    (["--slow", "4:2"], "--slow"), (["--update-prob", "2"], "--update-prob"),
])
def test_parse_staleness_errors_in_process(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: " in err


@pytest.mark.parametrize("value", ["nan", "inf", "5:nan"])
def test_parse_non_finite_link_delay_names_the_flag(value, capsys):
    with pytest.raises(SystemExit):
        parse(["--link-delay", value])
    assert "argument --link-delay: " in capsys.readouterr().err


@pytest.mark.parametrize("argv, hidden", [
    (["--hidden", "128", "--layers", "4"], (128, 128, 128)),
    (["--hidden", "32,16,8", "--layers", "4"], (32, 16, 8)),
    (["--hidden", "5", "--layers", "2"], (5,)),
    (["--layers", "2"], (128,)),              # no --hidden: the seed's widths,
    (["--layers", "3"], (128, 64)),           # the last repeated for deeper nets
    (["--layers", "5"], (128, 64, 64, 64)),
])
def test_parse_hidden(argv, hidden):
    assert parse(argv).hidden == hidden


def test_parse_error_in_process_is_one_line_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        parse(["--layers", "1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--layers" in err


# --- the command line, as a user runs it ----------------------------------------------------

BAD_ARGS = [
    (["--layers", "1"], "--layers"),
    (["--layers", "0"], "--layers"),
    (["--hidden", "1,2,3", "--layers", "3"], "--hidden"),
    (["--hidden", "abc"], "--hidden"),
    (["--hidden", "128,,64"], "--hidden"),
    (["--hidden", "0"], "--hidden"),
    (["--hidden"], "--hidden"),
    (["--mode", "foo"], "--mode"),
    (["--activation", "tanh"], "--activation"),
    (["--epochs", "0"], "--epochs"),
    (["--epochs", "1.5"], "--epochs"),
    (["--lr", "-1"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--sg-lr", "0"], "--sg-lr"),
    (["--batch-size", "x"], "--batch-size"),
    (["--seed", "-1"], "--seed"),
    (["--bits", "63"], "--bits"),
    (["--examples", "0"], "--examples"),
    (["--max-inflight", "0"], "--max-inflight"),
    (["--blas-threads", "0"], "--blas-threads"),
    (["--bogus"], "--bogus"),
    (["--layers", "3", "extra"], "extra"),
]


@pytest.mark.parametrize("argv, flag", BAD_ARGS, ids=[" ".join(a) for a, _ in BAD_ARGS])
def test_launch_rejects_bad_args_in_one_line(argv, flag):
    proc = run_launch(*argv)
    line = error_line(proc)
    assert proc.stdout == ""
    assert line.startswith("launch.py: error: ")
    assert flag in line


STALENESS_BAD_ARGS = [
    (["--link-delay", "a:b"], "--link-delay"),
    (["--slow", "2"], "--slow"),
    (["--grad-delay", "1", "--mode", "backprop"], "--grad-delay"),
    (["--link-delay", "5:6"], "--link-delay"),
    (["--delay-activations"], "--delay-activations"),
    (["--slow", "9:2"], "--slow"),
    (["--update-prob", "1.5"], "--update-prob"),
    (["--drop-prob", "-0.5"], "--drop-prob"),
    (["--slow", "1:2", "--in-process"], "--in-process"),
    (["--sg-boost", "x"], "--sg-boost"),
    (["--delay-comp", "0.5"], "--delay-comp"),
    (["--momentum", "0.9", "--dataset", "addition", "--optimizer", "adam"], "--momentum"),
]


@pytest.mark.parametrize("argv, flag", STALENESS_BAD_ARGS,
                         ids=[" ".join(a) for a, _ in STALENESS_BAD_ARGS])
def test_launch_rejects_bad_staleness_args_in_one_line(argv, flag):
    proc = run_launch(*argv)
    line = error_line(proc)
    assert proc.stdout == ""
    assert line.startswith(f"launch.py: error: argument {flag}: "), line


def test_launch_help_lists_every_option():
    proc = run_launch("-h")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    for opt in ["--layers", "--hidden", "--mode", "--epochs", "--batch-size", "--lr", "--sg-lr",
                "--seed", "--lockstep", "--max-inflight", "--run-dir", "--quiet", "--bits",
                "--examples", "--in-process", "--activation", "--blas-threads",
                "--grad-delay", "--link-delay", "--delay-activations", "--slow",
                "--update-prob", "--drop-prob", "--momentum", "--sg-boost", "--lr-staleness",
                "--sg-lookahead", "--delay-comp"]:
        assert opt in proc.stdout, opt
    for mode in ("cdni", "dni", "backprop", "async-backprop"):
        assert mode in proc.stdout
