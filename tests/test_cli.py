"""Tests for pipeline.cli: argv -> Config, every option and its forms, and
launch.py's one-line refusals of bad arguments."""
from __future__ import annotations


import pytest

from pipeline.cli import parse
from pipeline.config import Config
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
        unlock="forward", si_lr=0.2, si_second_step=True, grad_delay=3, input_delay=2)
    # an unlocked layer takes either normalisation (batch norm tracks true batches only)
    assert parse(["--unlock", "forward", "--batchnorm"]).batchnorm
    assert parse(["--unlock", "hidden", "--layernorm"]).layernorm


@pytest.mark.parametrize("argv, flag", [
    (["--unlock", "forward", "--mode", "backprop"], "--unlock"),
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
    (["--watchdog", "-1"], "--watchdog"),
    (["--watchdog", "inf"], "--watchdog"),
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


def test_the_run_directory_options_parse_and_are_explained(capsys):
    assert parse(["--keep-checkpoints", "0", "--overwrite"]) == \
        Config(keep_checkpoints=0, overwrite=True)
    assert parse([]).keep_checkpoints == 3 and not parse([]).overwrite
    from pipeline.cli import parse_cluster, parse_sweep
    assert parse_cluster(["--cluster", "c.toml", "--overwrite"]).overwrite
    assert not parse_cluster(["--cluster", "c.toml"]).overwrite
    with pytest.raises(SystemExit) as stop:  # a sweep makes its own run directories
        parse_sweep(["--overwrite"])
    assert stop.value.code == 2 and "--overwrite" in capsys.readouterr().err
    proc = run_launch("-h")
    assert "--keep-checkpoints N" in proc.stdout and "--overwrite" in proc.stdout
    line = error_line(run_launch("--keep-checkpoints", "-1"))
    assert line.startswith("launch.py: error: argument --keep-checkpoints: ")
