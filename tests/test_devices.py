"""Device profiles, detection, and the memory budget (shrink the batch or refuse)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgelearn.budget import plan_batch
from edgelearn.bundle import load_bundle
from edgelearn.cli import main
from edgelearn.devices import detect, list_profiles, load_profile, resolve_backend
from edgelearn.errors import InputError


def test_shipped_profiles_load_and_say_what_the_issue_needs() -> None:
    names = list_profiles()
    for want in ("raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "generic-x86_64"):
        assert want in names
    for name in names:
        p = load_profile(name)
        assert p.arch in ("aarch64", "x86_64")
        assert p.memory_budget_mb
        assert p.memory_budget_mb > 0
        assert p.backends
        assert p.runtimes
        for constraints in p.runtimes.values():
            assert "python" in constraints
            assert "glibc" in constraints
    assert load_profile("raspberry-pi-4").runtimes["tflite-runtime"]["glibc"] == ">=2.34"
    assert "CUDAExecutionProvider" in load_profile("jetson-orin-nano").providers


def test_bad_profiles_are_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown device"):
        load_profile("toaster")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmemory_budget_mb = -5\n')
    with pytest.raises(InputError, match="positive"):
        load_profile(str(bad))
    bad.write_text("this is = = not toml")
    with pytest.raises(InputError, match="TOML"):
        load_profile(str(bad))
    bad.write_text('colour = "red"\n')
    with pytest.raises(InputError, match="unknown profile keys"):
        load_profile(str(bad))


def test_detect_finds_this_machine() -> None:
    m = detect()
    assert m["cores"] >= 1
    assert m["memory_total_mb"] > 0
    assert "onnxruntime" in m["backends"]
    assert m["profile"] in list_profiles()
    assert resolve_backend(load_profile(m["profile"]), None) == "onnxruntime"


@pytest.mark.torch
def test_budget_shrinks_the_batch_and_the_run_stays_under_it(bundles, tmp_path) -> None:
    """In fresh processes (their own peak RSS): a budget sized for ~300 examples of
    activations on top of the loaded model shrinks a 4096 batch, and the run's real peak stays
    under the budget."""
    bundle = load_bundle(bundles["cnn"].path)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((4096, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 4096))
    per_ex_mb = plan_batch(bundle, batch_size=1, budget_mb=1e6, base_mb=0.0)[
        "activation_kb_per_example"] / 1024

    def run(out: str, batch: int, budget: float) -> dict:
        cmd = [sys.executable, "-m", "edgelearn.cli", "train", str(bundle.path), "--data",
               str(data), "--steps", "3", "--out", str(tmp_path / out), "--batch-size",
               str(batch), "--memory-budget-mb", str(budget), "--json"]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                         text=True).stdout)

    small = run("small", 1, 1e6)
    budget = (small["peak_rss_mb"] + 300 * per_ex_mb) * 1.10
    res = run("big", 4096, budget)
    assert 1 <= res["batch_size"] < 4096
    assert res["memory_plan"]["predicted_peak_mb"] <= budget
    assert res["peak_rss_mb"] <= budget


@pytest.mark.torch
def test_budget_too_small_refuses_before_training(bundles, tmp_path, capsys) -> None:
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((64, 64)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    code = main(["train", str(bundles["mlp"].path), "--data", str(data), "--steps", "5",
                 "--out", str(tmp_path / "run"), "--memory-budget-mb", "20"])
    err = capsys.readouterr().err
    assert code == 2
    assert "memory budget" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "journal.bin").exists()


@pytest.mark.torch
def test_device_command_sizes_a_bundle(bundles, capsys) -> None:
    assert main(["device", str(bundles["mlp"].path), "--device", "raspberry-pi-4",
                 "--backend", "onnxruntime", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["profile"]["name"] == "raspberry-pi-4"
    assert res["bundle"]["budget_mb"] == 1024
    assert res["bundle"]["max_batch"]["zo-sgd"] == 32
    assert main(["device", "--list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["profiles"]) == len(list_profiles())
