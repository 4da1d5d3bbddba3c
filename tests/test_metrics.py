"""metrics.jsonl and progress: held-out scores every N steps without disturbing the run,
crash-safe lines across a resume, readable progress on a terminal and in a log."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.cli import main
from edgelearn.demo import DATA, demo_data
from edgelearn.training.metrics import RunMetrics, read_metrics

BUNDLE = str(DATA / "demo")


@pytest.fixture(scope="module")
def demo_npz(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(user training set, user test set) of the demo as .npz files."""
    d = tmp_path_factory.mktemp("demo_npz")
    train, test, _ = demo_data(0)
    np.savez(d / "train.npz", x=train.x, y=train.y)
    np.savez(d / "test.npz", x=test.x, y=test.y)
    return d / "train.npz", d / "test.npz"


def _train(capsys: pytest.CaptureFixture[str], out: Path, train: Path, steps: int,
           *extra: str) -> dict:
    code = main(["train", BUNDLE, "--data", str(train), "--steps", str(steps), "--trainable",
                 "head.*", "--lr", "0.01", "--optimizer", "zo-sgd", "--out", str(out), "--json",
                 *extra])
    stdout, err = capsys.readouterr()
    assert code == 0, err
    assert err == ""  # --json: no progress anywhere
    return json.loads(stdout)


def test_held_out_every_n_steps_and_training_bit_identical(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_npz: tuple[Path, Path]) -> None:
    train, test = demo_npz
    plain = _train(capsys, tmp_path / "plain", train, 23)
    scored = _train(capsys, tmp_path / "scored", train, 23, "--eval-data", str(test),
                    "--eval-every", "5")
    assert scored["sha256"] == plain["sha256"]
    assert (tmp_path / "scored/journal.bin").read_bytes() == \
        (tmp_path / "plain/journal.bin").read_bytes()
    assert (tmp_path / "scored/weights.safetensors").read_bytes() == \
        (tmp_path / "plain/weights.safetensors").read_bytes()

    lines = read_metrics(tmp_path / "scored/metrics.jsonl")
    steps = [ln for ln in lines if ln.get("kind") != "end"]
    assert [ln["step"] for ln in steps] == list(range(24))
    evaluated = [ln["step"] for ln in steps if "eval_accuracy" in ln]
    assert evaluated == [0, 5, 10, 15, 20, 23]  # every 5 steps, before training, at the end
    assert all(0.0 <= ln["eval_accuracy"] <= 1.0 for ln in steps if "eval_accuracy" in ln)
    last = steps[-1]
    assert last["forwards"] == 23 * 2
    assert last["accepted"] == 23
    assert last["rejected"] == 0
    assert last["lr"] == 0.01
    assert last["rollbacks"] == 0
    assert last["seconds"] > 0
    assert lines[-1]["kind"] == "end"
    assert lines[-1]["peak_rss_mb"] > 0
    # without --eval-data: the same step lines, no held-out scores
    bare = read_metrics(tmp_path / "plain/metrics.jsonl")
    assert [ln["step"] for ln in bare if ln.get("kind") != "end"] == list(range(1, 24))
    assert not any("eval_loss" in ln for ln in bare)
    # the same losses, step by step (the scores read the weights only)
    assert [ln["loss"] for ln in bare[:-1]] == [ln["loss"] for ln in steps[1:]]


def test_resume_drops_lines_past_the_resumed_step_and_skips_torn_lines(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_npz: tuple[Path, Path]) -> None:
    train, _ = demo_npz
    run = tmp_path / "run"
    _train(capsys, run, train, 10)
    path = run / "metrics.jsonl"
    # steps a killed process wrote after its last durable journal record, then a torn line
    with open(path, "a") as f:
        for step in (11, 12):
            f.write(json.dumps({"step": step, "loss": 9.0, "forwards": 999}) + "\n")
        f.write('{"step": 13, "loss": 1.2')
    assert [ln["step"] for ln in read_metrics(path)][-2:] == [11, 12]  # torn line skipped
    _train(capsys, run, train, 20)
    lines = [ln for ln in read_metrics(path) if ln.get("kind") != "end"]
    assert [ln["step"] for ln in lines] == list(range(1, 21))
    assert [ln["forwards"] for ln in lines] == [2 * s for s in range(1, 21)]
    assert all(ln["loss"] != 9.0 for ln in lines)
    for raw in path.read_text().splitlines():
        json.loads(raw)  # nothing torn is left in the file


