"""Reliability: SIGKILL + resume, NaN batches, reject/rollback guards, locks, fsync policy,
nothing written outside the run directory. Torch-free: a tiny MLP bundle built by hand."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import load_stress_module
from sessions import replay_journal, train

from edgelearn import journal as journal_mod
from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset, batch_indices, load_npz
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.journal import Journal, read_journal
from edgelearn.optim import make_optimizer
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.training import DivergencePolicy
from edgelearn.training.divergence import MIN_LR_SCALE, GuardRule
from edgelearn.training.lock import run_lock
from edgelearn.training.rundir import JOURNAL

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


stress = load_stress_module()




def _data(path: Path) -> Dataset:
    return load_npz(path)


# -- crash safety -----------------------------------------------------------------------------
def test_sigkill_20_times_bit_identical_to_uninterrupted_and_replay(tiny, tmp_path) -> None:
    bundle, data = tiny
    res = stress.kill_resume_loop(bundle, data, tmp_path, steps=300, kills=20, seed=123,
                                  max_gap=12)
    assert res["kills"] >= 20, res
    assert res["sha256_final"] == res["sha256_reference"], res
    assert res["sha256_replay"] == res["sha256_reference"], res
    assert res["mismatches"] == 0


def test_torn_tail_dropped_not_half_applied(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    ref = train(bundle, ds, tmp_path / "ref", steps=30, seed=2, options={"lr": 0.05})
    run = tmp_path / "run"
    train(bundle, ds, run, steps=20, seed=2, options={"lr": 0.05}, checkpoint_every=7)
    size = (run / JOURNAL).stat().st_size
    with open(run / JOURNAL, "rb+") as f:  # a power loss mid-record: 5 bytes of record 20 lost
        f.truncate(size - 5)
    assert len(read_journal(run / JOURNAL)[0]) == 20  # header + 19 steps
    res = train(bundle, ds, run, steps=30, seed=2, options={"lr": 0.05}, checkpoint_every=7)
    assert res["resumed_from"] == 19
    assert res["sha256"] == ref["sha256"]


def test_checkpoint_ahead_of_truncated_journal_is_ignored(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    ref = train(bundle, ds, tmp_path / "ref", steps=25, seed=3, options={"lr": 0.05})
    run = tmp_path / "run"
    train(bundle, ds, run, steps=21, seed=3, options={"lr": 0.05}, checkpoint_every=7)
    meta = json.loads((run / "checkpoint.json").read_text())
    assert meta["step"] == 21
    assert meta["records"] == 22
    assert meta["data"]["next_step"] == 21
    with Journal(run / JOURNAL) as j:
        j.truncate_to(10)  # journal now ends before the checkpoint
    res = train(bundle, ds, run, steps=25, seed=3, options={"lr": 0.05}, checkpoint_every=7)
    assert res["resumed_from"] == 9
    assert res["sha256"] == ref["sha256"]


def test_fsync_seconds_policy(tmp_path, monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(journal_mod.time, "monotonic", lambda: now[0])
    calls: list[int] = []
    real = os.fsync
    j = Journal(tmp_path / "j.bin", fsync_every=1000, fsync_seconds=2.0)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(fd), real(fd)))
    for i in range(4):  # at t = 100.0 .. 101.5: less than 2 s since the open
        j.append({"i": i})
        now[0] += 0.5
    assert calls == []
    assert j.unsynced == 4
    j.append({"i": 4})  # t = 102.0: 2 s since the last fsync
    assert len(calls) == 1
    assert j.unsynced == 0
    j.close()
    with pytest.raises(EdgelearnError, match="fsync_seconds"):
        Journal(tmp_path / "k.bin", fsync_seconds=-1)
    with pytest.raises(EdgelearnError, match="fsync_seconds"):
        Journal(tmp_path / "k.bin", fsync_seconds=math.nan)


# -- numerical guards ---------------------------------------------------------------------------
def _nan_data(ds: Dataset, step: int, seed: int, batch_size: int = 32) -> Dataset:
    """`ds` with the examples of the batch of `step` blown up so the forward gives NaN/inf."""
    x = ds.x.copy()
    x[batch_indices(len(ds), batch_size, step, seed)] = 3e38
    return Dataset(x, ds.y)


@pytest.mark.parametrize(("optimizer", "restore"), [("zo-sgd", "copy"), ("zo-sgd", "drift"),
                                                   ("zo-gn", "drift")])
def test_nan_batch_rejected_weights_exact_training_continues(tiny, tmp_path, optimizer,
                                                             restore) -> None:
    bundle_dir, data = tiny
    bundle = load_bundle(bundle_dir)
    bad_step, seed = 12, 5
    ds = _nan_data(_data(data), bad_step, seed)
    opts = {"lr": 0.05, "restore": restore, **({"probes": 4} if optimizer == "zo-gn" else {})}
    run = tmp_path / "run"
    before = train(bundle, ds, run, steps=bad_step, seed=seed, options=opts,
                   optimizer=optimizer)
    after = train(bundle, ds, run, steps=bad_step + 1, seed=seed, options=opts,
                  optimizer=optimizer)
    rec = read_journal(run / JOURNAL)[0][-1]
    assert rec["step"] == bad_step
    assert rec["accepted"] is False
    if optimizer == "zo-gn":  # non-finite outputs: no solve, no check forward
        assert rec["loss"] is None
    else:
        assert any(v is None for v in rec["evals"])  # NaN/inf journaled as null
    if restore == "copy":  # exact restore: the weights are the pre-step weights, bit for bit
        assert after["sha256"] == before["sha256"]
    # Steps 13..15 are the rest of epoch 0 (16 batches of 32): batches without the bad rows.
    final = train(bundle, ds, run, steps=16, seed=seed, options=opts, optimizer=optimizer)
    recs = read_journal(run / JOURNAL)[0][bad_step + 2 :]
    assert len(recs) == 3
    assert all(r["accepted"] for r in recs)  # training continues
    assert final["sha256"] != after["sha256"]
    assert math.isfinite(final["loss_last"])
    store, _ = replay_journal(bundle, run / JOURNAL)
    assert store.digest() == final["sha256"]  # replay agrees (drift reject path included)


def _toy_store() -> ParamStore:
    return ParamStore([ParamSpec("w", (1000,))],
                      values={"w": np.linspace(-1, 1, 1000, dtype=np.float32)})


def test_reject_above_rejects_exactly_and_replays(tmp_path) -> None:
    store = _toy_store()
    w0 = store["w"].copy()
    opt = make_optimizer("zo-sgd", lr=0.1, eps=1e-2, reject_above=0.5, restore="copy", seed=1)
    losses = iter([3.0, 1.0])  # |L+ - L-| = 2 > 0.5
    info = opt.step(store, lambda: next(losses))
    assert not info.accepted
    assert info.record["rejected"] == "reject_above"
    np.testing.assert_array_equal(store["w"], w0)  # exact
    losses = iter([1.2, 1.0])  # 0.2 <= 0.5: a normal step
    info = opt.step(store, lambda: next(losses))
    assert info.accepted
    assert "rejected" not in info.record
    assert not np.array_equal(store["w"], w0)
    # clip clamps and still updates; reject_above refuses the step
    clipped = _toy_store()
    losses = iter([3.0, 1.0])
    make_optimizer("zo-sgd", lr=0.1, eps=1e-2, clip=0.5, seed=1).step(clipped,
                                                                       lambda: next(losses))
    assert not np.array_equal(clipped["w"], w0)
    with pytest.raises(InputError, match="reject_above"):
        make_optimizer("zo-sgd", reject_above=0.0)


def test_reject_above_in_a_run_replays(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle = load_bundle(bundle_dir)
    res = train(bundle, _data(data), tmp_path / "run", steps=60, seed=4,
                options={"lr": 0.05, "eps": 0.05, "reject_above": 0.05, "restore": "drift"})
    recs = read_journal(Path(res["journal"]))[0][1:]
    rejected = [r for r in recs if r.get("rejected") == "reject_above"]
    assert 0 < len(rejected) < len(recs)
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]


DIVERGE = {"lr": 40.0, "eps": 0.01}  # far too large: the loss blows up within a few steps


def test_divergence_rolls_back_lowers_lr_and_replays(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    pol = DivergencePolicy(factor=2.0, patience=3, lr_scale=0.25, every=5)
    res = train(bundle, ds, tmp_path / "run", steps=80, seed=6, options=DIVERGE,
                divergence=pol)
    recs = read_journal(Path(res["journal"]))[0]
    rolls = [(i, r) for i, r in enumerate(recs) if r.get("kind") == "rollback"]
    assert res["rollbacks"] == len(rolls) >= 1
    assert [r["lr_scale"] for _, r in rolls] == [0.25 ** (k + 1) for k in range(len(rolls))]
    # The steps after a rollback run at the lowered learning rate.
    i, first = rolls[0]
    assert recs[i + 1]["lr"] == DIVERGE["lr"] * 0.25
    # The rolled-back weights are exactly the weights after `to_step` steps: rebuild them from
    # the journal prefix that ends there.
    prefix = tmp_path / "prefix.bin"
    with Journal(prefix) as j:
        for r in recs:
            if r.get("kind") == "step" and r["step"] >= first["to_step"]:
                break
            j.append(r)
    at_target, n = replay_journal(bundle, prefix)
    assert n == first["to_step"]
    assert at_target.digest() == first["sha256"]
    store, _ = replay_journal(bundle, res["journal"])
    assert store.digest() == res["sha256"]


@pytest.mark.parametrize("cut", ["after_rollback_due_step", "after_rollback", "mid"])
def test_divergence_resume_equals_uninterrupted(tiny, tmp_path, cut) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    pol = DivergencePolicy(factor=2.0, patience=3, lr_scale=0.25, every=5)
    ref = train(bundle, ds, tmp_path / "ref", steps=60, seed=6, options=DIVERGE,
                divergence=pol)
    recs = read_journal(Path(ref["journal"]))[0]
    i = next(k for k, r in enumerate(recs) if r.get("kind") == "rollback")
    keep = {"after_rollback_due_step": i, "after_rollback": i + 1, "mid": i + 4}[cut]
    run = tmp_path / "run"
    run.mkdir()
    # A crashed run: the journal prefix, and the checkpoint files of the reference run (which
    # may be ahead of the prefix, then they must be ignored).
    with Journal(run / JOURNAL) as j:
        for r in recs[:keep]:
            j.append(r)
    res = train(bundle, ds, run, steps=60, seed=6, options=DIVERGE, divergence=pol)
    assert res["sha256"] == ref["sha256"]
    assert read_journal(run / JOURNAL)[0] == recs


def _rollbacks(policy: dict, losses) -> list[int]:
    """Steps at which a rule fed these step losses rolls back (each rollback then done)."""
    rule = GuardRule({"factor": 3.0, "patience": 20, "lr_scale": 0.5, "every": 1 << 30,
                      **policy})
    out = []
    for t, loss in enumerate(losses):
        if rule.feed_step({"step": t, "evals": [float(loss)], "accepted": True}) == "rollback":
            out.append(t)
            rule.rolled_back()
    return out


NOISY = np.random.default_rng(3).lognormal(np.log(0.2), 1.0, 3000)  # batch losses, no trend


def test_divergence_level_ignores_noise_and_catches_a_blow_up() -> None:
    """Noisy batch losses without a trend (their minimum an outlier far below the rest) trip
    the raw-loss rule of older runs again and again; the smoothed level never; a real blow-up
    is caught within a few steps of the patience; after a rollback the level starts over."""
    legacy = {}  # a header without smoothing: the former rule
    assert len(_rollbacks(legacy, NOISY)) > 10
    assert _rollbacks({"smoothing": 0.9}, NOISY) == []
    blow_up = np.concatenate([NOISY[:500], 0.2 * 1.5 ** np.arange(1, 40)])
    (at,) = _rollbacks({"smoothing": 0.9}, blow_up)
    assert 500 + 20 <= at < 500 + 30
    # after the rollback the restored weights give losses at their former (higher) level:
    # judged by their own losses, not by the minimum reached before the rollback
    after = np.concatenate([NOISY[:500], 0.2 * 1.5 ** np.arange(1, 30), 2.0 * NOISY[:1000]])
    assert len(_rollbacks({"smoothing": 0.9}, after)) == 1
    assert len(_rollbacks(legacy, after)) > 10


def test_run_journaled_with_the_former_rule_resumes_and_replays(tiny, tmp_path,
                                                               monkeypatch) -> None:
    """A run whose header has no smoothing (journaled before it existed) resumes under the
    same policy and replays, following the former rule (bit-identical to its uninterrupted
    run)."""
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    pol = DivergencePolicy(factor=2.0, patience=3, lr_scale=0.25, every=5)
    to_json = DivergencePolicy.to_json

    def former(self, opt, every):  # the header an older edgelearn wrote
        return {k: v for k, v in to_json(self, opt, every).items() if k != "smoothing"}

    with monkeypatch.context() as m:
        m.setattr(DivergencePolicy, "to_json", former)
        ref = train(bundle, ds, tmp_path / "ref", steps=60, seed=6, options=DIVERGE,
                    divergence=pol)
    recs = read_journal(Path(ref["journal"]))[0]
    assert "smoothing" not in recs[0]["divergence"]
    assert any(r.get("kind") == "rollback" for r in recs)
    run = tmp_path / "run"
    run.mkdir()
    with Journal(run / JOURNAL) as j:
        for r in recs[:25]:
            j.append(r)
    res = train(bundle, ds, run, steps=60, seed=6, options=DIVERGE, divergence=pol)
    assert read_journal(run / JOURNAL)[0] == recs
    assert res["sha256"] == ref["sha256"]
    store, _ = replay_journal(bundle, ref["journal"])
    assert store.digest() == ref["sha256"]
    # another smoothing than the default is a change of settings, not the former rule
    with pytest.raises(InputError, match=r"divergence smoothing unset -> 0\.5"):
        train(bundle, ds, run, steps=70, seed=6, options=DIVERGE,
              divergence=DivergencePolicy(factor=2.0, patience=3, lr_scale=0.25, every=5,
                                          smoothing=0.5))
    # a header's smoothing that is no number in [0, 1) is refused in one line
    for bad in ("0.9", 1.0, True, -0.5):
        hostile = tmp_path / f"hostile{bad}.bin"
        with Journal(hostile) as j:
            j.append({**recs[0], "divergence": {**recs[0]["divergence"], "smoothing": bad}})
            for r in recs[1:10]:
                j.append(r)
        with pytest.raises(InputError, match="malformed divergence smoothing"):
            replay_journal(bundle, hostile)


def test_endless_rollbacks_stop_with_one_clear_error(tiny, tmp_path) -> None:
    """Rollbacks that would take the lr scale below MIN_LR_SCALE (next: an underflow to 0)
    stop the run with one clear error (it used to fail later on "bad lr_scale in optimizer
    state: 0.0")."""
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    pol = DivergencePolicy(factor=1.001, patience=1, lr_scale=1e-120, every=1 << 20)
    with pytest.raises(InputError, match="kept diverging: rollbacks took the learning rate"):
        train(bundle, ds, tmp_path / "run", steps=2000, seed=6, options=DIVERGE,
              divergence=pol)
    recs = read_journal(tmp_path / "run" / JOURNAL)[0]
    scales = [r["lr_scale"] for r in recs if r.get("kind") == "rollback"]
    assert scales == [1e-120, 1e-120 * 1e-120]
    assert 1e-120 * scales[-1] < MIN_LR_SCALE


def test_divergence_policy_validation(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), _data(data)
    for bad, match in [({"factor": 1.0}, "factor"), ({"patience": 0}, "patience"),
                       ({"lr_scale": 0.0}, "lr_scale"), ({"every": 0}, "period"),
                       ({"smoothing": 1.0}, "smoothing"), ({"smoothing": -0.1}, "smoothing")]:
        with pytest.raises(InputError, match=match):
            train(bundle, ds, tmp_path / "x", steps=1, divergence=DivergencePolicy(**bad))


def test_rollback_record_in_journal_without_policy_is_refused(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle = load_bundle(bundle_dir)
    res = train(bundle, _data(data), tmp_path / "run", steps=3, seed=1)
    with Journal(res["journal"]) as j:
        j.append({"kind": "rollback", "step": 3, "to_step": 0, "lr_scale": 0.5, "sha256": "0"})
    with pytest.raises(InputError, match="no divergence policy"):
        replay_journal(bundle, res["journal"])


# -- concurrency --------------------------------------------------------------------------------
def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "edgelearn.cli", *args]


def test_second_trainer_refused_while_lock_held(tiny, tmp_path) -> None:
    bundle, data = tiny
    run = tmp_path / "run"
    run.mkdir()
    with run_lock(run):
        out = subprocess.run(_cli("train", str(bundle), "--data", str(data), "--out", str(run),
                                  "--steps", "5"), capture_output=True, text=True)
    assert out.returncode == 2
    assert "in use by another edgelearn process" in out.stderr
    assert not (run / JOURNAL).exists()  # it never touched the journal


def test_two_cli_trainers_same_dir_one_refused(tiny, tmp_path) -> None:
    bundle, data = tiny
    run = tmp_path / "run"
    # the first run cannot finish before the second starts: it is killed once refused
    first = subprocess.Popen(_cli("train", str(bundle), "--data", str(data), "--out", str(run),
                                  "--steps", "10000000", "--threads", "1", "--json"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (run / JOURNAL).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        second = subprocess.run(_cli("train", str(bundle), "--data", str(data), "--out",
                                     str(run), "--steps", "400", "--json"),
                                capture_output=True, text=True)
        assert first.poll() is None  # still training while the second was refused
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert second.returncode == 2
    assert "in use" in second.stderr
    recs = read_journal(run / JOURNAL)[0]
    assert len(recs) > 1
    assert [r["step"] for r in recs[1:]] == list(range(len(recs) - 1))  # one writer only


# -- nothing outside the run directory ----------------------------------------------------------
def _tree(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))}


def test_training_writes_only_inside_run_dir(tiny, tmp_path, monkeypatch) -> None:
    bundle_dir, data = tiny
    bundle = load_bundle(bundle_dir)
    outside = _tree(bundle_dir.parent)
    cwd_before = _tree(tmp_path)
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "run"
    train(bundle, _data(data), run, steps=15, seed=1, checkpoint_every=4)
    replay_journal(bundle, run / JOURNAL)
    assert _tree(bundle_dir.parent) == outside
    after = _tree(tmp_path)
    new = {k for k in after if k not in cwd_before}
    assert new
    assert all(k == "run" or k.startswith("run/") for k in new), new
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["journal.bin", "checkpoint.safetensors", "checkpoint.json", "weights.safetensors",
         "lock", "session.json"])


def test_symlinked_run_file_refused(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    run = tmp_path / "run"
    run.mkdir()
    target = tmp_path / "elsewhere.bin"
    (run / "weights.safetensors").symlink_to(target)
    with pytest.raises(InputError, match="symlink"):
        train(load_bundle(bundle_dir), _data(data), run, steps=2)
    assert not target.exists()
