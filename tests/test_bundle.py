"""Tests for edgelearn.bundle validation and the ORT backend on a bundle built by hand
(onnx.helper graph y = x @ W + b with W, b as graph inputs; no torch)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.bundle import FORMAT, FORMAT_VERSION, MANIFEST, Bundle, load_bundle, sha256_file
from edgelearn.errors import BundleError, InputError
from edgelearn.params import ParamSpec, ParamStore

D_IN, D_OUT = 5, 3


def linear_onnx(path: Path) -> None:
    """y = x @ W + b, with W [D_IN, D_OUT] and b [D_OUT] as graph inputs."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"],
                                                                           ["y"])],
        "linear",
        [helper.make_tensor_value_info("x", f, ["batch", D_IN]),
         helper.make_tensor_value_info("W", f, [D_IN, D_OUT]),
         helper.make_tensor_value_info("b", f, [D_OUT])],
        [helper.make_tensor_value_info("y", f, ["batch", D_OUT])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"W": rng.standard_normal((D_IN, D_OUT)).astype(np.float32),
            "b": rng.standard_normal(D_OUT).astype(np.float32)}


SPECS = [ParamSpec("W", (D_IN, D_OUT)), ParamSpec("b", (D_OUT,))]


def file_entry(path: Path) -> dict[str, Any]:
    return {"path": path.name, "size": path.stat().st_size, "sha256": sha256_file(path)}


def write_manifest(d: Path, m: dict[str, Any]) -> None:
    (d / MANIFEST).write_text(json.dumps(m, indent=1))


def read_manifest(d: Path) -> dict[str, Any]:
    return json.loads((d / MANIFEST).read_text())


@pytest.fixture
def tiny(tmp_path: Path) -> Path:
    """A valid bundle directory: weights.safetensors, model.onnx, manifest.json."""
    d = tmp_path / "bundle"
    d.mkdir()
    ParamStore(SPECS, values=weights()).save(d / "weights.safetensors")
    linear_onnx(d / "model.onnx")
    write_manifest(d, {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "task": "regression",
        "inputs": [{"name": "x", "shape": ["batch", D_IN], "dtype": "float32"}],
        "outputs": [{"name": "y", "shape": ["batch", D_OUT], "dtype": "float32"}],
        "params": [{"name": "W", "shape": [D_IN, D_OUT], "dtype": "float32", "trainable": True},
                   {"name": "b", "shape": [D_OUT], "dtype": "float32", "trainable": False}],
        "files": {"weights": file_entry(d / "weights.safetensors"),
                  "onnx": file_entry(d / "model.onnx")},
    })
    return d


def edit(d: Path, **changes: Any) -> None:
    m = read_manifest(d)
    m.update(changes)
    write_manifest(d, m)


# -- loading ----------------------------------------------------------------------------------
def test_valid_bundle_loads(tiny: Path) -> None:
    b = load_bundle(tiny)
    assert b.task == "regression"
    assert b.formats == ["onnx"]
    assert [p.name for p in b.params] == ["W", "b"]
    assert [p.trainable for p in b.params] == [True, False]
    assert b.inputs[0].shape == ("batch", D_IN)
    store = b.load_store()
    for n, v in weights().items():
        np.testing.assert_array_equal(store[n], v)
    assert store.trainable_names == ["W"]
    info = b.info()
    assert info["params"] == D_IN * D_OUT + D_OUT
    assert info["trainable_params"] == D_IN * D_OUT
    assert info["formats"] == ["onnx"]
    json.dumps(info)  # plain JSON data


def test_trainable_globs(tiny: Path) -> None:
    b = load_bundle(tiny)
    assert b.load_store(trainable="*").trainable_names == ["W", "b"]
    assert b.load_store(trainable=()).trainable_names == []
    assert b.load_store(trainable="").trainable_names == []
    assert b.load_store(trainable="b").trainable_names == ["b"]
    assert b.load_store(trainable="b, W").trainable_names == ["W", "b"]
    with pytest.raises(InputError, match=r"'head\.\*' matches no parameter"):
        b.load_store(trainable="head.*")
    with pytest.raises(InputError, match="'w' matches no parameter"):  # case-sensitive
        b.param_specs("b,w")


