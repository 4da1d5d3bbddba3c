"""`edgelearn export --quantize int8`: an int8 QDQ bundle from the CLI, its int8-vs-float
error reported relative to the outputs' magnitude, and trained as exported."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from edgelearn.bundle import load_bundle
from edgelearn.cli import main

pytestmark = pytest.mark.torch


def test_export_quantize_int8_reports_error_and_trains(digits_npz: Path, tmp_path: Path,
                                                       capsys) -> None:
    out = tmp_path / "q"
    code = main(["export", "edgelearn.export.zoo:MLP", "--example-shape", "1,64", "--out",
                 str(out), "--quantize", "int8", "--data", str(digits_npz), "--json"])
    res = json.loads(capsys.readouterr().out)
    assert code == 0
    assert res["quantized"] == ["layers.0.weight", "head.weight"]
    q = res["int8_vs_float"]
    assert q["inputs"].startswith(str(digits_npz))
    assert 0 < q["max_abs_err"] <= 0.05 * q["scale"]  # per-channel int8: ~1% of the outputs
    assert q["relative_err"] == pytest.approx(q["max_abs_err"] / q["scale"])
    assert q["argmax_agreement"] >= 0.95
    specs = {p.name: p for p in load_bundle(out).params}
    assert specs["head.weight"].dtype == "int8"
    assert specs["head.weight.scale"].quant == {"role": "scale", "of": "head.weight"}
    code = main(["train", str(out), "--data", str(digits_npz), "--optimizer", "zo-scale",
                 "--steps", "3", "--out", str(tmp_path / "run"), "--json"])
    run = json.loads(capsys.readouterr().out)
    assert code == 0
    assert run["trainable_params"] == 64 + 10  # the scales, found by role


def test_export_quantize_refuses_mismatched_data(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((4, 32), np.float32), y=np.zeros(4, np.int64))
    code = main(["export", "edgelearn.export.zoo:MLP", "--example-shape", "1,64", "--out",
                 str(tmp_path / "q"), "--quantize", "int8", "--data", str(bad)])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("edgelearn: error:")
    assert "[32]" in err
    assert not (tmp_path / "q").exists()
