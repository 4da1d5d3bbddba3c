"""The journaled identity of each step's batch: per-example digests (`batch_digest`, new runs)
and the whole batch's sha256 (`batch_sha256`, runs journaled before them, kept when resumed).

Torch-free: the shipped demo bundle and digits. The old-scheme runs in
tests/data/batch_sha256_runs were written by edgelearn before `batch_digest` (make_runs.py
there says how); weights are compared with fresh runs on this machine, never with digests
recorded elsewhere.
"""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import edgelearn as el
from edgelearn.data import ExampleDigests, batch_digest, batch_indices, example_digests
from edgelearn.demo import DATA, demo_data
from edgelearn.journal import Journal, read_journal

OLD = Path(__file__).parent / "data" / "batch_sha256_runs"
RT = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
TPD = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*", seed=3,
                     batch_size=8, checkpoint_every=4)
TPL = el.TrainConfig(optimizer="tpsgd", options={"lr": 0.1}, trainable="head.*", seed=3,
                     checkpoint_every=4, record_samples=True)


def _datasets() -> dict[str, el.Dataset]:
    rng = np.random.default_rng(0)
    n = 10
    ids = rng.integers(0, 50, (n, 4)).astype(np.int64)
    return {
        "single": el.Dataset(rng.standard_normal((n, 3, 2)).astype(np.float32),
                             rng.integers(0, 3, n)),
        "multi_constant": el.Dataset({"ids": ids, "f": rng.standard_normal((n, 5))
                                      .astype(np.float32)},
                                     rng.standard_normal((n, 2)).astype(np.float32),
                                     {"table": np.arange(6, dtype=np.float32)}),
        # a constant as long as a batch of 4 reads as per-example in that batch
        "constant_like_batch": el.Dataset({"ids": ids}, rng.integers(0, 3, n),
                                          {"state": np.ones((4, 2), np.float32)}),
    }


@pytest.mark.parametrize("name", list(_datasets()))
def test_data_set_digests_equal_the_batch_rows_digest(name: str) -> None:
    data = _datasets()[name]
    digests = ExampleDigests(data)
    for step in (0, 1, 2, 3, 0, 7):  # some examples already digested, some not
        x, y = data.batch_at(step, 4, seed=5)
        idx = batch_indices(len(data), 4, step, 5)
        assert digests.batch_digest(idx) == batch_digest(x, y)
    x, y = data.batch_at(0, 4, seed=5)
    rows = example_digests(x, y)  # an example's digest does not depend on its batch
    one = example_digests({k: v[1:2] if np.ndim(v) and len(v) == 4 else v
                           for k, v in x.items()} if isinstance(x, dict) else x[1:2], y[1:2])
    if name != "constant_like_batch":
        assert rows.shape == (4, 32)
        assert bytes(rows[1]) == bytes(one[0])


def test_batch_digest_sees_every_example() -> None:
    data = _datasets()["single"]
    x, y = data.x[:4].copy(), data.y[:4].copy()
    base = batch_digest(x, y)
    x2 = x.copy()
    x2[2, 1, 0] = np.nextafter(x2[2, 1, 0], np.float32(np.inf))  # one float of one example
    y2 = y.copy()
    y2[3] = (y2[3] + 1) % 3
    changed = [batch_digest(x2, y), batch_digest(x, y2), batch_digest(x[[1, 0, 2, 3]],
               y[[1, 0, 2, 3]]), batch_digest(x.astype(np.float64), y), batch_digest(x[:3], y[:3])]
    assert len({base, *changed}) == 1 + len(changed)


@pytest.fixture(scope="module")
def bundle() -> el.Bundle:
    return el.load_bundle(DATA / "demo")


@pytest.fixture(scope="module")
def train() -> el.Dataset:
    return demo_data(0)[0]


def _run(bundle: el.Bundle, run: Path, train: el.Dataset, steps: int) -> str:
    with el.Session(bundle, run, TPD, RT) as s:
        s.run(train, steps)
        return s.digest()


def _live(bundle: el.Bundle, run: Path, train: el.Dataset, lo: int, hi: int) -> str:
    with el.Session(bundle, run, TPL, RT) as s:
        assert s.steps_done == lo
        for i in range(lo, hi):
            s.step((train.x[i], train.y[i]))
        return s.digest()