def test_override_weights_file(tiny: Path, tmp_path: Path) -> None:
    b = load_bundle(tiny)
    other = ParamStore(SPECS, values=weights(seed=1))
    other.save(tmp_path / "p.safetensors")
    assert b.load_store(weights=tmp_path / "p.safetensors").digest() == other.digest()


# -- bundle errors ----------------------------------------------------------------------------
def test_not_a_directory(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a bundle directory"):
        load_bundle(tmp_path / "nope")


def test_missing_manifest(tiny: Path) -> None:
    (tiny / MANIFEST).unlink()
    with pytest.raises(BundleError, match=r"no manifest.json"):
        load_bundle(tiny)


@pytest.mark.parametrize("text", ["{not json", "", "\ufeff{}x", '{"a": 1'])
def test_bad_json(tiny: Path, text: str) -> None:
    (tiny / MANIFEST).write_text(text)
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny)


def test_manifest_not_utf8(tiny: Path) -> None:
    (tiny / MANIFEST).write_bytes(b'{"format": "\xff"}')
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(tiny)


def test_manifest_not_object(tiny: Path) -> None:
    (tiny / MANIFEST).write_text("[1, 2]")
    with pytest.raises(BundleError, match="not a JSON object"):
        load_bundle(tiny)


@pytest.mark.parametrize("version", [0, 2, "1", None, 1.5])
def test_wrong_format_version(tiny: Path, version: Any) -> None:
    edit(tiny, format_version=version)
    with pytest.raises(BundleError, match=r"format_version .* is not supported"):
        load_bundle(tiny)


def test_wrong_format(tiny: Path) -> None:
    edit(tiny, format="something.else")
    with pytest.raises(BundleError, match=r"format is 'something.else'"):
        load_bundle(tiny)


def test_missing_file(tiny: Path) -> None:
    m = read_manifest(tiny)
    m["files"]["onnx"]["path"] = "missing.onnx"
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=r"files.onnx names 'missing.onnx', which does not exist"):
        load_bundle(tiny)
    (tiny / "weights.safetensors").unlink()
    with pytest.raises(BundleError, match=r"files.weights names 'weights.safetensors'"):
        load_bundle(tiny)


@pytest.mark.parametrize("rel", ["../outside.onnx", "sub/../model.onnx", "..", ".", "",
                                 "a\\b.onnx", 7, None])
def test_path_not_plain(tiny: Path, rel: Any) -> None:
    (tiny.parent / "outside.onnx").write_bytes((tiny / "model.onnx").read_bytes())
    m = read_manifest(tiny)
    m["files"]["onnx"]["path"] = rel
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=r"files.onnx.path .* is not a plain file name"):
        load_bundle(tiny)


def test_absolute_path(tiny: Path) -> None:
    m = read_manifest(tiny)
    m["files"]["onnx"]["path"] = str((tiny / "model.onnx").resolve())
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match="not a plain file name"):
        load_bundle(tiny)


def test_symlink_outside(tiny: Path) -> None:
    outside = tiny.parent / "elsewhere.onnx"
    shutil.move(tiny / "model.onnx", outside)
    os.symlink(outside, tiny / "model.onnx")
    with pytest.raises(BundleError, match=r"files.onnx 'model.onnx' resolves outside the bundle"):
        load_bundle(tiny)


def test_symlink_inside_is_fine(tiny: Path) -> None:
    os.rename(tiny / "model.onnx", tiny / "real.onnx")
    os.symlink("real.onnx", tiny / "model.onnx")
    assert load_bundle(tiny).files["onnx"].name == "model.onnx"


def test_bundle_dir_via_symlink(tiny: Path, tmp_path: Path) -> None:
    link = tmp_path / "link"
    os.symlink(tiny, link)
    assert load_bundle(link).formats == ["onnx"]


def test_sha256_mismatch(tiny: Path) -> None:
    raw = bytearray((tiny / "weights.safetensors").read_bytes())
    raw[-1] ^= 0x01  # one bit of tensor data, size unchanged
    (tiny / "weights.safetensors").write_bytes(bytes(raw))
    with pytest.raises(BundleError, match=r"weights.safetensors: sha256 does not match"):
        load_bundle(tiny)
    load_bundle(tiny, verify=False)  # header still valid: verify=False skips only the hash


