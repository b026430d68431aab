"""Tests for pipeline.config: every rejection names its flag; types from the wire; to and from a dict."""
from __future__ import annotations

import dataclasses
import json
import math
import struct
import time

import msgpack
import pytest

from pipeline import limits
from pipeline.config import Config, ConfigError, flag

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
    # complete unlock
    (dict(unlock="backward"), "--unlock"),
    (dict(unlock="forward", mode="backprop"), "--unlock"),
    (dict(unlock="hidden", layers=2, hidden=(7,)), "--unlock"),     # no hidden layer above the first
    (dict(unlock="hidden", mode="async-backprop"), "--unlock"),
    (dict(unlock="forward", mode="async-backprop", grad_delay=1), "--unlock"),
    (dict(batchnorm=True, layernorm=True), "--layernorm"),
    (dict(unlock="forward", input_delay=-1), "--input-delay"),
    (dict(unlock="forward", input_delay=2, grad_delay=1), "--input-delay"),
    (dict(unlock="forward", si_lr=-0.1), "--si-lr"),
    (dict(unlock="forward", si_lr=math.nan), "--si-lr"),
    (dict(input_delay=1, grad_delay=1), "--input-delay"),
    (dict(si_second_step=True), "--si-second-step"),
    (dict(si_lr=0.1), "--si-lr"),
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
    dict(unlock="forward", layers=2, hidden=(7,)), dict(unlock="forward", mode="dni"),
    dict(unlock="forward", grad_delay=3, input_delay=3, si_second_step=True, si_lr=1e-9),
    dict(unlock="forward", in_process=True, lockstep=True, grad_delay=1),
    dict(unlock="hidden", mode="dni", grad_delay=1, input_delay=1),
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


def test_si_lr_follows_sg_lr_unless_given():
    assert Config(unlock="forward", sg_lr=0.07).si_step == 0.07
    assert Config(unlock="forward", sg_lr=0.07, si_lr=0.2).si_step == 0.2
    assert not Config().unlocked and Config(unlock="forward").unlocked


@pytest.mark.parametrize("unlock, layers, roles", [
    ("none", 4, []), ("hidden", 4, ["layer2", "layer3"]),
    ("forward", 4, ["layer2", "layer3", "output"]), ("forward", 2, ["output"]),
    ("hidden", 3, ["layer2"]),
])
def test_which_layers_an_unlock_unlocks(unlock, layers, roles):
    cfg = Config(unlock=unlock, layers=layers, hidden=(8,))
    assert cfg.input_roles == roles
    assert [i for i in range(1, layers + 1) if cfg.unlocks(i)] == \
        [layers if r == "output" else int(r[5:]) for r in roles]


# --- every number within what the wire and the clock carry ---------------------------------

WIRE = 2 ** 63  # one more than msgpack's and the data header's signed 64-bit integers carry
INTEGERS = [f.name for f in dataclasses.fields(Config) if type(f.default) is int]


@pytest.mark.parametrize("value", [WIRE, 2 ** 66, 99999999999999999999, -2 ** 66])
@pytest.mark.parametrize("name", INTEGERS)
def test_every_integer_beyond_the_wire_is_refused_naming_its_option(name, value):
    with pytest.raises(ConfigError) as info:
        Config(**{name: value})
    assert info.value.option == flag(name)


@pytest.mark.parametrize("kw, option", [
    (dict(hidden=(8, 2 ** 66)), "--hidden"), (dict(sg_hidden=(99999999999999999999,)), "--sg-hidden"),
    (dict(layers=99999999999999999999, hidden=(8,)), "--layers"),
    (dict(slow=((1, 1e300),)), "--slow"), (dict(slow=((2 ** 66, 2.0),)), "--slow"),
    (dict(watchdog=1e300), "--watchdog"),
    (dict(link_delay_ms=1e300), "--link-delay"),
    (dict(link_delay_ms=1e300, link_jitter_ms=1e300), "--link-delay"),
])
def test_widths_layers_and_waits_beyond_their_bounds_name_their_option(kw, option):
    with pytest.raises(ConfigError) as info:
        Config(**kw)
    assert info.value.option == option


def test_the_batches_a_run_counts_stay_within_the_wire():
    """Every batch's id and each layer's step go in the data header as int64;
    epochs x batches per epoch bounds them, whatever each alone."""
    most = limits.MAX_COUNT // 10
    cfg = Config(epochs=most, examples=100, batch_size=10, checkpoint_every=most,
                 mode="async-backprop", grad_delay=limits.MAX_QUEUE, max_inflight=limits.MAX_QUEUE)
    # a layer steps at most twice a batch (--si-second-step); eval batches come after
    struct.pack("<qq", cfg.total_batches + cfg.batches_per_epoch, 2 * cfg.total_batches)
    msgpack.packb(cfg.to_dict())
    with pytest.raises(ConfigError) as info:
        Config(epochs=most + 1, examples=100, batch_size=10)
    assert info.value.option == "--epochs"
    with pytest.raises(ConfigError) as info:
        Config(epochs=2, examples=limits.MAX_COUNT, batch_size=1)
    assert info.value.option == "--epochs"


def test_the_longest_waits_accepted_stay_on_the_clock():
    """A wait is a deadline of now + S seconds (time_t) that ZeroMQ polls
    towards in a C int of milliseconds; a straggler sleeps FACTOR times its
    step, which Python's clock holds in int64 nanoseconds."""
    cfg = Config(watchdog=limits.MAX_WAIT_S, link_delay_ms=limits.MAX_WAIT_S * 1000,
                 link_jitter_ms=limits.MAX_WAIT_S * 1000, slow=((1, limits.MAX_SLOWDOWN),))
    now = time.time()
    for seconds in (cfg.watchdog, (cfg.link_delay_ms + cfg.link_jitter_ms) / 1000):
        time.gmtime(now + seconds)
        assert int(seconds * 1000) + 1 < 2 ** 31
    sleep = cfg.slowdown(1) * 3600  # an hour-long step, slowed
    time.gmtime(now + sleep)
    assert sleep * 1e9 < 2 ** 63


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(Config)
                                  if type(f.default) is float])
def test_an_integer_where_a_number_goes_is_held_to_the_wire_too(name):
    """A cluster file's JSON or TOML may give any float option as an integer
    of any size; msgpack would refuse to send it to the workers."""
    with pytest.raises(ConfigError) as info:
        Config.from_dict({name: 10 ** 30})
    assert info.value.option == flag(name)
