"""edgelearn.Session: live steps, resume, recorded samples, callbacks, results, the surface.

Torch-free: the shipped demo bundle (an MLP with taps and population graphs) and digits.
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

import edgelearn as el
from edgelearn.demo import DATA, demo_data
from edgelearn.journal import read_journal

pytest.importorskip("onnxruntime")

ZO = el.TrainConfig(optimizer="zo-sgd", options={"lr": 0.01, "eps": 1e-3, "probes": 2},
                    trainable="head.*", seed=3, checkpoint_every=7)
TP = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*", seed=3,
                    checkpoint_every=7, record_samples=True)
RT = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)


@pytest.fixture(scope="module")
def bundle() -> el.Bundle:
    return el.load_bundle(DATA / "demo")


@pytest.fixture(scope="module")
def digits() -> tuple[el.Dataset, el.Dataset]:
    train, test, _ = demo_data(0)
    return train, test


def _live(bundle: el.Bundle, run: Path, config: el.TrainConfig, data: el.Dataset, lo: int,
          hi: int, **kw: object) -> str:
    """Feed samples lo..hi-1 one at a time; the weights' digest at the end."""
    with el.Session(bundle, run, config, RT, **kw) as s:
        assert s.steps_done == lo
        for i in range(lo, hi):
            s.step((data.x[i], data.y[i]))
        return s.digest()


@pytest.mark.parametrize("config", [ZO, TP], ids=["zo-sgd", "tpsgd"])
def test_live_steps_resume_and_replay_bit_identical(bundle, digits, tmp_path, config) -> None:
    train, _ = digits
    whole = _live(bundle, tmp_path / "whole", config, train, 0, 20)
    _live(bundle, tmp_path / "cut", config, train, 0, 9)
    with el.Session.resume(tmp_path / "cut") as s:  # bundle and config from session.json
        assert s.steps_done == 9
        assert s.config == config
        for i in range(9, 20):
            s.step((train.x[i], train.y[i]))
        resumed = s.digest()
    replayed = el.replay(bundle, tmp_path / "cut" / "journal.bin")
    assert resumed == whole == replayed.sha256
    assert replayed.steps == 20
    records = read_journal(tmp_path / "cut" / "journal.bin")[0]
    assert records[0]["feed"] == "live"
    assert all(len(r["batch_digest"]) == 64 for r in records[1:])
    assert (tmp_path / "cut" / "samples.bin").is_file() == config.record_samples


def test_tpsgd_live_needs_recorded_samples(bundle, digits, tmp_path) -> None:
    train, _ = digits
    plain = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*")
    with el.Session(bundle, tmp_path / "r", plain, RT) as s, \
            pytest.raises(el.InputError, match="record_samples"):
        s.step((train.x[0], train.y[0]))
    assert not (tmp_path / "r" / "journal.bin").exists()
    _live(bundle, tmp_path / "t", TP, train, 0, 4)
    (tmp_path / "t" / "samples.bin").unlink()
    with pytest.raises(el.InputError, match="samples"):
        el.replay(bundle, tmp_path / "t" / "journal.bin")


def test_samples_of_an_unjournaled_step_are_dropped_on_resume(bundle, digits, tmp_path) -> None:
    """A kill between the samples append and the step record leaves one sample too many:
    resume drops it, and the step is redone on whatever the app feeds then."""
    train, _ = digits
    whole = _live(bundle, tmp_path / "whole", TP, train, 0, 8)
    _live(bundle, tmp_path / "cut", TP, train, 0, 5)
    (tmp_path / "cut" / "checkpoint.json").unlink()  # resume replays all 5 steps on samples
    from edgelearn.journal import Journal

    with Journal(tmp_path / "cut" / "samples.bin") as j:  # the orphan: other data, step 5
        j.append({"step": 5, "x": {"dtype": "<f4", "shape": [1, 64], "b64": ""},
                  "y": {"dtype": "<i8", "shape": [1], "b64": ""}})
    assert len(read_journal(tmp_path / "cut" / "samples.bin")[0]) == 6
    assert _live(bundle, tmp_path / "cut", TP, train, 5, 8) == whole
    assert el.replay(bundle, tmp_path / "cut" / "journal.bin").sha256 == whole
    assert len(read_journal(tmp_path / "cut" / "samples.bin")[0]) == 8


