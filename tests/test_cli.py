"""CLI contract: --json keys, exit code 2 with one `edgelearn: error:` line on bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import Exported

from edgelearn.cli import main

SCRIPT = Path(sys.executable).parent / "edgelearn"


def run_main(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(code: int, out: str, err: str, match: str) -> None:
    assert code == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("edgelearn: error: "), err
    assert match in lines[0], (match, err)
    assert "Traceback" not in err + out


@pytest.fixture
def bundle_copy(bundles: dict[str, Exported], tmp_path: Path) -> Path:
    """A private copy of the mlp bundle that a test may damage."""
    return Path(shutil.copytree(bundles["mlp"].path, tmp_path / "mlp"))


# -- info / eval ------------------------------------------------------------------------------
def test_info_json(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported]) -> None:
    code, out, err = run_main(capsys, ["info", str(bundles["cnn"].path), "--json"])
    assert code == 0
    assert err == ""
    info = json.loads(out)
    assert {"inputs", "outputs", "params", "trainable_params", "formats"} <= set(info)
    assert info["inputs"] == [{"name": "x", "shape": ["batch", 1, 8, 8], "dtype": "float32"}]
    assert info["outputs"] == [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}]
    assert info["params"] == bundles["cnn"].summary["params"]
    assert info["trainable_params"] == bundles["cnn"].summary["trainable_params"]
    assert info["trainable_params"] < info["params"]  # BatchNorm running stats are frozen
    assert info["formats"] == ["onnx"]


def test_info_human(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported]) -> None:
    code, out, _ = run_main(capsys, ["info", str(bundles["mlp"].path)])
    assert code == 0
    assert "head.weight" in out
    assert "4810 params" in out
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)


def test_eval_json(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported],
                   digits_npz: Path) -> None:
    code, out, err = run_main(capsys, ["eval", str(bundles["mlp"].path), "--data",
                                       str(digits_npz), "--json", "--batch-size", "64"])
    assert code == 0
    assert err == ""
    assert len(out.strip().splitlines()) == 1
    res = json.loads(out)
    assert {"accuracy", "loss", "n", "peak_rss_mb"} <= set(res)
    assert res["n"] == 1797
    assert 0.0 <= res["accuracy"] <= 1.0
    assert np.isfinite(res["loss"])
    assert res["loss"] > 0
    assert res["peak_rss_mb"] > 0


def test_eval_weights_override(capsys: pytest.CaptureFixture[str], bundle_copy: Path,
                               digits_npz: Path, tmp_path: Path) -> None:
    from edgelearn.bundle import load_bundle

    store = load_bundle(bundle_copy).load_store()
    store["head.weight"][...] = 0.0
    store["head.bias"][...] = 0.0
    store["head.bias"][3] = 1.0  # always predicts class 3
    w = store.save(tmp_path / "w.safetensors")
    code, out, _ = run_main(capsys, ["eval", str(bundle_copy), "--data", str(digits_npz),
                                     "--weights", str(w), "--json"])
    assert code == 0
    res = json.loads(out)
    y = np.load(digits_npz)["y"]
    assert res["accuracy"] == float(np.mean(y == 3))
    assert res["loss"] == pytest.approx(np.log(9 + np.e) - np.mean(y == 3), abs=1e-6)


def test_console_script_subprocess(bundles: dict[str, Exported], digits_npz: Path) -> None:
    assert SCRIPT.exists()
    proc = subprocess.run([str(SCRIPT), "eval", str(bundles["mlp"].path), "--data",
                           str(digits_npz), "--json"], capture_output=True, text=True,
                          timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    res = json.loads(proc.stdout)
    assert 0.0 <= res["accuracy"] <= 1.0
    assert res["n"] == 1797


def test_console_script_bad_input(bundle_copy: Path, digits_npz: Path) -> None:
    w = bundle_copy / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:100])
    proc = subprocess.run([str(SCRIPT), "eval", str(bundle_copy), "--data", str(digits_npz)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert_usage_error(proc.returncode, proc.stdout, proc.stderr, "weights.safetensors")
    assert proc.stdout == ""


# -- bad input: exit 2, one line, no traceback ------------------------------------------------
def test_truncated_weights(capsys: pytest.CaptureFixture[str], bundle_copy: Path,
                           digits_npz: Path) -> None:
    w = bundle_copy / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-10])
    for argv in (["info", str(bundle_copy)],
                 ["eval", str(bundle_copy), "--data", str(digits_npz)]):
        assert_usage_error(*run_main(capsys, argv), "truncated")


def test_missing_file(capsys: pytest.CaptureFixture[str], bundle_copy: Path) -> None:
    (bundle_copy / "model.onnx").unlink()
    assert_usage_error(*run_main(capsys, ["info", str(bundle_copy)]),
                       "'model.onnx', which does not exist")


def test_file_outside_bundle(capsys: pytest.CaptureFixture[str], bundle_copy: Path) -> None:
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["files"]["onnx"]["path"] = "../outside.onnx"
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    assert_usage_error(*run_main(capsys, ["info", str(bundle_copy), "--json"]),
                       "not a plain file name")


def test_symlink_outside_bundle(capsys: pytest.CaptureFixture[str], bundle_copy: Path,
                                tmp_path: Path) -> None:
    shutil.move(bundle_copy / "model.onnx", tmp_path / "outside.onnx")
    os.symlink(tmp_path / "outside.onnx", bundle_copy / "model.onnx")
    assert_usage_error(*run_main(capsys, ["info", str(bundle_copy)]), "outside the bundle")


def test_json_error_object(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, out, err = run_main(capsys, ["info", str(tmp_path / "nope"), "--json"])
    assert_usage_error(code, out, err, "not a bundle directory")
    assert "not a bundle directory" in json.loads(out)["error"]


def test_wrong_input_shape(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported],
                           digits_npz: Path) -> None:
    assert_usage_error(*run_main(capsys, ["eval", str(bundles["cnn"].path), "--data",
                                          str(digits_npz)]),
                       "input 'x' has shape [1, 64], the model expects [batch, 1, 8, 8]")


def test_wrong_dtype(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported],
                     tmp_path: Path) -> None:
    path = tmp_path / "int.npz"
    np.savez(path, x=np.ones((4, 64), np.int64), y=np.zeros(4, np.int64))
    assert_usage_error(*run_main(capsys, ["eval", str(bundles["mlp"].path), "--data",
                                          str(path)]), "x has dtype int64")
    np.savez(path, x=np.ones((4, 64), np.float64), y=np.zeros(4, np.int64))  # float64 is fine
    code, _, _ = run_main(capsys, ["eval", str(bundles["mlp"].path), "--data", str(path)])
    assert code == 0


@pytest.mark.parametrize(
    ("arrays", "match"),
    [
        ({"y": np.zeros(4, np.int64)}, "no ['x'] array"),
        ({"x": np.ones((4, 64), np.float32)}, "no ['y'] array"),
        ({"a": np.ones(3)}, "no ['x', 'y'] array"),
        ({"x": np.ones((4, 64), np.float32), "y": np.zeros(3, np.int64)}, "y has (3,)"),
        ({"x": np.ones((4, 64), np.float32), "y": np.zeros(4, np.float32)},
         "y must be integer class labels"),
        ({"x": np.ones((4, 64), np.float32), "y": np.array([0, 1, 2, 10])},
         "labels go up to 10 but the model has 10 classes"),
        ({"x": np.ones((4, 64), np.float32), "y": np.array([0, -1, 2, 3])}, "negative labels"),
        ({"x": np.full((4, 64), np.nan, np.float32), "y": np.zeros(4, np.int64)}, "NaN"),
        ({"x": np.ones((0, 64), np.float32), "y": np.zeros(0, np.int64)}, "x is empty"),
    ],
)
def test_bad_data_file(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported],
                       tmp_path: Path, arrays: dict[str, np.ndarray], match: str) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert_usage_error(*run_main(capsys, ["eval", str(bundles["mlp"].path), "--data",
                                          str(path)]), match)


def test_mse_on_class_labels_is_a_usage_error(capsys: pytest.CaptureFixture[str],
                                              bundles: dict[str, Exported], digits_npz: Path,
                                              tmp_path: Path) -> None:
    """mse compares the output [10] with y itself: a classifier's labels cannot be its
    targets (a loss-only optimizer used to end in numpy's reshape traceback)."""
    for opt in ("zo-gn", "zo-sgd"):
        assert_usage_error(*run_main(capsys, [
            "train", str(bundles["mlp"].path), "--data", str(digits_npz), "--objective", "mse",
            "--optimizer", opt, "--steps", "2", "--out", str(tmp_path / opt)]),
            "mse needs targets shaped like the output [10] per example, got []")
        assert not (tmp_path / opt / "journal.bin").exists()


def test_nonexistent_and_unreadable_data(capsys: pytest.CaptureFixture[str],
                                         bundles: dict[str, Exported], tmp_path: Path) -> None:
    b = str(bundles["mlp"].path)
    assert_usage_error(*run_main(capsys, ["eval", b, "--data", str(tmp_path / "none.npz")]),
                       "none.npz: no such data file")
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    assert_usage_error(*run_main(capsys, ["eval", b, "--data", str(junk)]),
                       "junk.npz: not a readable .npz data file")
    pickled = tmp_path / "obj.npz"
    np.savez(pickled, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, np.int64))
    assert_usage_error(*run_main(capsys, ["eval", b, "--data", str(pickled)]), "obj.npz")