def test_missing_sha256(tiny: Path) -> None:
    m = read_manifest(tiny)
    del m["files"]["onnx"]["sha256"]
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=r"files.onnx has no sha256"):
        load_bundle(tiny)


def test_truncated_weights(tiny: Path) -> None:
    path = tiny / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    with pytest.raises(BundleError, match=r"weights.safetensors: \d+ bytes, the manifest says"):
        load_bundle(tiny)
    with pytest.raises(BundleError, match="outside"):  # header check catches it too
        load_bundle(tiny, verify=False)


def test_truncated_weights_without_size_entry(tiny: Path) -> None:
    path = tiny / "weights.safetensors"
    path.write_bytes(path.read_bytes()[:-4])
    m = read_manifest(tiny)
    del m["files"]["weights"]["size"]
    m["files"]["weights"]["sha256"] = sha256_file(path)  # even a consistent hash
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=r"offsets .* outside"):
        load_bundle(tiny)


@pytest.mark.parametrize(
    ("param", "match"),
    [
        ({"name": "b", "shape": [D_OUT + 1], "dtype": "float32"}, "'b' is float32\\[3\\]"),
        ({"name": "b", "shape": [D_OUT], "dtype": "int8"}, "manifest says int8"),
        ({"name": "c", "shape": [D_OUT], "dtype": "float32"}, "missing tensors \\['c'\\]"),
    ],
)
def test_params_disagree_with_header(tiny: Path, param: dict[str, Any], match: str) -> None:
    m = read_manifest(tiny)
    m["params"][1] = param
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=match):
        load_bundle(tiny)


def test_header_has_extra_tensor(tiny: Path) -> None:
    m = read_manifest(tiny)
    del m["params"][1]
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match=r"unexpected tensors \['b'\]"):
        load_bundle(tiny)


def test_duplicate_param_names(tiny: Path) -> None:
    m = read_manifest(tiny)
    m["params"].append(dict(m["params"][1]))
    write_manifest(tiny, m)
    with pytest.raises(BundleError, match="duplicate parameter names"):
        load_bundle(tiny)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [
        ("params", [], "'params' must be a non-empty list"),
        ("inputs", {"x": 1}, "'inputs' must be a non-empty list"),
        ("task", "ranking", "task 'ranking'"),
        ("files", {"onnx": {}}, "'files' must name 'weights'"),
        ("params", [{"name": "../W", "shape": [5, 3], "dtype": "float32"}],
         r"invalid parameter name '\.\./W'"),
        ("params", [{"name": "W", "shape": [-5, 3], "dtype": "float32"}], "invalid shape"),
        ("params", [{"name": "W", "shape": [1 << 20, 1 << 20], "dtype": "float32"}],
         "declares .* elements"),
        ("params", [{"name": "W", "shape": [5, 3], "dtype": "float64"}], "unsupported dtype"),
        ("params", [{"name": "W", "shape": [5, 3], "dtype": "float32", "trainable": "yes"}],
         "trainable must be true/false"),
        ("inputs", [{"name": "x", "shape": ["batch", 5], "dtype": "complex64"}],
         "input 'x' has unsupported dtype"),
        ("outputs", [{"name": "y", "shape": [1.5], "dtype": "float32"}], "invalid shape"),
    ],
)
def test_schema_errors(tiny: Path, key: str, value: Any, match: str) -> None:
    edit(tiny, **{key: value})
    with pytest.raises(BundleError, match=match):
        load_bundle(tiny)


def test_corrupt_onnx_is_bundle_error(tiny: Path) -> None:
    (tiny / "model.onnx").write_bytes(b"\x08\x07 this is not a protobuf model")
    m = read_manifest(tiny)
    m["files"]["onnx"] = file_entry(tiny / "model.onnx")
    write_manifest(tiny, m)
    from edgelearn.model import Model

    b = load_bundle(tiny)
    with pytest.raises(BundleError, match=r"model.onnx"):
        Model(b, trainable="*")
    with pytest.raises(BundleError, match=r"model.onnx"):
        Model(b, trainable=())