def test_one_sample_is_a_batch_of_one(bundle, digits, tmp_path) -> None:
    train, _ = digits
    a = _live(bundle, tmp_path / "a", ZO, train, 0, 5)
    with el.Session(bundle, tmp_path / "b", ZO, RT) as s:
        for i in range(5):
            s.step((train.x[i : i + 1], train.y[i : i + 1]))
        assert s.digest() == a
    with el.Session(bundle, tmp_path / "c", ZO, RT) as s, \
            pytest.raises(el.InputError, match="labels"):
        s.step((train.x[0], 10))  # the model has 10 classes


def test_evaluate_does_not_disturb_the_run(bundle, digits, tmp_path) -> None:
    train, test = digits
    with el.Session(bundle, tmp_path / "a", ZO, RT) as s:
        before = s.evaluate(test)
        s.run(train, 10)
        mid = s.evaluate(test)
        s.run(train, 20)
        with_evals = s.digest()
    plain = el.Session(bundle, tmp_path / "b", ZO, RT)
    with plain:
        assert plain.run(train, 20).sha256 == with_evals
    assert before.n == len(test)
    assert 0 <= before.accuracy <= 1
    assert mid.loss != before.loss
    assert set(before.to_json()) == {"loss", "accuracy", "n", "seconds", "peak_rss_mb"}


def test_run_then_more_steps_and_feeds_do_not_mix(bundle, digits, tmp_path) -> None:
    train, _ = digits
    with el.Session(bundle, tmp_path / "r", ZO, RT) as s:
        first = s.run(train, 5)
        second = s.run(train, 12)
        assert (first.resumed_from, second.resumed_from, s.steps_done) == (0, 5, 12)
        with pytest.raises(el.InputError, match="fed from a data set"):
            s.step((train.x[0], train.y[0]))
        with pytest.raises(el.InputError, match="already has 12 steps"):
            s.run(train, 3)
        with pytest.raises(el.InputError, match=r"examples \d+ -> 10"):
            s.run(el.Dataset(train.x[:10], train.y[:10]), 20)
    assert set(second.to_json()) == {
        "steps", "resumed_from", "rollbacks", "loss_first", "loss_last", "weights", "journal",
        "sha256", "optimizer", "trainable_params", "step_ms_median", "forward_ms_median",
        "peak_rss_mb", "batch_size", "memory_plan", "population_graph",
        "population_call_ms_median", "cache", "chosen_by"}


def test_changed_settings_refused_when_the_run_opens(bundle, digits, tmp_path) -> None:
    train, _ = digits
    _live(bundle, tmp_path / "r", ZO, train, 0, 3)
    other = el.TrainConfig(**{**ZO.to_json(), "options": {"lr": 0.02, "eps": 1e-3,
                                                          "probes": 2}, "divergence": None})
    with el.Session(bundle, tmp_path / "r", other, RT) as s, \
            pytest.raises(el.InputError, match=r"lr 0\.01 -> 0\.02"):
        s.step((train.x[3], train.y[3]))


def test_callbacks_early_stop_metrics_and_hooks(bundle, digits, tmp_path) -> None:
    train, _ = digits
    seen: list[str] = []

    class Hooks(el.Callback):
        def on_start(self, session: el.Session, *, steps: int) -> None:
            seen.append(f"start {steps}")

        def on_checkpoint(self, session: el.Session, step: int) -> None:
            seen.append(f"checkpoint {step}")

        def on_end(self, session: el.Session, result: el.RunResult | None) -> None:
            seen.append(f"end {result.stopped_early if result else None}")

    class StopAt(el.Callback):
        def on_step(self, session: el.Session, result: el.StepResult) -> None:
            if result.step == 9:
                session.request_stop("enough")

    metrics = tmp_path / "metrics.jsonl"
    with el.Session(bundle, tmp_path / "r", ZO, RT) as s:
        res = s.run(train, 100, callbacks=[Hooks(), StopAt(), el.MetricsLog(metrics)])
        assert s.stop_reason == "enough"
    assert res.stopped_early
    assert res.steps == 10
    assert seen == ["start 100", "checkpoint 7", "end True"]
    lines = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(10))
    assert el.replay(bundle, tmp_path / "r" / "journal.bin").steps == 10


