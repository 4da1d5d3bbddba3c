"""`edgelearn demo`: the main job on shipped data, torch-free, with a real accuracy gain."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest


def test_demo_runs_without_torch_and_personalizes(tmp_path) -> None:
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['edgelearn', 'demo', '--out', {str(tmp_path)!r}, '--steps', '400',"
        " '--json']\n"
        "try:\n"
        "    runpy.run_module('edgelearn.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "assert 'torch' not in sys.modules\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=300)
    res = json.loads(out.stdout)
    assert res["accuracy_population"] > 0.9
    assert res["accuracy_before"] < res["accuracy_population"] - 0.3  # the shift is real
    assert {"zo-sgd", "tpsgd", "polystep"} <= set(res["accuracy_after"])
    for name, acc in res["accuracy_after"].items():
        assert acc > res["accuracy_before"] + 0.15, name
        run = res["optimizers"][name]
        assert (tmp_path / name / "journal.bin").is_file()
        assert run["steps"] == 400


def test_demo_human_output_names_every_optimizer(tmp_path, capsys) -> None:
    """The README's main command without --json (a population optimizer has no forward time)."""
    from edgelearn.cli import main

    assert main(["demo", "--out", str(tmp_path), "--steps", "20"]) == 0
    out = capsys.readouterr().out
    for name in ("zo-sgd", "tpsgd", "polystep"):
        assert f"after {name}" in out
    assert "torch was not used" in out


def test_bench_reports_forward_and_step_times(capsys) -> None:
    from edgelearn.cli import main
    from edgelearn.demo import DATA

    assert main(["bench", str(DATA / "demo"), "--runs", "3", "--steps", "3", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["forward_ms"] > 0
    assert res["forward_live_ms"] > 0
    for name in ("zo-sgd", "tpsgd", "polystep"):  # tpSGD through the bundle's taps graph
        assert isinstance(res["step_ms"][name], float), res["step_ms"][name]
        assert res["step_ms"][name] > 0
    assert res["step_ms"]["zo-scale"].startswith("n/a: not for this bundle: no int8 weights")
    assert res["peak_rss_mb"] > 0
    assert res["trainable_params"] == 650


def test_bench_says_why_tpsgd_is_not_timed(tmp_path, capsys) -> None:
    from bundle_edit import demo_bundle_without

    from edgelearn.cli import main

    bundle = demo_bundle_without(tmp_path / "b", ("onnx_taps", "tflite_taps"),
                                 taps_unsupported="layer 'act' is a GELU")
    assert main(["bench", str(bundle), "--runs", "2", "--steps", "2"]) == 0
    out = capsys.readouterr().out
    assert "tpsgd" in out
    assert "n/a: not for this bundle: no taps graph (layer 'act' is a GELU)" in out
    (line,) = [ln for ln in out.splitlines() if "step zo-sgd" in ln]
    assert re.search(r"zo-sgd +\d+(\.\d+)? ms \(", line), line
    assert len(re.search(r"([\d.]+) ms", line).group(1).replace(".", "").lstrip("0")) <= 3


def test_demo_batch_size_flag_reaches_every_run(tmp_path, capsys) -> None:
    from edgelearn.cli import main
    from edgelearn.journal import read_journal

    assert main(["demo", "--out", str(tmp_path), "--steps", "3", "--batch-size", "8",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert {"zo-sgd", "tpsgd", "polystep"} <= set(res["optimizers"])
    for name, run in res["optimizers"].items():
        assert run["batch_size"] == 8
        records, _ = read_journal(tmp_path / name / "journal.bin")
        assert records[0]["batch_size"] == 8, name


def test_demo_bundle_runs_tpsgd_on_litert(tmp_path) -> None:
    """The shipped bundle carries model_taps.tflite: tpSGD on LiteRT == on onnxruntime."""
    pytest.importorskip("ai_edge_litert")
    from sessions import train

    from edgelearn.bundle import load_bundle
    from edgelearn.demo import DATA, RECIPES, demo_data
    from edgelearn.params import ParamStore

    bundle = load_bundle(DATA / "demo")
    user_train, _, _ = demo_data(0)
    recipe = RECIPES["tpsgd"]
    w = {}
    for backend in ("onnxruntime", "litert"):
        res = train(bundle, user_train, tmp_path / backend, optimizer="tpsgd",
                    options=recipe["options"], steps=20, batch_size=recipe["batch_size"],
                    trainable=recipe["trainable"], backend=backend, threads=1)
        w[backend] = ParamStore.from_file(res["weights"], bundle.param_specs()).flat()
    assert not np.array_equal(w["litert"], bundle.load_store().flat())
    np.testing.assert_allclose(w["litert"], w["onnxruntime"], rtol=0, atol=1e-5)
