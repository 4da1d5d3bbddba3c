"""CLI usage contract: one-line usage errors (JSON with --json), --version, choices from the
registries, --help with defaults and train's flag groups, --opt keys and optimizer-specific
flags checked against the chosen optimizer (refused, never silently dropped)."""

from __future__ import annotations

import argparse
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelearn.backends import BACKENDS
from edgelearn.cli import (
    TRAIN_DEFAULTS,
    build_parser,
    check_train_flags,
    flag_users,
    main,
    optimizer_option_names,
)
from edgelearn.demo import DATA, demo_data
from edgelearn.journal import read_journal
from edgelearn.losses import LOSSES
from edgelearn.optim import REGISTRY

ROOT = Path(__file__).resolve().parents[1]


def subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """command name -> its parser (argparse keeps them in the subparsers action's choices)."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def train_action(dest: str) -> argparse.Action:
    return next(a for a in subparsers(build_parser())["train"]._actions if a.dest == dest)


def usage_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    """Run argv, expect a usage error (SystemExit 2); returns (stdout, the one stderr line)."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgelearn: error: ")
    assert "usage:" not in err
    return out, lines[0]


def refused(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[str, str]:
    """Run argv, expect a refused command (return code 2); returns (stdout, the stderr line)."""
    code = main(argv)
    out, err = capsys.readouterr()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgelearn: error: ")
    return out, lines[0]


# -- usage errors -------------------------------------------------------------------------------
def test_usage_error_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "edgelearn.cli", "train", "bundle", "--steps", "x"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False,
                          cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stdout == ""
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert proc.stderr.startswith("edgelearn: error: argument --steps: invalid int value")
    assert "Traceback" not in proc.stderr
    proc = subprocess.run([*cmd, "--json"], capture_output=True, text=True, timeout=120,
                          check=False, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1, proc.stderr
    assert "invalid int value" in json.loads(proc.stdout)["error"]
    assert len(proc.stdout.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    [],
    ["nope"],
    ["eval"],
    ["eval", "b", "--data", "d", "--batch-size", "0"],
    ["train", "b", "--data", "d", "--out", "r"],
    ["info", "b", "--no-such-flag"],
])
def test_usage_errors_json(capsys: pytest.CaptureFixture[str], argv: list[str]) -> None:
    out, _ = usage_error(capsys, argv)
    assert out == ""
    out, line_json = usage_error(capsys, [*argv, "--json"])
    assert json.loads(out)["error"] == line_json.removeprefix("edgelearn: error: ")


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib.metadata import version

    import edgelearn

    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    shown = capsys.readouterr().out.split()
    assert shown[0] == "edgelearn"
    assert shown[1] in (version("edgelearn"), edgelearn.__version__)


# -- choices, help ------------------------------------------------------------------------------
def test_choices_come_from_the_registries(capsys: pytest.CaptureFixture[str]) -> None:
    assert set(train_action("optimizer").choices) == {"auto", *REGISTRY}
    assert set(train_action("objective").choices) == set(LOSSES)
    assert set(train_action("backend").choices) == set(BACKENDS)
    for flag, value in (("--optimizer", "sgd"), ("--objective", "hinge"),
                        ("--backend", "tensorrt")):
        _, line = usage_error(capsys, ["train", "b", "--data", "d", "--out", "r", "--steps",
                                       "1", flag, value])
        assert f"argument {flag}: invalid choice: '{value}'" in line


def test_every_flag_has_help() -> None:
    parser = build_parser()
    parsers = {"edgelearn": parser, **subparsers(parser)}
    for name, p in parsers.items():
        for action in p._actions:
            assert action.help, (name, action.dest)
            assert action.help != argparse.SUPPRESS, (name, action.dest)
        p.format_help()  # every help string formats (no stray %)


def test_train_help_shows_groups_and_defaults(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # undo line wrapping
    for group in ("data:", "optimizer:", "zo-scale / zo-sgd options:", "zo-sgd options:",
                  "tpsgd options:", "polystep options:", "reliability:", "device / runtime:"):
        assert group in text
    import edgelearn as el  # every Options field with a flag is a train flag (generated)

    for options in el.optimizers().values():
        for flag in options.cli_flags():
            assert f" {flag} " in text, flag
    for flag, default in (("--checkpoint-every CHECKPOINT_EVERY", "100"),
                          # fzoo's K probes are one population call: its own default
                          ("--probes PROBES",
                           "adamezo 1, fzoo 8, zo-gn 16, zo-readout 2, zo-scale 1, zo-sgd 1"),
                          ("--restore {auto,copy,drift}", "auto"),
                          ("--target-scale TARGET_SCALE", "3.0"),
                          ("--diverge-patience DIVERGE_PATIENCE", "20"),
                          ("--batch-size BATCH_SIZE", "32"),
                          (f"--optimizer {{auto,{','.join(el.optimizers())}}}", "auto")):
        rest = text.split(f" {flag} ", 1)[1]
        own_help = re.split(r" --[a-z-]+ (?:[A-Z_]{2,}|\{)", rest)[0]  # up to the next flag
        assert f"(default: {default})" in own_help, (flag, own_help)
    for key in optimizer_option_names("polystep") or []:
        assert key in text.split("polystep options:")[1].split("reliability:")[0]
    for dest, value in TRAIN_DEFAULTS.items():  # sentinel flags: None until checked
        assert train_action(dest).default is None, dest
        assert value is not None


def test_eval_help_batch_size_default(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "(default: 256)" in " ".join(capsys.readouterr().out.split())


# -- flags checked against the optimizer ------------------------------------------------------
def test_flag_table_matches_the_parser() -> None:
    train = subparsers(build_parser())["train"]
    dests = {a.dest for a in train._actions}
    assert set(flag_users()) <= dests
    assert set(TRAIN_DEFAULTS) <= dests
    for users in flag_users().values():
        assert set(users) <= set(REGISTRY)


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    shutil.copytree(DATA / "demo", tmp_path / "B")
    user, _, _ = demo_data()
    np.savez(tmp_path / "user.npz", x=user.x[:64], y=user.y[:64])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def train(capsys: pytest.CaptureFixture[str], out: str, *extra: str) -> tuple[dict, dict]:
    """Train 2 steps on the demo bundle; returns (--json result, journal header config)."""
    code = main(["train", "B", "--data", "user.npz", "--steps", "2", "--out", out, "--json",
                 *extra])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    res = json.loads(stdout)
    return res, read_journal(res["journal"])[0][0]["config"]


@pytest.mark.parametrize(("optimizer", "flags"), [
    ("tpsgd", ["--eps", "0.01"]),
    ("tpsgd", ["--probes", "2", "--noise", "gaussian"]),
    ("tpsgd", ["--sign"]),
    ("tpsgd", ["--restore", "copy"]),
    ("zo-sgd", ["--local-loss", "l1"]),
    ("zo-sgd", ["--hidden-lr", "0.01"]),
    ("zo-sgd", ["--target-on", "activation"]),
    ("polystep", ["--lr", "0.1"]),
    ("polystep", ["--eps", "0.1"]),
    ("polystep", ["--schedule", "cosine"]),
    ("zo-scale", ["--sign"]),
    ("zo-scale", ["--weight-decay", "0.1"]),
    ("zo-scale", ["--reject-above", "3"]),
])
def test_flags_the_optimizer_ignores_are_refused(work: Path, capsys: pytest.CaptureFixture[str],
                                                 optimizer: str, flags: list[str]) -> None:
    out, line = refused(capsys, ["train", "B", "--data", "user.npz", "--steps", "2", "--out",
                                 "run", "--optimizer", optimizer, *flags, "--json"])
    assert f"--optimizer {optimizer} does not use" in line
    for flag in flags:
        if flag.startswith("--"):
            assert flag in line
    assert json.loads(out)["error"] in line
    assert not (work / "run").exists()


def test_diverge_options_need_the_factor(work: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _, line = refused(capsys, ["train", "B", "--data", "user.npz", "--steps", "2", "--out",
                               "run", "--diverge-patience", "3"])
    assert "--diverge-patience applies only with --diverge-factor" in line
    _, line = refused(capsys, ["train", "B", "--data", "user.npz", "--steps", "2", "--out",
                               "run", "--diverge-smoothing", "0.5"])
    assert "--diverge-smoothing applies only with --diverge-factor" in line


@pytest.mark.parametrize(("optimizer", "key"), [("zo-sgd", "radius"), ("polystep", "lr"),
                                                ("tpsgd", "probes"), ("zo-sgd", "seed")])
def test_unknown_opt_key_lists_the_valid_ones(work: Path, capsys: pytest.CaptureFixture[str],
                                              optimizer: str, key: str) -> None:
    _, line = refused(capsys, ["train", "B", "--data", "user.npz", "--steps", "2", "--out",
                               "run", "--optimizer", optimizer, "--opt", f"{key}=1"])
    assert f"{optimizer} has no option '{key}'" in line
    if key == "seed":
        assert "--seed" in line
    else:
        valid = optimizer_option_names(optimizer)
        assert valid
        assert f"valid keys: {', '.join(valid)}" in line
    assert not (work / "run").exists()


def test_opt_keys_are_the_constructor_keywords() -> None:
    assert "radius" in (optimizer_option_names("polystep") or [])
    assert "hidden_lr" in (optimizer_option_names("tpsgd") or [])
    assert {"lr", "eps", "probes"} <= set(optimizer_option_names("zo-sgd") or [])
    for name in REGISTRY:
        assert "seed" not in (optimizer_option_names(name) or [])


@pytest.mark.parametrize(("optimizer", "explicit"), [
    ("zo-sgd", ["--lr", "1e-3", "--eps", "1e-3", "--probes", "1", "--noise", "rademacher",
                "--restore", "auto", "--schedule", "constant", "--weight-decay", "0"]),
    ("tpsgd", ["--local-loss", "mse", "--target-scale", "3", "--target-on", "pooled"]),
    ("polystep", ["--restore", "auto"]),
])
def test_defaults_are_the_same_as_explicit_flags(work: Path, capsys: pytest.CaptureFixture[str],
                                                 optimizer: str, explicit: list[str]) -> None:
    """None sentinels change nothing: no flags == every flag at its documented default."""
    implicit_res, implicit_cfg = train(capsys, "a", "--optimizer", optimizer)
    explicit_res, explicit_cfg = train(capsys, "b", "--optimizer", optimizer, *explicit)
    assert implicit_cfg == explicit_cfg
    assert implicit_res["sha256"] == explicit_res["sha256"]


@pytest.mark.parametrize(("optimizer", "flags", "expect"), [
    ("zo-sgd", ["--probes", "2", "--weight-decay", "0.1", "--sign", "--conservative",
                "--reject-above", "9", "--clip", "5", "--noise", "gaussian"],
     {"probes": 2, "weight_decay": 0.1, "sign": True, "conservative": True,
      "reject_above": 9.0, "clip": 5.0, "noise": "gaussian"}),
    ("tpsgd", ["--lr", "0.2", "--hidden-lr", "0.01", "--target-scale", "2",
               "--local-loss", "l1", "--target-on", "activation"],
     {"lr": 0.2, "hidden_lr": 0.01, "target_scale": 2.0, "local_loss": "l1",
      "target_on": "activation"}),
    ("polystep", ["--restore", "copy", "--opt", "radius=0.2"],
     {"restore": "copy", "radius": 0.2}),
])
def test_accepted_flags_reach_the_optimizer(work: Path, capsys: pytest.CaptureFixture[str],
                                            optimizer: str, flags: list[str],
                                            expect: dict) -> None:
    _, cfg = train(capsys, "run", "--optimizer", optimizer, *flags)
    assert {k: cfg[k] for k in expect} == expect


def _readme_train_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    cmds = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("edgelearn train "):
                cmds.append(line)
    return cmds


@pytest.mark.parametrize("cmd", _readme_train_commands())
def test_readme_train_commands_pass_the_flag_checks(cmd: str) -> None:
    args = build_parser().parse_args(shlex.split(cmd)[1:])
    check_train_flags(args)  # raises InputError on a flag the optimizer would not use
    for dest, value in TRAIN_DEFAULTS.items():
        assert getattr(args, dest) is not None, (dest, value)