def test_early_stopping_stops_a_flat_loss(bundle, digits, tmp_path) -> None:
    train, _ = digits
    # no decrease counts as an improvement: the first full window sets the best (step 2),
    # five steps without improvement follow (3..7), the run stops before step 8
    stop = el.EarlyStopping(patience=5, window=3, min_delta=1e9)
    with el.Session(bundle, tmp_path / "r", ZO, RT) as s:
        res = s.run(train, 200, callbacks=[stop])
    assert res.stopped_early
    assert res.steps == 8
    with pytest.raises(el.InputError, match="patience"):
        el.EarlyStopping(patience=0)


def test_save_resume_and_moved_bundle(bundle, digits, tmp_path) -> None:
    import shutil

    train, _ = digits
    copy = tmp_path / "bundle"
    shutil.copytree(DATA / "demo", copy)
    with el.Session(copy, tmp_path / "r", ZO, RT) as s:
        s.run(train, 4)
        assert s.save() == tmp_path / "r" / "weights.safetensors"
        digest = s.digest()
    record = json.loads((tmp_path / "r" / "session.json").read_text())
    assert record["bundle"] == str(copy.resolve())
    assert el.TrainConfig.from_json(record["train"]) == ZO
    shutil.rmtree(copy)
    with pytest.raises(el.InputError, match="not there any more"):
        el.Session.resume(tmp_path / "r")
    with el.Session.resume(tmp_path / "r", bundle=bundle) as s:
        assert s.digest() == digest
    with pytest.raises(el.InputError, match=r"session\.json"):
        el.Session.resume(tmp_path / "nothing")


def test_a_second_session_on_the_run_is_refused(bundle, tmp_path) -> None:
    with el.Session(bundle, tmp_path / "r", ZO, RT), \
            pytest.raises(el.EdgelearnError, match="in use"):
        el.Session(bundle, tmp_path / "r", ZO, RT)
    el.Session(bundle, tmp_path / "r", ZO, RT).close()  # released on close


def test_configs_validate_and_round_trip() -> None:
    for bad in ({"batch_size": 0}, {"seed": -1}, {"fsync_every": 0}, {"options": 3},
                {"fsync_seconds": math.nan}):
        with pytest.raises(el.InputError):
            el.TrainConfig(**bad)
    cfg = el.TrainConfig(trainable=["head.*"], divergence=el.DivergencePolicy(factor=2.0))
    assert el.TrainConfig.from_json(json.loads(json.dumps(cfg.to_json()))) == cfg
    rt = el.RuntimeConfig(providers=["CPUExecutionProvider"], device="generic-x86_64")
    assert el.RuntimeConfig.from_json(json.loads(json.dumps(rt.to_json()))) == rt
    with pytest.raises(el.InputError, match="unknown keys"):
        el.TrainConfig.from_json({"nope": 1})


def test_public_surface() -> None:
    assert len(el.__all__) <= 34
    for name in el.__all__:
        assert getattr(el, name) is not None, name
        # a name of the surface must not hide a subpackage (el.backends would hide
        # edgelearn.backends for `import edgelearn.backends as b`)
        if importlib.util.find_spec(f"edgelearn.{name}") is not None:
            assert getattr(el, name) is sys.modules[f"edgelearn.{name}"], name
    assert "Unstable:" in (el.tools.__doc__ or "")
    assert "Unstable:" in (el.__doc__ or "")
    assert "Unstable:" in (el.Session.store.__doc__ or "")


def test_training_package_contracts() -> None:
    """One evaluator factory tells taps optimizers apart; the package needs no type: ignore."""
    root = Path(el.__file__).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        if path.parent.name == "training":
            assert "type: ignore" not in text, path
        # the optimizers declare `needs`; outside them only the evaluator factory reads it
        if path.name != "evaluators.py" and path.parent.name != "optim":
            assert ".needs ==" not in text, path
            assert ".needs !=" not in text, path