def test_bad_weights_override(capsys: pytest.CaptureFixture[str], bundles: dict[str, Exported],
                              digits_npz: Path, tmp_path: Path) -> None:
    b = str(bundles["mlp"].path)
    assert_usage_error(*run_main(capsys, ["eval", b, "--data", str(digits_npz), "--weights",
                                          str(tmp_path / "none.safetensors")]),
                       "none.safetensors")
    other = bundles["gru"].path / "weights.safetensors"
    assert_usage_error(*run_main(capsys, ["eval", b, "--data", str(digits_npz), "--weights",
                                          str(other)]), "missing tensors")


def test_argparse_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["eval"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith("edgelearn: error: ")
    with pytest.raises(SystemExit) as exc:
        main(["eval", "b", "--data", "d", "--batch-size", "0"])
    assert exc.value.code == 2
    assert "positive integer" in capsys.readouterr().err


# -- export -----------------------------------------------------------------------------------
@pytest.mark.torch
def test_export_round_trip(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                           digits_npz: Path) -> None:
    pytest.importorskip("torch")
    out_dir = tmp_path / "exported"
    code, out, err = run_main(capsys, ["export", "edgelearn.export.zoo:mlp",
                                       "--example-shape", "1,64", "--out", str(out_dir), "--json",
                                       "--kwargs", '{"hidden": [32]}'])
    assert code == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    assert {"bundle", "params", "trainable_params", "formats", "parity_max_abs_err"} <= set(res)
    parity = json.loads((out_dir / "manifest.json").read_text())["parity"]["onnx"]
    assert res["parity_max_abs_err"] <= parity["bound"]
    assert res["params"] == res["trainable_params"] == 64 * 32 + 32 + 32 * 10 + 10
    assert res["formats"] == ["onnx"]
    code, out, _ = run_main(capsys, ["eval", res["bundle"], "--data", str(digits_npz), "--json"])
    assert code == 0
    assert 0.0 <= json.loads(out)["accuracy"] <= 1.0
    # the same command again refuses to overwrite
    assert_usage_error(*run_main(capsys, ["export", "edgelearn.export.zoo:mlp",
                                          "--example-shape", "1,64", "--out", str(out_dir)]),
                       "already exists")


@pytest.mark.torch
def test_export_bad_spec(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    pytest.importorskip("torch")
    out = str(tmp_path / "x")
    assert_usage_error(*run_main(capsys, ["export", "edgelearn.export.zoo",
                                          "--example-shape", "1,64", "--out", out]),
                       "must look like module.py:factory")
    assert_usage_error(*run_main(capsys, ["export", "edgelearn.export.zoo:nope",
                                          "--example-shape", "1,64", "--out", out]),
                       "has no attribute 'nope'")
    assert_usage_error(*run_main(capsys, ["export", str(tmp_path / "m.py") + ":f",
                                          "--example-shape", "1,64", "--out", out]),
                       "no such file")