# -- ORT backend on the hand-built bundle -----------------------------------------------------
@pytest.fixture
def ort_model(tiny: Path) -> Any:
    pytest.importorskip("onnxruntime")
    from edgelearn.model import Model

    return Model(Bundle(tiny), threads=1)


@pytest.mark.parametrize("trainable", [None, "*", (), "b"])
@pytest.mark.parametrize("batch", [1, 4])
def test_ort_forward_matches_numpy(tiny: Path, trainable: Any, batch: int) -> None:
    pytest.importorskip("onnxruntime")
    from edgelearn.model import Model

    model = Model(Bundle(tiny), trainable=trainable, threads=1)
    x = np.random.default_rng(batch).standard_normal((batch, D_IN)).astype(np.float32)
    w = weights()
    out = model.backend.forward({"x": x})
    assert list(out) == ["y"]
    assert out["y"].shape == (batch, D_OUT)
    assert out["y"].dtype == np.float32
    np.testing.assert_allclose(out["y"], x @ w["W"] + w["b"], atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(model.predict(x), x @ w["W"] + w["b"], atol=1e-6, rtol=1e-5)


def test_ort_in_place_updates_are_seen(ort_model: Any) -> None:
    x = np.random.default_rng(0).standard_normal((3, D_IN)).astype(np.float32)
    session = ort_model.backend.session
    assert ort_model.backend.bound == ["W"]  # b is frozen in the manifest: baked
    ort_model.store["W"][...] = np.eye(D_IN, D_OUT, dtype=np.float32)
    np.testing.assert_allclose(ort_model.predict(x), x[:, :D_OUT] + weights()["b"],
                               atol=1e-6, rtol=1e-5)
    ort_model.store.flat()[:] = 0.0
    np.testing.assert_allclose(ort_model.predict(x), np.broadcast_to(weights()["b"], (3, D_OUT)),
                               atol=1e-6, rtol=1e-5)
    assert ort_model.backend.session is session


def test_ort_fortran_order_input(ort_model: Any) -> None:
    x = np.asfortranarray(np.random.default_rng(1).standard_normal((6, D_IN)).astype(np.float32))
    w = weights()
    np.testing.assert_allclose(ort_model.predict(x), x @ w["W"] + w["b"], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize(
    ("inputs", "match"),
    [
        ({"x": np.zeros((2, D_IN + 1), np.float32)}, r"shape \[2, 6\].*\[batch, 5\]"),
        ({"x": np.zeros((D_IN,), np.float32)}, r"shape \[5\]"),
        ({"x": np.zeros((2, 1, D_IN), np.float32)}, r"shape \[2, 1, 5\]"),
        ({"x": np.zeros((2, D_IN), np.float64)}, "dtype float64, the model expects float32"),
        ({"x": np.zeros((2, D_IN), np.int64)}, "dtype int64"),
        ({"x": [[0.0] * D_IN]}, "must be a numpy array"),
        ({"input": np.zeros((2, D_IN), np.float32)}, r"model inputs are \['x'\], got \['input'\]"),
        ({}, r"model inputs are \['x'\], got \[\]"),
        ({"x": np.zeros((2, D_IN), np.float32), "W": np.zeros((D_IN, D_OUT), np.float32)},
         "model inputs are"),
    ],
)
def test_ort_bad_inputs(ort_model: Any, inputs: dict[str, Any], match: str) -> None:
    with pytest.raises(InputError, match=match):
        ort_model.backend.forward(inputs)


def test_unknown_backend(tiny: Path) -> None:
    from edgelearn.model import Model

    with pytest.raises(InputError, match="unknown backend 'tensorrt'"):
        Model(Bundle(tiny), backend="tensorrt")


def test_unbound_backend_refuses(tiny: Path) -> None:
    pytest.importorskip("onnxruntime")
    from edgelearn.backends.ort import OrtBackend
    from edgelearn.errors import EdgelearnError

    with pytest.raises(EdgelearnError, match="not bound"):
        OrtBackend(Bundle(tiny)).forward({"x": np.zeros((1, D_IN), np.float32)})