def test_new_runs_journal_batch_digests(bundle, train, tmp_path) -> None:
    whole = _run(bundle, tmp_path / "whole", train, 10)
    _run(bundle, tmp_path / "cut", train, 4)
    resumed = _run(bundle, tmp_path / "cut", train, 10)
    journal = tmp_path / "cut" / "journal.bin"
    assert resumed == whole == el.replay(bundle, journal, data=train).sha256
    records = read_journal(journal)[0]
    assert records[0]["batch_identity"] == "example-sha256"
    assert [r["batch_digest"] for r in records[1:]] == [
        batch_digest(*train.batch_at(t, 8, 3)) for t in range(10)]
    assert not any("batch_sha256" in r for r in records)
    live = _live(bundle, tmp_path / "live", train, 0, 3)
    assert live == el.replay(bundle, tmp_path / "live" / "journal.bin").sha256
    records = read_journal(tmp_path / "live" / "journal.bin")[0]
    one = ExampleDigests(el.Dataset(train.x[:3], train.y[:3]))  # one meaning: per example
    assert [r["batch_digest"] for r in records[1:]] == [
        batch_digest(train.x[i:i + 1], train.y[i:i + 1]) for i in range(3)] == [
        one.batch_digest(np.array([i])) for i in range(3)]


@pytest.mark.parametrize("kind", ["tpsgd_data", "tpsgd_live"])
def test_old_runs_replay_and_resume_in_their_scheme(bundle, train, tmp_path, kind) -> None:
    expected = json.loads((OLD / "expected.json").read_text())[kind]
    run = tmp_path / kind
    shutil.copytree(OLD / kind, run)
    header = read_journal(run / "journal.bin")[0][0]
    assert "batch_identity" not in header
    start, end = (6, expected["steps_uninterrupted"]) if kind == "tpsgd_data" else (5, 8)
    if kind == "tpsgd_data":
        replayed = el.replay(bundle, run / "journal.bin", data=train)
        fresh = [_run(bundle, tmp_path / f"new{n}", train, n) for n in (start, end)]
        resumed = _run(bundle, run, train, end)
    else:
        replayed = el.replay(bundle, run / "journal.bin")
        fresh = [_live(bundle, tmp_path / f"new{n}", train, 0, n) for n in (start, end)]
        resumed = _live(bundle, run, train, start, end)
    assert replayed.sha256 == fresh[0]  # the scheme does not touch the weights
    records = read_journal(run / "journal.bin")[0]
    assert records[0] == header  # it keeps its scheme
    assert [r.get("batch_sha256") for r in records[1:]] == expected["batch_sha256"]
    assert not any("batch_digest" in r for r in records)
    again = el.replay(bundle, run / "journal.bin", data=train if kind == "tpsgd_data" else None)
    assert resumed == again.sha256 == fresh[1]


def _tamper_samples(path: Path, step: int) -> None:
    """Rewrite samples.bin with one float of one example of `step` changed."""
    records = read_journal(path)[0]
    path.unlink()
    journal = Journal(path)
    for rec in records:
        if rec["step"] == step:
            raw = bytearray(base64.b64decode(rec["x"]["b64"]))
            raw[5] ^= 1
            rec["x"]["b64"] = base64.b64encode(bytes(raw)).decode("ascii")
        journal.append(rec)
    journal.close()


@pytest.mark.parametrize("scheme", ["batch digest", "batch sha256"])
def test_replay_refuses_a_batch_with_one_example_changed(bundle, train, tmp_path,
                                                         scheme) -> None:
    run = tmp_path / "r"
    if scheme == "batch digest":
        _live(bundle, run, train, 0, 4)
    else:
        shutil.copytree(OLD / "tpsgd_live", run)
    _tamper_samples(run / "samples.bin", 2)
    with pytest.raises(el.InputError) as err:
        el.replay(bundle, run / "journal.bin")
    assert str(err.value) == (f"step 2 was fed other data than its journal record says "
                              f"({scheme} differs)")


def test_cached_steps_take_no_rows_they_do_not_read(bundle, train, tmp_path) -> None:
    """zo-sgd on cached features: a warm batch comes without its rows (x None) unless the
    loop reads them itself; the journal is the uncached run's, byte for byte."""
    cfg = el.TrainConfig(optimizer="zo-sgd", population=False, trainable="head.*",
                         batch_size=8, seed=3)
    runs = {}
    for cache in (True, False):
        rt = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None,
                              prefix_cache=cache)
        with el.Session(bundle, tmp_path / str(cache), cfg, rt) as s:
            runs[cache] = s.run(train, 60)  # past one epoch (49 batches of 8)
            if cache:
                ev = s.evaluator
                lean = ev.indexed_batches(train, 8, 3, rows=False)
                full = ev.indexed_batches(train, 8, 3, rows=True)
                x, y = lean(50)
                assert x is None
                assert np.array_equal(y, train.batch_at(50, 8, 3)[1])
                assert np.array_equal(full(50)[0], train.batch_at(50, 8, 3)[0])
    assert runs[True].cache["enabled"]
    assert runs[False].cache is None
    assert runs[True].sha256 == runs[False].sha256
    assert Path(runs[True].journal).read_bytes() == Path(runs[False].journal).read_bytes()
    records = read_journal(runs[True].journal)[0]
    assert all("batch_digest" in r for r in records[1:])
