"""ZO-SGD on a real bundle: torch parity, replay, resume, determinism, learning, no torch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from sessions import replay_journal, train

from edgelearn.bundle import load_bundle
from edgelearn.data import Dataset
from edgelearn.journal import read_journal
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer
from edgelearn.rng import Noise
from edgelearn.training.rundir import JOURNAL

pytestmark = pytest.mark.torch


def _noise_by_name(store, seed_triple, kind="rademacher") -> dict[str, np.ndarray]:
    """The device's z for one probe, split into named tensors like the arena slice."""
    n = store.n_trainable("float32")
    z = Noise(kind).fill(np.empty(n, np.float32), run_seed=seed_triple[0],
                         step=seed_triple[1], probe=seed_triple[2], start=0)
    return {name: z[a:b].reshape(store[name].shape) for name, a, b in store.segments()}


@pytest.mark.parametrize(("arch", "trainable"), [("mlp", "*"), ("cnn", "head.*")])
def test_one_step_matches_torch_reference(bundles, arch, trainable) -> None:
    import torch
    from torch_reference import zo_sgd_step

    ex = bundles[arch]
    model = Model(load_bundle(ex.path), trainable=trainable)
    store = model.store
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, *ex.example_shape[1:])).astype(np.float32)
    y = rng.integers(0, 10, 16)
    params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    z = _noise_by_name(store, (5, 0, 0))
    lr, eps = 1e-3, 1e-3
    opt = make_optimizer("zo-sgd", lr=lr, eps=eps, seed=5, restore="copy")
    info = opt.step(store, lambda: cross_entropy(model.predict(x), y))

    new, g, (lp, lm) = zo_sgd_step(ex.module, params, {k: torch.from_numpy(v) for k, v in
                                                       z.items()},
                                   torch.from_numpy(x), torch.from_numpy(y), lr=lr, eps=eps)
    np.testing.assert_allclose(info.record["evals"], [lp, lm], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(info.record["g"][0], g, atol=1e-3)
    for name, t in new.items():
        np.testing.assert_allclose(store[name], t.numpy(), atol=1e-6, rtol=0)
    for name in store.names:  # frozen tensors untouched
        if name not in new:
            np.testing.assert_array_equal(store[name], params[name].numpy())


@pytest.fixture(scope="module")
def digits_split(digits) -> tuple[Dataset, Dataset]:
    return Dataset(digits.x[:1200], digits.y[:1200]), Dataset(digits.x[1200:], digits.y[1200:])


@pytest.fixture(scope="module")
def headless_bundle(digits_split, tmp_path_factory) -> Path:
    """zoo MLP pretrained by backprop on digits, then a fresh (random) head: the device must
    learn the head back with forward passes only."""
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import MLP

    train_set, _ = digits_split
    torch.manual_seed(0)
    m = MLP(64, (64,), 10)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x, y = torch.from_numpy(train_set.x), torch.from_numpy(train_set.y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(m(x), y).backward()
        opt.step()
    m.head.reset_parameters()
    out = tmp_path_factory.mktemp("zo") / "digits_mlp"
    export_bundle(m, x[:2], out, trainable="head.*")
    return out


def test_head_finetune_on_digits_reduces_loss(headless_bundle, digits_split, tmp_path) -> None:
    train_set, test_set = digits_split
    bundle = load_bundle(headless_bundle)
    before = Model(bundle, trainable=()).evaluate(test_set)
    res = train(bundle, train_set, tmp_path / "run", options={"lr": 0.003, "eps": 1e-3},
                steps=300, batch_size=32, seed=1)
    after = Model(bundle, trainable=(), weights=res["weights"]).evaluate(test_set)
    assert after["loss"] < 0.6 * before["loss"]
    assert after["accuracy"] > before["accuracy"] + 0.3
    assert after["accuracy"] > 0.4  # chance is 0.1


@pytest.mark.parametrize("restore", ["copy", "drift"])
def test_replay_sha_equals_trained_after_200_steps(headless_bundle, digits_split, tmp_path,
                                                    restore) -> None:
    bundle = load_bundle(headless_bundle)
    res = train(bundle, digits_split[0], tmp_path / "run", steps=200, seed=3,
                options={"lr": 0.003, "restore": restore, "probes": 2}, trainable="*")
    store, steps = replay_journal(bundle, res["journal"])
    assert steps == 200
    assert store.digest() == res["sha256"]


def test_resume_equals_uninterrupted(headless_bundle, digits_split, tmp_path) -> None:
    bundle = load_bundle(headless_bundle)
    opts = {"lr": 0.003}
    full = train(bundle, digits_split[0], tmp_path / "full", steps=150, seed=4, options=opts)
    # Stop at 70 (checkpoint at 50, 20 journal records after it), then resume to 150.
    part = tmp_path / "part"
    train(bundle, digits_split[0], part, steps=70, seed=4, options=opts, checkpoint_every=50)
    res = train(bundle, digits_split[0], part, steps=150, seed=4, options=opts,
                checkpoint_every=50)
    assert res["resumed_from"] == 70
    assert res["sha256"] == full["sha256"]
    # Changed settings refuse to resume into the same directory.
    with pytest.raises(Exception, match="different settings"):
        train(bundle, digits_split[0], part, steps=160, seed=5, options=opts)


def test_killed_cli_run_resumes_bit_identical(headless_bundle, digits_split, tmp_path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=digits_split[0].x, y=digits_split[0].y)
    cmd = [sys.executable, "-m", "edgelearn.cli", "train", str(headless_bundle), "--data",
           str(data), "--optimizer", "zo-sgd", "--steps", "1500", "--lr", "0.003", "--seed", "9",
           "--json",
           "--checkpoint-every", "37"]
    ref = json.loads(subprocess.run([*cmd, "--out", str(tmp_path / "ref")], check=True,
                                    capture_output=True, text=True).stdout)
    run = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(run)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if (run / JOURNAL).exists() and len(read_journal(run / JOURNAL)[0]) > 60:
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(read_journal(run / JOURNAL)[0]) - 1
    assert 0 < done < 1500, "the run was not interrupted"
    out = subprocess.run([*cmd, "--out", str(run)], check=True, capture_output=True, text=True)
    res = json.loads(out.stdout)
    assert res["resumed_from"] >= done
    assert res["sha256"] == ref["sha256"]
    rep = subprocess.run([sys.executable, "-m", "edgelearn.cli", "replay", str(headless_bundle),
                          str(run / JOURNAL), "--out", str(tmp_path / "w.safetensors"), "--json"],
                         check=True, capture_output=True, text=True)
    assert json.loads(rep.stdout)["sha256"] == ref["sha256"]


def test_chunk_size_independent_and_deterministic(headless_bundle, digits_split) -> None:
    bundle = load_bundle(headless_bundle)
    x, y = digits_split[0].x[:32], digits_split[0].y[:32]
    digests = []
    for chunk in (1000 + 24, 4104, 1 << 16, 1 << 16):
        model = Model(bundle, trainable="*")
        opt = make_optimizer("zo-sgd", lr=0.01, seed=2, chunk=chunk, restore="drift")
        for _ in range(5):
            opt.step(model.store, lambda m=model: cross_entropy(m.predict(x), y))
        digests.append(model.store.digest())
    assert len(set(digests)) == 1


def test_train_cli_never_imports_torch(headless_bundle, digits_split, tmp_path) -> None:
    data = tmp_path / "d.npz"
    np.savez(data, x=digits_split[0].x[:200], y=digits_split[0].y[:200])
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['edgelearn', 'train', {str(headless_bundle)!r}, '--data', {str(data)!r},"
        f" '--steps', '20', '--out', {str(tmp_path / 'run')!r}, '--json']\n"
        "try:\n"
        "    runpy.run_module('edgelearn.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "bad = [m for m in ('torch', 'onnxscript') if m in sys.modules]\n"
        "assert not bad, bad\n"
        "print('CLEAN')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         check=True)
    assert "CLEAN" in out.stdout
