"""Tests for pipeline.run.cli: argv -> Config, every option and its forms, and
launch.py's one-line refusals of bad arguments."""
from __future__ import annotations


import dataclasses
import errno
import os
import struct
import time

import msgpack
import numpy as np
import pytest

from pipeline import limits
from pipeline.run import cli, subcommands
from pipeline.run.cli import parse
from pipeline.config import UNLOCK_DEFAULTS, Config, flag
from tests.conftest import error_line, run_launch

pytestmark = pytest.mark.timeout(60)


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


def test_parse_unlock_options():
    assert parse(["--unlock", "forward", "--si-lr", "0.2", "--si-second-step", "--grad-delay",
                  "3", "--input-delay", "2"]) == Config(
        unlock="forward", si_lr=0.2, si_second_step=True, si_output_scale=0.3, grad_delay=3,
        input_delay=2)
    # an unlocked layer takes either normalisation (batch norm tracks true batches only)
    assert parse(["--unlock", "forward", "--batchnorm"]).batchnorm
    assert parse(["--unlock", "hidden", "--layernorm"]).layernorm


@pytest.mark.parametrize("classification", [False, True], ids=["addition", "classification"])
def test_the_unlock_defaults_apply_under_unlock_only(classification, tmp_path):
    """--unlock turns the second step on and scales the output layer's
    synthetic step (UNLOCK_DEFAULTS); without it the Config is the one it
    was before they existed, so locked runs are the same bits."""
    task = []
    if classification:
        rng = np.random.default_rng(0)
        np.savez(tmp_path / "d.npz", x_train=rng.random((20, 12), dtype=np.float32),
                 y_train=rng.integers(0, 3, 20))
        task = ["--dataset", f"npz:{tmp_path / 'd.npz'}"]
    locked = parse(task)
    assert (locked.si_second_step, locked.si_output_scale) == (False, 1.0)
    assert locked == dataclasses.replace(parse(task + ["--unlock", "forward"]), unlock="none",
                                         si_second_step=False, si_output_scale=1.0)
    for unlock in ("forward", "hidden"):
        cfg = parse(task + ["--unlock", unlock])
        assert (cfg.si_second_step, cfg.si_output_scale) == (True, 0.3)
        assert {k: getattr(cfg, k) for k in UNLOCK_DEFAULTS} == UNLOCK_DEFAULTS
    # each can still be set, or turned off
    cfg = parse(task + ["--unlock", "forward", "--no-si-second-step", "--si-output-scale", "1"])
    assert (cfg.si_second_step, cfg.si_output_scale) == (False, 1.0)
    assert dataclasses.replace(cfg, unlock="none") == locked


@pytest.mark.parametrize("argv, flag", [
    (["--unlock", "forward", "--mode", "backprop"], "--unlock"),
    (["--si-output-scale", "0.5"], "--si-output-scale"),
    (["--unlock", "forward", "--si-output-scale", "-1"], "--si-output-scale"),
    (["--unlock", "forward", "--input-delay", "1"], "--input-delay"),
    (["--input-delay", "1", "--grad-delay", "1"], "--input-delay"),
    (["--unlock", "forward", "--input-delay", "-1"], "--input-delay"),
    (["--si-second-step"], "--si-second-step"),
    (["--unlock", "both"], "--unlock"),
    # classification data defaults to batch normalisation: one normalisation per layer
    (["--layernorm", "--dataset", "mnist", "--data-dir", "nowhere"], "--layernorm"),
])
def test_parse_unlock_errors_in_one_line(argv, flag, capsys):
    with pytest.raises(SystemExit) as info:
        parse(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}: " in err


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
    (["--layers", "2"], (128,)),              # no --hidden: the notebook's widths,
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


@pytest.mark.slow
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
    (["--watchdog", "-1"], "--watchdog"),
    (["--watchdog", "inf"], "--watchdog"),
    (["--slow", "1:2", "--in-process"], "--in-process"),
    (["--sg-boost", "x"], "--sg-boost"),
    (["--delay-comp", "0.5"], "--delay-comp"),
    (["--momentum", "0.9", "--dataset", "addition", "--optimizer", "adam"], "--momentum"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, flag", STALENESS_BAD_ARGS,
                         ids=[" ".join(a) for a, _ in STALENESS_BAD_ARGS])
def test_launch_rejects_bad_staleness_args_in_one_line(argv, flag):
    proc = run_launch(*argv)
    line = error_line(proc)
    assert proc.stdout == ""
    assert line.startswith(f"launch.py: error: argument {flag}: "), line


@pytest.mark.slow
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


# --- no traceback for any value of any option -------------------------------------------

LONG_NAME = "n" * 300                       # longer than a file system's 255-byte names
LONG_PATH = "/".join(["p" * 200] * 25)       # longer than a 4096-byte path
EXTREMES = [str(2 ** 66), str(-2 ** 66), "99999999999999999999", str(2 ** 62), "1000000000",
            "1e300", "-1e300", "nan", "inf", "-inf", "", "x", LONG_NAME, LONG_PATH]


