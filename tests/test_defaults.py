"""The default optimizer (`train` without --optimizer, `TrainConfig()`): the rule's choice on
each bundle kind, the choice and its reason recorded with the run, explicit choices winning,
resuming and replaying an auto run. Shipped demo bundle and generated ONNX models (no torch)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from bundle_edit import demo_bundle_without
from onnx_models import mlp_onnx, quantize_qdq

import edgelearn as el
from edgelearn.cli import main
from edgelearn.demo import DATA, demo_data
from edgelearn.journal import iter_journal
from edgelearn.optim import defaults
from edgelearn.optim.defaults import choose_optimizer

DEMO = DATA / "demo"


@pytest.fixture(scope="module")
def demo() -> el.Bundle:
    return el.load_bundle(DEMO)


@pytest.fixture(scope="module")
def user_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo user's personalization digits as .npz."""
    path = tmp_path_factory.mktemp("defaults") / "user.npz"
    train, _, _ = demo_data(0)
    np.savez(path, x=train.x, y=train.y)
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> el.Bundle:
    """A generated inference MLP through `prepare`: head taps only, every weight trainable."""
    pytest.importorskip("onnx")
    tmp = tmp_path_factory.mktemp("prep")
    el.tools.prepare(mlp_onnx(tmp / "mlp.onnx"), tmp / "b")
    return el.load_bundle(tmp / "b")


@pytest.fixture(scope="module")
def int8(tmp_path_factory: pytest.TempPathFactory) -> el.Bundle:
    """An int8 QDQ model (onnxruntime.quantization) through `prepare`."""
    pytest.importorskip("onnxruntime.quantization")
    tmp = tmp_path_factory.mktemp("int8")
    x = np.random.default_rng(0).standard_normal((64, 64)).astype(np.float32)
    el.tools.prepare(quantize_qdq(mlp_onnx(tmp / "mlp.onnx"), tmp / "q.onnx", x), tmp / "b")
    return el.load_bundle(tmp / "b")


# -- the rule ---------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable", [None, "*", "head.*", "layers.*"])
def test_taps_for_every_trainable_tensor_choose_tpsgd(demo, trainable) -> None:
    choice = choose_optimizer(demo, trainable=trainable)
    assert choice.name == "tpsgd"
    assert choice.why.startswith("auto: tpsgd (taps cover all")
    assert choice.options == {"lr": 0.1}


def test_head_taps_only_choose_hybrid_for_the_whole_model(prepared) -> None:
    head = prepared.manifest["layers"][-1]["params"]
    assert len(prepared.manifest["layers"]) == 1  # taps found in the graph: the head's only
    choice = choose_optimizer(prepared)  # prepare marks every weight trainable
    assert choice.name == "hybrid"
    assert "taps cover 2 of" in choice.why
    assert choice.options == {"lr": 0.1, "zo_lr": 0.01}
    assert choose_optimizer(prepared, trainable=",".join(head.values())).name == "tpsgd"