def test_restart_clears_metrics(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                demo_npz: tuple[Path, Path]) -> None:
    train, _ = demo_npz
    _train(capsys, tmp_path / "r", train, 6)
    _train(capsys, tmp_path / "r", train, 3, "--restart")
    steps = [ln["step"] for ln in read_metrics(tmp_path / "r/metrics.jsonl")
             if ln.get("kind") != "end"]
    assert steps == [1, 2, 3]


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _session_run(tmp_path: Path, stream: io.StringIO, steps: int) -> None:
    train, test, _ = demo_data(0)
    config = el.TrainConfig(optimizer="zo-sgd", options={"lr": 0.01}, trainable="head.*")
    metrics = RunMetrics(test, eval_every=4)
    bar = el.ProgressBar(stream, label="user-7", metrics=metrics, interval=0.0)
    with el.Session(BUNDLE, tmp_path / "run", config, el.RuntimeConfig(device=None)) as s:
        s.run(train, steps, callbacks=[metrics, bar])


def test_progress_plain_lines_when_not_a_terminal(tmp_path: Path) -> None:
    stream = io.StringIO()
    _session_run(tmp_path, stream, 8)
    lines = stream.getvalue().splitlines()
    assert "\r" not in stream.getvalue()
    assert len(lines) == 8  # interval 0: one plain line per step
    assert lines[0].startswith("user-7 1/8 ")
    assert "steps/s" in lines[0]
    assert "ETA" in lines[0]
    assert "loss " in lines[-1]
    assert "held-out acc " in lines[-1]
    assert "(step 8)" in lines[-1]
    assert lines[-1].startswith("user-7 8/8 ")
    assert " in " in lines[-1]


def test_progress_redraws_one_line_on_a_terminal(tmp_path: Path) -> None:
    stream = _Terminal()
    _session_run(tmp_path, stream, 8)
    text = stream.getvalue()
    assert text.startswith("\ruser-7 [")
    assert text.endswith("\n")
    assert text.count("\n") == 1  # one line, redrawn
    final = text.rsplit("\r", 1)[1]
    assert "8/8" in final
    assert "steps/s" in final
    assert "held-out acc" in final


@pytest.mark.parametrize(("optimizer", "options"), [
    ("tpsgd", {"lr": 0.1}), ("polystep", {"radius": 0.3}), ("zo-sgd", {"lr": 0.01})])
def test_held_out_scoring_leaves_every_optimizer_bit_identical(
        tmp_path: Path, optimizer: str, options: dict) -> None:
    """Scoring between steps (taps and population evaluators included) changes nothing."""
    train, test, _ = demo_data(0)
    config = el.TrainConfig(optimizer=optimizer, options=options, trainable="head.*")
    digests = []
    for name, cbs in (("plain", []), ("scored", [RunMetrics(test, eval_every=2)])):
        with el.Session(BUNDLE, tmp_path / name, config, el.RuntimeConfig(device=None)) as s:
            digests.append(s.run(train, 7, callbacks=cbs).sha256)
    assert digests[0] == digests[1]
    assert (tmp_path / "plain/journal.bin").read_bytes() == \
        (tmp_path / "scored/journal.bin").read_bytes()
    scored = read_metrics(tmp_path / "scored/metrics.jsonl")
    assert [ln["step"] for ln in scored if "eval_accuracy" in ln] == [0, 2, 4, 6, 7]


def test_held_out_data_that_does_not_fit_is_one_line_naming_it(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, demo_npz: tuple[Path, Path]) -> None:
    train, _ = demo_npz
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((5, 10), np.float32), y=np.zeros(5, np.int64))
    code = main(["train", BUNDLE, "--data", str(train), "--steps", "3", "--out",
                 str(tmp_path / "run"), "--eval-data", str(bad)])
    _, err = capsys.readouterr()
    assert code == 2
    assert err.startswith("edgelearn: error: held-out data: input 'x' has shape")
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing trained: the directory is taken back


def test_eval_every_alone_is_refused(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     demo_npz: tuple[Path, Path]) -> None:
    code = main(["train", BUNDLE, "--data", str(demo_npz[0]), "--steps", "3", "--out",
                 str(tmp_path / "run"), "--eval-every", "5"])
    _, err = capsys.readouterr()
    assert code == 2
    assert err == "edgelearn: error: --eval-every applies only with --eval-data (the " \
        "held-out .npz)\n"
    assert not (tmp_path / "run").exists()


def test_progress_of_live_steps_has_no_total(tmp_path: Path) -> None:
    """Session.step (no run, no total): 'N steps', steps/s, loss; no ETA, no bar."""
    train, _, _ = demo_data(0)
    stream = io.StringIO()
    bar = el.ProgressBar(stream, label="live", interval=0.0)
    config = el.TrainConfig(optimizer="zo-sgd", options={"lr": 0.01}, trainable="head.*")
    with el.Session(BUNDLE, tmp_path / "run", config, el.RuntimeConfig(device=None),
                    callbacks=[bar]) as s:
        for i in range(3):
            s.step((train.x[i], train.y[i]))
    lines = stream.getvalue().splitlines()
    assert [ln.split(" steps/s")[0].rsplit(" ", 1)[0] for ln in lines] == \
        ["live 1 steps", "live 2 steps", "live 3 steps"]
    assert all("ETA" not in ln and "loss " in ln for ln in lines)