def _value_options(parser) -> dict[str, str]:
    """{option: the name the error must give} of every option of ``parser``
    that takes a value, as the parser itself lists them."""
    return {a.option_strings[0]: a.option_strings[0] for a in parser._actions
            if a.option_strings and a.nargs != 0}


def _forms(value: str) -> list[str]:
    """The value alone and in every compound form an option takes
    (LAYER:FACTOR, MS:JITTER, comma lists, a sweep variant's NAME: OPTIONS)."""
    return [value, f"1:{value}", f"{value}:1", f"8,{value}", f"0,{value}"]


def _carried(cfg: Config) -> None:
    """What a run does with its numbers and paths, checked with the wire's,
    the clock's and the kernel's own tools: the config goes to every worker
    in msgpack, every batch id and step in the int64 data header, every wait
    is a deadline, and a run writes its checkpoints inside its directory."""
    limits.check(cfg)
    msgpack.packb(cfg.to_dict())
    struct.pack("<qq", cfg.total_batches + cfg.batches_per_epoch, 2 * cfg.total_batches)
    now = time.time()
    for seconds in (cfg.watchdog, (cfg.link_delay_ms + cfg.link_jitter_ms) / 1000,
                    *(3600 * factor for _, factor in cfg.slow)):
        time.gmtime(now + seconds)
    for path in (cfg.run_dir, cfg.data_dir):
        try:
            os.stat(os.path.join(path or ".", "checkpoints", "epoch-000001", ".layer1.npz.tmp"))
        except OSError as exc:
            assert exc.errno != errno.ENAMETOOLONG, path


@pytest.fixture
def sixteen_gib(monkeypatch):
    """The memory estimate against a fixed machine, so that every outcome is the same anywhere."""
    monkeypatch.setattr(limits, "available_bytes", lambda: 16 << 30)


@pytest.mark.parametrize("sweep", [False, True], ids=["run", "sweep"])
def test_every_option_takes_any_value_without_a_traceback(sweep, sixteen_gib, capsys):
    parser = cli.build_parser(sweep=sweep)
    options = _value_options(parser)
    # the parser offers every option with a value that a Config field declares
    fields = {flag(f.name) for f in dataclasses.fields(Config)
              if f.metadata["cli"] and (f.metadata["sweep"] or not sweep)
              and f.metadata["kind"] not in ("flag", "switch")}
    assert fields <= set(options), fields - set(options)

    def parse_all(argv):
        return list(cli.parse_sweep(argv).bases.values()) if sweep else [cli.parse(argv)]
    tried = 0
    for option in options:
        for value in EXTREMES:
            for form in _forms(value):
                argv = [option, form]
                try:
                    configs = parse_all(argv)
                except SystemExit as exit:
                    err = capsys.readouterr().err
                    assert exit.code == 2 and err.count("\n") == 1, (argv, err)
                    assert f"argument {option}" in err, (argv, err)
                else:
                    for cfg in configs:
                        _carried(cfg)
                tried += 1
    assert tried == len(options) * len(EXTREMES) * 5


