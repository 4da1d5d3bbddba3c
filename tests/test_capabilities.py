"""`edgelearn info`: which optimizers and backends a bundle supports, and why not."""

from __future__ import annotations

import json
import re

import pytest
from bundle_edit import TFLITE_ROLES, demo_bundle_without

from edgelearn.bundle import load_bundle
from edgelearn.capabilities import bundle_support
from edgelearn.cli import main
from edgelearn.demo import DATA


def test_demo_bundle_supports_every_float_optimizer_on_both_backends(capsys) -> None:
    assert main(["info", str(DATA / "demo"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    opt, be = info["support"]["optimizers"], info["support"]["backends"]
    assert opt["zo-sgd"]["supported"] is True
    assert opt["tpsgd"]["supported"] is True
    # every registered optimizer is described (none "not described")
    assert all(o["supported"] is not None for o in opt.values())
    assert "model_pop.onnx" in opt["zo-gn"]["how"]
    assert opt["hybrid"]["supported"] is True
    assert opt["tpsgd"]["backends"] == ["onnxruntime", "litert"]
    assert opt["polystep"]["fast_path"] is True
    assert opt["polystep"]["population_params"] == ["head.weight", "head.bias"]
    assert opt["zo-scale"]["supported"] is False
    assert "no int8 weights" in opt["zo-scale"]["why"]
    assert be["onnxruntime"]["supported"] is True
    assert be["litert"]["supported"] is True
    assert info["files_mb"]["weights.safetensors"] > 0


def test_info_says_why_not_from_the_manifest(tmp_path, capsys) -> None:
    bundle = demo_bundle_without(
        tmp_path / "b", ("onnx_taps", "onnx_population", *TFLITE_ROLES),
        taps_unsupported="layer 'act' is a GELU", tflite_skipped="cannot lower aten.foo")
    sup = bundle_support(load_bundle(bundle))
    assert sup["optimizers"]["tpsgd"] == {
        "supported": False, "why": "no taps graph (layer 'act' is a GELU)"}
    assert sup["optimizers"]["polystep"]["fast_path"] is False
    assert "no model_pop.onnx" in sup["optimizers"]["polystep"]["why_no_fast_path"]
    assert sup["backends"]["litert"] == {
        "supported": False, "why": "no model.tflite (cannot lower aten.foo)"}

    assert main(["info", str(bundle)]) == 0
    text = capsys.readouterr().out
    assert "tpsgd      no: no taps graph (layer 'act' is a GELU)" in text
    assert "litert      no: no model.tflite (cannot lower aten.foo)" in text
    assert "no model_pop.onnx" in text
    # rounded figures: sizes to 1 decimal, parity errors to 3 significant digits
    assert all(re.fullmatch(r"\d+(\.\d)?", s) for s in re.findall(r"([\d.]+) [kM]B\b", text))
    assert re.search(r"onnx \d\.\d\de-\d\d", text)


def test_tflite_bundle_without_taps_graph_says_tpsgd_is_onnxruntime_only(tmp_path) -> None:
    bundle = demo_bundle_without(tmp_path / "b", ("tflite_taps",),
                                 tflite_taps_skipped="GRU taps do not convert")
    tp = bundle_support(load_bundle(bundle))["optimizers"]["tpsgd"]
    assert tp["backends"] == ["onnxruntime"]
    assert tp["litert_why"] == "no model_taps.tflite (GRU taps do not convert)"


@pytest.mark.torch
def test_int8_bundle_supports_zo_scale(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    from edgelearn.export.quantize import export_int8_bundle
    from edgelearn.export.zoo import MLP

    torch.manual_seed(0)
    export_int8_bundle(MLP(64, (16,), 10), torch.randn(1, 64) * 0.1, tmp_path / "b8",
                       atol=1e-4)
    assert main(["info", str(tmp_path / "b8")]) == 0
    text = capsys.readouterr().out
    assert re.search(r"zo-scale   yes: trains the \d+ quantization scale tensors", text), text
