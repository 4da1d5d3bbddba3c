"""PolyStep on real bundles: torch reference step, population graph, non-differentiable nets,
CLI train + replay bit-exact."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from sessions import train

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import Population, make_optimizer, optimizer_from_config
from edgelearn.optim.polystep import (
    VERTICES,
    assignment,
    cosine,
    projection_block,
    rotation,
)
from edgelearn.portable import mix

pytestmark = pytest.mark.torch


def test_assignment_and_schedule_basics() -> None:
    w = assignment(np.arange(16.0), 0.1)
    assert w.argmax() == 0
    assert abs(w.sum() - 1.0) < 1e-12
    np.testing.assert_array_equal(assignment(np.ones(16), 0.1), np.full(16, 1 / 16))
    assert cosine(0, 10, 1.0, 0.1) == 1.0
    assert abs(cosine(10, 10, 1.0, 0.1) - 0.1) < 1e-12


def test_rotation_is_a_rotation() -> None:
    for seed in range(20):
        q = rotation(seed, 3, seed % 4)
        np.testing.assert_allclose(q @ q.T, np.eye(8), atol=1e-14)
        assert abs(np.linalg.det(q) - 1.0) < 1e-12
    # Haar on SO(8): E[q_00^2] = 1/8 (sd of the mean over 2000 draws ~ 0.003)
    assert abs(np.mean([rotation(1, t, 0)[0, 0] ** 2 for t in range(2000)]) - 0.125) < 0.015


# sha256 of seeded rotations, assignments, projections and schedule values: these are pure
# IEEE float operations (no LAPACK/BLAS/libm), so every CPU must produce exactly these bits
# (benchmarks/arm_replay.py checked them on aarch64). A change here breaks old journals.
PORTABLE_SHA256 = "8f1d6232e57136f404cbdf272c262858022f16fb83a22fd483bd544f81cb5d31"


def portable_digest() -> str:
    h = hashlib.sha256()
    for s in range(3):
        r = rotation(s, 7, s + 1)
        h.update(r.tobytes())
        h.update(assignment(np.linspace(0.3, 2.0, 16) ** 2, 0.05).tobytes())
        h.update(mix((0.01 * r[0]).astype(np.float32), projection_block(s, 7, 0, 37)).tobytes())
        h.update(np.float64(cosine(s + 3, 11, 0.05, 0.005)).tobytes())
    return h.hexdigest()


def test_seeded_draws_are_pinned_bits() -> None:
    assert portable_digest() == PORTABLE_SHA256


def test_journal_of_qr_rotations_is_refused() -> None:
    config = make_optimizer("polystep").config()
    assert config["rotation"] == 2
    del config["rotation"]  # a header written before version 2
    with pytest.raises(InputError, match=r"LAPACK QR.*cannot reproduce it"):
        optimizer_from_config("polystep", config)


def test_one_step_matches_torch_reference(bundles) -> None:
    import torch
    from torch_reference import polystep_step

    ex = bundles["mlp"]
    model = Model(load_bundle(ex.path), trainable="head.*")
    store = model.store
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    opt = make_optimizer("polystep", rank=16, radius=0.05, eps=0.2, seed=3)
    parts = opt.particles(store)
    names = [next(n for n, a, b in store.segments() if (a, b) == p) for p in parts]
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y))
    assert info.evaluations == VERTICES * len(parts) == 64

    new, losses, dxs = polystep_step(
        ex.module, params, [(n, i) for i, n in enumerate(names)], torch.from_numpy(x),
        torch.from_numpy(y), seed=3, step=0, eps=0.2, radius=0.05, probe_radius=0.05)
    np.testing.assert_allclose(info.record["evals"], losses, rtol=0, atol=1e-6)
    np.testing.assert_allclose(info.record["dx"], [d.numpy() for d in dxs], rtol=0, atol=1e-6)
    for name, t in new.items():
        np.testing.assert_allclose(store[name], t.numpy(), rtol=0, atol=1e-6)
    for name in store.names:
        if name not in new:
            np.testing.assert_array_equal(store[name], params[name].numpy())


@pytest.fixture(scope="module")
def nondiff(tmp_path_factory) -> dict[str, Path]:
    """Non-differentiable zoo nets exported with a population graph over their head."""
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.population import add_population_graph
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("nondiff")
    out = {}
    for name in ("hard_threshold", "spiking"):
        factory, shape = ZOO[name]
        torch.manual_seed(1)
        module = factory()
        export_bundle(module, torch.randn(1, *shape), root / name, trainable="head.*")
        add_population_graph(module, torch.randn(1, *shape), root / name)
        out[name] = root / name
    return out


def test_population_graph_scores_like_single_forwards(nondiff) -> None:
    from edgelearn.backends.ort_population import OrtPopulation

    model = Model(load_bundle(nondiff["hard_threshold"]), trainable="head.*")
    store = model.store
    pop_eval = OrtPopulation(model.bundle, store)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    y = np.arange(8) % 10
    opt = make_optimizer("polystep", rank=16, radius=0.05, seed=1)
    seen: list[list[float]] = []

    def batched(pop: Population) -> list[float]:
        # One runtime call for all candidates, then the same candidates placed one by one.
        fast = pop_eval.losses(pop, x, y, cross_entropy)
        slow = []
        for j in range(pop.size):
            pop.place(j)
            slow.append(cross_entropy(model.predict(x), y))
        seen.append(fast)
        np.testing.assert_allclose(fast, slow, rtol=0, atol=1e-6)
        return fast

    before = store.copy()
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y), batched)
    assert info.record["evals"] == seen[0]
    assert len(seen[0]) == 64
    # Replay re-feeds the population's losses: same weights bit for bit.
    make_optimizer("polystep", rank=16, radius=0.05, seed=1).replay(before, info.record)
    assert before.digest() == store.digest()


@pytest.mark.parametrize("arch", ["hard_threshold", "spiking"])
@pytest.mark.parametrize("optimizer", ["polystep", "zo-sgd"])
def test_learns_non_differentiable_net(nondiff, digits, tmp_path, arch, optimizer) -> None:
    data = Dataset(digits.x[:600], digits.y[:600])
    bundle = load_bundle(nondiff[arch])
    before = Model(bundle).evaluate(data)["loss"]
    if optimizer == "polystep":
        opts, steps = {"rank": 16, "radius": 0.2, "eps": 0.1, "total_steps": 100}, 100
    else:
        opts, steps = {"lr": 0.3, "eps": 1e-2, "probes": 4}, 300
    res = train(bundle, data, tmp_path / "run", optimizer=optimizer, options=opts,
                steps=steps, batch_size=64, seed=0)
    assert res["population_graph"]  # available; only population requests (polystep) use it
    after = Model(bundle, weights=res["weights"]).evaluate(data)["loss"]
    assert after < 0.8 * before, (before, after)


def _cli(capsys, *args: str) -> dict:
    from edgelearn.cli import main

    code = main([*args, "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def test_cli_train_polystep_resume_and_replay_bit_exact(nondiff, digits_npz, tmp_path,
                                                         capsys) -> None:
    b = str(nondiff["spiking"])
    common = ["--data", str(digits_npz), "--optimizer", "polystep", "--opt", "radius=0.05",
              "--opt", "rank=8", "--opt", "total_steps=8", "--checkpoint-every", "3"]
    run = tmp_path / "run"
    res = _cli(capsys, "train", b, *common, "--steps", "4", "--out", str(run))
    assert res["optimizer"] == "polystep"
    assert res["population_graph"]
    rep = _cli(capsys, "replay", b, res["journal"], "--out", str(tmp_path / "w.safetensors"))
    assert rep["sha256"] == res["sha256"]
    assert rep["steps"] == 4
    # Resume to 8 steps == 8 steps from scratch, bit for bit.
    resumed = _cli(capsys, "train", b, *common, "--steps", "8", "--out", str(run))
    fresh = _cli(capsys, "train", b, *common, "--steps", "8", "--out", str(tmp_path / "f"))
    assert resumed["resumed_from"] == 4
    assert resumed["sha256"] == fresh["sha256"] != res["sha256"]


def test_cli_rejects_bad_opt(nondiff, digits_npz, tmp_path, capsys) -> None:
    from edgelearn.cli import main

    for bad in ("nonsense=1", "novalue"):
        code = main(["train", str(nondiff["spiking"]), "--data", str(digits_npz),
                     "--optimizer", "polystep", "--steps", "1", "--out", str(tmp_path / "r"),
                     "--opt", bad])
        assert code == 2
        assert bad.split("=")[0] in capsys.readouterr().err


NO_TORCH_TRAIN = """
import json, sys
sys.modules['torch'] = None; sys.modules['onnxscript'] = None
import edgelearn as el
config = el.TrainConfig(optimizer={opt!r}, options={options!r}, trainable={trainable!r})
with el.Session({bundle!r}, {out!r}, config, el.RuntimeConfig(backend="onnxruntime")) as s:
    res = s.run(el.load_data({data!r}), 3).to_json()
print(json.dumps({{"res": res, "loaded": [m for m in ("torch", "export") if m in sys.modules
                                          and sys.modules[m] is not None]}}))
"""


def run_no_torch(tmp_path, **kw) -> dict:
    """Train in a fresh interpreter where `import torch` fails; returns the summary."""
    import subprocess
    import sys

    code = NO_TORCH_TRAIN.format(out=str(tmp_path / "run"), **kw)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["loaded"] == []
    return out["res"]


def test_polystep_population_trains_without_torch(nondiff, digits_npz, tmp_path) -> None:
    res = run_no_torch(tmp_path, bundle=str(nondiff["spiking"]), data=str(digits_npz),
                       opt="polystep", options={"radius": 0.1}, trainable=None)
    assert res["population_graph"]
    assert res["steps"] == 3