@pytest.mark.parametrize("argv, option", [
    (["--seeds", str(2 ** 66)], "--seeds"), (["--seeds", "0"], "--seeds"),
    (["--seed", str(2 ** 32 - 2), "--seeds", "3"], "--seeds"),
    (["--seed", str(2 ** 66)], "--seed"),
    (["--variant", "v: --epochs " + str(2 ** 66)], "--epochs"),
    (["--variant", "v: 12"], "--variant"),
])
def test_sweep_seeds_and_variants_beyond_the_bounds_are_one_line(argv, option, capsys):
    with pytest.raises(SystemExit) as info:
        cli.parse_sweep(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"argument {option}: " in err


@pytest.mark.parametrize("layers", [str(2 ** 66), "99999999999999999999", "1025", "1"])
def test_keys_for_more_layers_than_a_run_may_have_is_one_line(layers, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        subcommands.parse_keys(["--out", str(tmp_path / "keys"), "--layers", layers])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and "argument --layers: " in err
    assert not (tmp_path / "keys").exists()


@pytest.mark.slow
@pytest.mark.parametrize("argv, option", [
    (["--epochs", str(2 ** 66)], "--epochs"),
    (["--blas-threads", str(2 ** 66)], "--blas-threads"),
    (["--checkpoint-every", str(2 ** 66)], "--checkpoint-every"),
    (["--slow", "1:1e300"], "--slow"),
    (["--layers", "99999999999999999999"], "--layers"),
    (["--sg-hidden", "99999999999999999999"], "--sg-hidden"),
], ids=["epochs", "blas-threads", "checkpoint-every", "slow", "layers", "sg-hidden"])
def test_launch_refuses_the_numbers_of_the_issue_before_anything_starts(argv, option, tmp_path):
    """Once each started every process and ended "taken for dead", or a
    worker failed on the clock, or a traceback; now one line naming it."""
    line = error_line(run_launch(*argv, "--run-dir", str(tmp_path / "run")))
    assert line.startswith(f"launch.py: error: argument {option}: "), line
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("path", [LONG_NAME, LONG_PATH], ids=["name", "path"])
@pytest.mark.parametrize("parse, argv, option", [
    (subcommands.parse_keys, ["--out", "{}"], "--out"),
    (subcommands.parse_report, ["{}"], "RUN_DIR"),
    (subcommands.parse_cluster, ["--cluster", "c.json", "--run-dir", "{}"], "--run-dir"),
    (subcommands.parse_cluster, ["--cluster", "c.json", "--resume", "{}"], "--resume"),
    (cli.parse_sweep, ["--out", "{}"], "--out"),
    (cli.parse_run, ["--resume", "{}"], "--resume"),
    (cli.parse_run, ["--dataset", "npz:{}"], "--dataset"),
], ids=["keys", "report", "cluster-run-dir", "cluster-resume", "sweep-out", "resume",
        "npz"])
def test_a_path_longer_than_a_file_system_takes_is_one_line(parse, argv, option, path,
                                                            tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        parse([a.format(tmp_path / path) for a in argv])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and f"argument {option}: " in err
    assert len(err) < 300  # the path shortened in the line


def test_a_sweep_whose_run_directories_would_not_fit_under_out_is_one_line(tmp_path, capsys):
    """--out alone fits; with each point's directory and what a run writes
    in it, it would not."""
    out = str(tmp_path) + "/s" * ((4096 - 60 - len(str(tmp_path))) // 2)  # 4036-odd bytes
    with pytest.raises(SystemExit):
        cli.parse_sweep(["--out", out, "--modes", "cdni", "--grad-delay", "16"])
    err = capsys.readouterr().err
    assert "argument --out: " in err and "cdni-delay16-seed3.attempt99" in err


@pytest.mark.slow
def test_launch_refuses_a_run_dir_longer_than_a_path_before_anything_starts(tmp_path):
    """Once an ENAMETOOLONG traceback from the run directory."""
    line = error_line(run_launch("--run-dir", str(tmp_path / LONG_PATH)))
    assert line.startswith("launch.py: error: argument --run-dir: "), line
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_the_run_directory_options_parse_and_are_explained(capsys):
    assert parse(["--keep-checkpoints", "0", "--overwrite"]) == \
        Config(keep_checkpoints=0, overwrite=True)
    assert parse([]).keep_checkpoints == 3 and not parse([]).overwrite
    from pipeline.run.cli import parse_sweep
    from pipeline.run.subcommands import parse_cluster
    assert parse_cluster(["--cluster", "c.toml", "--overwrite"]).overwrite
    assert not parse_cluster(["--cluster", "c.toml"]).overwrite
    with pytest.raises(SystemExit) as stop:  # a sweep makes its own run directories
        parse_sweep(["--overwrite"])
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    proc = run_launch("-h")
    assert "--keep-checkpoints N" in proc.stdout and "--overwrite" in proc.stdout
    line = error_line(run_launch("--keep-checkpoints", "-1"))
    assert line.startswith("launch.py: error: argument --keep-checkpoints: ")


# --- what -h shows -----------------------------------------------------------------------

def test_launch_help_names_every_other_command():
    from pipeline.run.cli import build_parser
    text = " ".join(build_parser().format_help().split())
    for command in ("'launch.py sweep'", "'launch.py report RUN_DIR'",
                    "'launch.py keys --out DIR'", "'launch.py --cluster FILE'", "mpiexec"):
        assert command in text, command


def test_sweep_help_reads_like_the_runs_help():
    """Defaults as the user types them, never a Python list; each option
    states its default once."""
    from pipeline.run.cli import build_parser, parse_sweep
    text = " ".join(build_parser(sweep=True).format_help().split())
    assert "['" not in text and "[0," not in text
    for said in ("--modes M1,M2 comma-separated modes (backprop runs at delay 0 only) "
                 "(default: cdni,async-backprop)",
                 "--grad-delay K1,K2 comma-separated injected gradient delays K (default: "
                 "0,1,2,4,8,16)",
                 "every variant runs the whole grid (default: one, unnamed) --axis",
                 "e.g. 'link-delay=0 5 20'; repeatable --out"):
        assert said in text, said
    a = parse_sweep([])
    assert (a.modes, a.delays, a.unlocks, a.input_delays, a.seeds) == (
        ["cdni", "async-backprop"], [0, 1, 2, 4, 8, 16], ["none"], [0], [1, 2, 3])