def test_no_taps_choose_zo_readout_for_the_head_zo_gn_or_relative_zo_sgd_and_in_place_probes(
        tmp_path, monkeypatch) -> None:
    bare = el.load_bundle(demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps")))
    choice = choose_optimizer(bare)  # the manifest's trainable set: the linear head
    assert (choice.name, choice.options) == ("zo-readout", {})
    assert "no taps graph" in choice.why
    assert "linear head" in choice.why
    assert choose_optimizer(bare, objective="mse").name == "zo-readout"
    assert choose_optimizer(bare, trainable="head.weight").name == "zo-readout"
    assert choose_optimizer(bare, trainable="*").name == "zo-gn"  # the hidden layer too
    assert choose_optimizer(bare, trainable="*", objective="mse").name == "zo-gn"
    monkeypatch.setattr(defaults, "READOUT_MAX_CLASSES", 9)  # a journal of 10^2 x K a step
    assert choose_optimizer(bare).name == "zo-gn"
    monkeypatch.undo()
    steps = choose_optimizer(bare, objective="error-rate")  # neither's loss
    assert (steps.name, steps.options) == ("zo-sgd", {"relative_lr": True, "lr": 0.003})
    assert "steps of one example" in steps.why
    assert choose_optimizer(bare, objective="bce").name == "zo-gn"  # in logits
    # zo-gn keeps a copy of the trainable slice; above its limit it probes in place (the
    # model's 19 KB stand in for a large model)
    monkeypatch.setattr(defaults, "ZO_GN_COPY_MAX_BYTES", 2000)
    big = choose_optimizer(bare, trainable="*")
    assert (big.name, big.options) == ("zo-gn", {"restore": "drift"})
    assert "written in place" in big.why
    cfg = el.TrainConfig(trainable="*", batch_size=16, seed=1)
    with el.Session(bare, tmp_path / "run", cfg) as s:
        res = s.run(demo_data()[0], 6)
        assert s.optimizer.drift
        assert s.optimizer.arena.copy is None
    assert res.chosen_by == big.why
    assert el.replay(bare, res.journal).store.digest() == res.sha256


def test_taps_the_backend_cannot_run_or_losses_they_cannot_give_mean_zo(demo, tmp_path) -> None:
    no_tflite_taps = el.load_bundle(demo_bundle_without(tmp_path / "b", ("tflite_taps",)))
    assert choose_optimizer(no_tflite_taps, backend="onnxruntime").name == "tpsgd"
    litert = choose_optimizer(no_tflite_taps, backend="litert")
    assert litert.name == "zo-readout"  # the manifest's trainable set: the head
    assert "litert" in litert.why
    assert choose_optimizer(demo, objective="error-rate").name == "zo-sgd"
    assert choose_optimizer(demo, objective="mse").options == {"lr": 0.1, "head_loss": "mse"}


def test_int8_weights_choose_polystep_and_scales_alone_zo_scale(int8) -> None:
    choice = choose_optimizer(int8)  # prepare's default trainable set: the int8 weights too
    assert (choice.name, choice.options) == ("polystep", {"radius": 2.0})
    scales = choose_optimizer(int8, trainable="@scale")
    assert scales.name == "zo-scale"
    assert "scales" in scales.why


# -- runs -------------------------------------------------------------------------------------
def _train(capsys, out: Path, data: Path, *extra: str, steps: int = 3) -> dict:
    code = main(["train", str(DEMO), "--data", str(data), "--steps", str(steps), "--out",
                 str(out), "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out)


def test_train_records_the_choice_and_replays(capsys, tmp_path, user_npz) -> None:
    run = tmp_path / "run"
    res = _train(capsys, run, user_npz)
    assert res["optimizer"] == "tpsgd"
    assert res["chosen_by"].startswith("auto: tpsgd (")
    record = json.loads((run / "session.json").read_text())["train"]
    assert (record["optimizer"], record["chosen_by"]) == ("tpsgd", res["chosen_by"])
    assert record["options"] == {"lr": 0.1}
    header = _header(run)[0]
    assert header["optimizer"] == "tpsgd"
    assert header["config"]["lr"] == 0.1
    code = main(["replay", str(DEMO), str(run / "journal.bin"), "--data", str(user_npz),
                 "--out", str(tmp_path / "w.safetensors"), "--json"])
    replayed = json.loads(capsys.readouterr().out)
    assert code == 0
    assert replayed["sha256"] == res["sha256"]


def _header(run: Path) -> list[dict]:
    from edgelearn.journal import iter_journal

    return list(iter_journal(run / "journal.bin", max_records=1))


def test_explicit_optimizer_and_flags_win(capsys, tmp_path, user_npz) -> None:
    res = _train(capsys, tmp_path / "zo", user_npz, "--optimizer", "zo-sgd")
    assert (res["optimizer"], res["chosen_by"]) == ("zo-sgd", None)
    res = _train(capsys, tmp_path / "lr", user_npz, "--lr", "0.02")
    assert res["optimizer"] == "tpsgd"
    assert _header(tmp_path / "lr")[0]["config"]["lr"] == 0.02
    # a flag the chosen default does not use is refused, naming the choice
    code = main(["train", str(DEMO), "--data", str(user_npz), "--steps", "2", "--out",
                 str(tmp_path / "eps"), "--eps", "0.01"])
    err = capsys.readouterr().err
    assert code == 2
    assert "default optimizer, auto: tpsgd" in err
    assert "--eps" in err


def test_an_lr_given_to_auto_is_named_on_the_chosen_optimizers_scale(capsys, tmp_path,
                                                                    user_npz) -> None:
    # zo-gn's lr is a fraction of its Gauss-Newton step: an SGD-sized --lr given without
    # --optimizer is taken, and the user is told on which scale (every weight: not the
    # head alone, which zo-readout trains)
    bundle = demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps"))
    code = main(["train", str(bundle), "--data", str(user_npz), "--steps", "1", "--out",
                 str(tmp_path / "gn"), "--lr", "0.003", "--trainable", "*", "--json"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert json.loads(captured.out)["optimizer"] == "zo-gn"
    assert _header(tmp_path / "gn")[0]["config"]["lr"] == 0.003
    note = [line for line in captured.err.splitlines() if "--lr" in line]
    assert note == ["edgelearn: the default optimizer zo-gn takes --lr 0.003 as its fraction "
                    "of the damped Gauss-Newton step taken (its default 1); --optimizer NAME "
                    "picks another"]
    for extra in (["--optimizer", "zo-gn", "--lr", "0.003"], []):  # named, or no --lr: silent
        code = main(["train", str(bundle), "--data", str(user_npz), "--steps", "1", "--out",
                     str(tmp_path / f"quiet{len(extra)}"), "--trainable", "*", *extra])
        assert code == 0
        assert "--lr" not in capsys.readouterr().err


def test_train_help_states_the_rule_and_each_lr_scale(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert defaults.rule_summary() in text.replace("- ", "-")
    for name, recipe in defaults.RECIPES.items():  # every method the rule can pick
        assert name in defaults.rule_summary()
        if "lr" in recipe and name != "hybrid":
            assert f"{name} (lr {recipe['lr']:g})" in defaults.rule_summary()
    assert f"{defaults.ZO_GN_COPY_MAX_BYTES >> 20} MiB" in defaults.rule_summary()
    assert "zo-gn 1 = the fraction of the damped Gauss-Newton step taken" in text
    assert "tpsgd 0.05 (0.1 under auto)" in text


def test_auto_resumes_the_recorded_optimizer(capsys, tmp_path, user_npz) -> None:
    # a run started when zo-sgd was the default resumes as zo-sgd, bit-identical to one run
    run, ref = tmp_path / "old", tmp_path / "ref"
    _train(capsys, run, user_npz, "--optimizer", "zo-sgd", steps=2)
    resumed = _train(capsys, run, user_npz, steps=4)
    straight = _train(capsys, ref, user_npz, "--optimizer", "zo-sgd", steps=4)
    assert resumed["optimizer"] == "zo-sgd"
    assert resumed["resumed_from"] == 2
    assert resumed["sha256"] == straight["sha256"]
    # an auto run resumes with its recorded choice; --restart chooses again
    auto = tmp_path / "auto"
    _train(capsys, auto, user_npz, steps=2)
    assert _train(capsys, auto, user_npz, steps=4)["optimizer"] == "tpsgd"
    restarted = _train(capsys, run, user_npz, "--restart", steps=2)
    assert restarted["optimizer"] == "tpsgd"


def test_auto_resumes_as_journaled_when_a_default_changed(tmp_path) -> None:
    """An auto zo-gn run journaled before zo-gn's damping became relative to the curvature
    (its header: damping 0.1, no damping_scale) resumes with those settings, bit-identical to
    a run that kept them; naming zo-gn with today's defaults is refused, naming the changes."""
    from edgelearn.journal import Journal, read_journal
    from edgelearn.training.rundir import SESSION

    bare = demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps"))
    train, _, _ = demo_data(0)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None)
    old = {"damping": 0.1, "damping_scale": "weights"}

    def run(d: Path, steps: int, config: el.TrainConfig) -> el.RunResult:
        with el.Session(bare, d, config, rt) as s:
            return s.run(train, steps)

    run(tmp_path / "auto", 2, el.TrainConfig(optimizer="zo-gn", options=old))
    journal = tmp_path / "auto" / "journal.bin"  # as the first zo-gn wrote it
    records, _ = read_journal(journal)
    del records[0]["config"]["damping_scale"]
    journal.unlink()
    with Journal(journal, fsync_every=1) as j:
        for r in records:
            j.append(r)
    session = json.loads((tmp_path / "auto" / SESSION).read_text())
    session["train"].update(optimizer="zo-gn", options={}, chosen_by="auto: zo-gn (test)")
    (tmp_path / "auto" / SESSION).write_text(json.dumps(session))

    resumed = run(tmp_path / "auto", 4, el.TrainConfig())
    straight = run(tmp_path / "ref", 4, el.TrainConfig(optimizer="zo-gn", options=old))
    assert resumed.sha256 == straight.sha256
    with pytest.raises(el.InputError, match=re.escape(
            "damping 0.1 -> 3.0, damping_scale weights -> curvature")):
        run(tmp_path / "auto", 6, el.TrainConfig(optimizer="zo-gn"))


def test_session_without_an_optimizer_uses_the_rule(tmp_path, demo) -> None:
    train, _, _ = demo_data(0)
    rt = el.RuntimeConfig(backend="onnxruntime", device=None)
    with el.Session(demo, tmp_path / "s", el.TrainConfig(options={"lr": 0.05}), rt) as s:
        res = s.run(train, 3)
        assert s.config.optimizer == "tpsgd"
        assert s.config.options == {"lr": 0.05}  # given options override the choice's
    assert res.chosen_by is not None
    assert res.chosen_by.startswith("auto: tpsgd")
    again = el.Session.resume(tmp_path / "s")
    assert again.config.chosen_by == res.chosen_by
    again.close()
    with pytest.raises(el.InputError, match="auto"):
        el.TrainConfig().make_optimizer()


def test_auto_rule_is_the_rule_and_its_options() -> None:
    text, options = el.auto_rule()
    assert text == defaults.rule_summary()
    assert options == defaults.RECIPES
    options["tpsgd"]["lr"] = 1.0  # a copy: the rule's own options stay
    assert defaults.RECIPES["tpsgd"]["lr"] == 0.1


def test_error_rate_runs_zo_sgd_relative_to_each_tensors_rms(tmp_path) -> None:
    bare = el.load_bundle(demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps")))
    cfg = el.TrainConfig(trainable="*", batch_size=16, seed=1, objective="error-rate")
    with el.Session(bare, tmp_path / "run", cfg) as s:
        res = s.run(demo_data()[0], 4)
        assert s.optimizer.name == "zo-sgd"
        store = s.store
        assert s.optimizer.groups.multiplier("head.weight", "lr") == pytest.approx(
            float(np.sqrt(np.mean(np.square(bare.load_store()["head.weight"],
                                            dtype=np.float64)))), rel=1e-6)
    assert "steps of one example" in res.chosen_by
    header = next(iter_journal(res.journal))
    assert header["config"]["relative_lr"] is True
    assert header["config"]["lr"] == 0.003
    assert el.replay(bare, res.journal).store.digest() == res.sha256 == store.digest()
