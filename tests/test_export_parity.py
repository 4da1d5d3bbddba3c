"""Exporter parity: onnxruntime (weights live or baked) vs torch on the zoo models, in-place
updates through the bound arena, zero-copy binding, manifest contents and export refusals."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import Exported, load_store_into_torch, torch_forward

from edgelearn.bundle import load_bundle
from edgelearn.errors import InputError
from edgelearn.model import Model
from edgelearn.parity import ATOL, RTOL, tolerance

pytestmark = pytest.mark.torch

ARCHS = ("mlp", "cnn", "gru", "transformer")
BATCHES = (1, 5, 16)


def random_input(e: Exported, batch: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((batch, *e.example_shape[1:])).astype(np.float32)


def check_recorded(p: dict[str, Any]) -> None:
    """A manifest parity section: the default tolerances, a bound that scales with the
    worst output's magnitude, and an error within it (max_abs_err is over every batch, each
    compared with the bound of its own scale)."""
    assert (p["atol"], p["rtol"]) == (ATOL, RTOL)
    assert p["bound"] == pytest.approx(ATOL + RTOL * p["scale"])
    assert p["worst_output"] == "logits"
    assert p["worst_err"] <= p["bound"]
    assert p["max_abs_err"] >= p["worst_err"]


def max_err(a: np.ndarray, b: np.ndarray) -> float:
    assert a.shape == b.shape
    return float(np.max(np.abs(a - b)))


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("trainable", ["*", ()], ids=["live", "baked"])
def test_ort_matches_torch(bundles: dict[str, Exported], arch: str, trainable: Any) -> None:
    e = bundles[arch]
    model = Model(load_bundle(e.path), trainable=trainable, threads=1)
    n_params = len(model.store.names)
    assert len(model.backend.bound) == (n_params if trainable == "*" else 0)
    for i, b in enumerate(BATCHES):
        x = random_input(e, b, seed=i)
        out = model.predict(x)
        ref = torch_forward(e.module, x)
        assert out.dtype == np.float32
        np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref))


@pytest.mark.parametrize("arch", ARCHS)
def test_in_place_update_parity(bundles: dict[str, Exported], arch: str) -> None:
    import torch

    e = bundles[arch]
    model = Model(load_bundle(e.path), trainable="*", threads=1)
    backend, session = model.backend, model.backend.session
    x = random_input(e, 5, seed=7)
    before = model.predict(x)
    ref = torch_forward(e.module, x)
    np.testing.assert_allclose(before, ref, rtol=0, atol=tolerance(ref))

    # zero-copy: every bound OrtValue is backed by the very arena view
    assert len(backend._keepalive) == len(model.store.trainable_names)
    for view, ov in backend._keepalive:
        assert ov.data_ptr() == view.ctypes.data
        assert np.shares_memory(view, model.store.arenas["float32"])

    rng = np.random.default_rng(1)
    for name in model.store.trainable_names:
        model.store[name] += (0.01 * rng.standard_normal(model.store[name].shape)).astype(
            np.float32
        )
    after = model.predict(x)
    assert model.backend is backend
    assert model.backend.session is session
    assert max_err(after, before) > 1e-4  # the update was seen at all

    ref_module = copy.deepcopy(e.module)
    load_store_into_torch(ref_module, model.store)
    with torch.no_grad():
        for name, p in ref_module.named_parameters():
            np.testing.assert_array_equal(p.numpy(), model.store[name])
    ref = torch_forward(ref_module, x)
    np.testing.assert_allclose(after, ref, rtol=0, atol=tolerance(ref))
    # the flat view is the same memory: restoring through it restores the outputs
    model.store.flat()[:] = load_bundle(e.path).load_store(trainable="*").flat()
    np.testing.assert_allclose(model.predict(x), before, rtol=0, atol=0)


def test_cnn_head_only_live(bundles: dict[str, Exported]) -> None:
    e = bundles["cnn"]
    model = Model(load_bundle(e.path), trainable="head.*", threads=1)
    assert sorted(model.backend.bound) == ["head.bias", "head.weight"]
    for i, b in enumerate(BATCHES):
        x = random_input(e, b, seed=20 + i)
        ref = torch_forward(e.module, x)
        np.testing.assert_allclose(model.predict(x), ref, rtol=0, atol=tolerance(ref))
    model.store["head.weight"] *= np.float32(0.5)
    model.store["head.bias"] += np.float32(0.25)
    ref = copy.deepcopy(e.module)
    load_store_into_torch(ref, model.store)
    x = random_input(e, 16, seed=30)
    want = torch_forward(ref, x)
    np.testing.assert_allclose(model.predict(x), want, rtol=0, atol=tolerance(want))


@pytest.mark.parametrize("arch", [*ARCHS, "two_norms"])
def test_manifest_names_every_tensor(bundles: dict[str, Exported], arch: str) -> None:
    e = bundles[arch]
    b = load_bundle(e.path)
    specs = {p.name: p for p in b.params}
    expected = {n: tuple(p.shape) for n, p in e.module.named_parameters()}
    expected.update({n: tuple(t.shape) for n, t in e.module.named_buffers()
                     if t.is_floating_point()})
    assert set(specs) == set(expected)
    for n, shape in expected.items():
        assert specs[n].shape == shape, n
        assert specs[n].dtype == "float32"
    params = {n for n, _ in e.module.named_parameters()}
    assert {n for n, s in specs.items() if s.trainable} == params  # buffers never trainable
    store = b.load_store()
    for n, t in e.module.state_dict().items():
        if t.is_floating_point():
            np.testing.assert_array_equal(store[n], t.numpy())
    assert b.info()["params"] == e.summary["params"]
    check_recorded(b.manifest["parity"]["onnx"])
    assert b.manifest["parity"]["onnx"]["max_abs_err"] == e.summary["parity_max_abs_err"]


def test_two_norms_not_merged(bundles: dict[str, Exported]) -> None:
    import onnx

    e = bundles["two_norms"]
    m = onnx.load(str(e.path / "model.onnx"))
    inputs = [i.name for i in m.graph.input]
    for n in ("norm1.weight", "norm1.bias", "norm2.weight", "norm2.bias"):
        assert inputs.count(n) == 1, n
    assert not m.graph.initializer or not {i.name for i in m.graph.initializer} & set(inputs)
    # the two LayerNorms start equal but are trained independently
    model = Model(load_bundle(e.path), trainable="*", threads=1)
    np.testing.assert_array_equal(model.store["norm1.weight"], model.store["norm2.weight"])
    x = random_input(e, 4, seed=3)
    base = model.predict(x)
    model.store["norm2.weight"][0] += np.float32(1.0)
    moved = model.predict(x)
    assert max_err(moved, base) > 1e-4
    np.testing.assert_array_equal(model.store["norm1.weight"], np.ones(16, np.float32))


def test_exported_graph_inputs(bundles: dict[str, Exported]) -> None:
    import onnx

    for name, e in bundles.items():
        m = onnx.load(str(e.path / "model.onnx"))
        names = [i.name for i in m.graph.input]
        assert names[0] == "x", name
        assert set(names[1:]) == {p.name for p in load_bundle(e.path).params}, name
        dim0 = m.graph.input[0].type.tensor_type.shape.dim[0]
        assert dim0.dim_param == "batch", name
        assert not any(i.data_location == onnx.TensorProto.EXTERNAL
                       for i in m.graph.initializer), name
    assert not list(e.path.parent.glob("*/*.onnx.data"))


# -- refusals ---------------------------------------------------------------------------------
def _exporting_differs() -> Any:
    import torch
    from torch import nn

    class ExportDiffers(nn.Module):
        """Adds 1 only while being exported: the graph disagrees with eager torch."""

        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.fc(x)
            if torch.compiler.is_exporting():
                y = y + 1.0
            return y

    torch.manual_seed(0)
    return ExportDiffers()


def test_export_refuses_parity_mismatch(tmp_path: Path) -> None:
    import torch
    from edgelearn.export import ExportError, export_bundle

    out = tmp_path / "bad"
    with pytest.raises(ExportError, match=r"parity check failed: torch vs onnxruntime max abs "
                       r"error 1; worst logits\[\d, [01]\]: got .*, want .*, \|diff\| 1 > "
                       r"bound [0-9.e-]+ = atol 1e-05 \+ rtol 1e-05 \* max\|logits\| [0-9.]+ "
                       r"\[onnxruntime, weights (live|baked), batch \d\]; no bundle written"):
        export_bundle(_exporting_differs(), torch.randn(1, 4), out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temp dir left behind either


def test_export_refuses_tiny_atol(tmp_path: Path) -> None:
    """A bound below the float32 rounding noise of a transformer refuses the export."""
    import torch
    from edgelearn.export import ExportError, export_bundle
    from edgelearn.export.zoo import transformer

    torch.manual_seed(0)
    out = tmp_path / "t"
    with pytest.raises(ExportError, match="parity check failed"):
        export_bundle(transformer(), torch.randn(1, 10, 8), out, atol=1e-12, rtol=0)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_export_into_existing_dir(tmp_path: Path) -> None:
    import torch
    from edgelearn.export import ExportError, export_bundle
    from edgelearn.export.zoo import mlp

    out = tmp_path / "exists"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    torch.manual_seed(0)
    with pytest.raises(ExportError, match="already exists"):
        export_bundle(mlp(hidden=(8,)), torch.randn(1, 64), out)
    assert (out / "keep.txt").read_text() == "x"
    res = export_bundle(mlp(hidden=(8,)), torch.randn(1, 64), out, overwrite=True)
    assert not (out / "keep.txt").exists()
    check_recorded(load_bundle(out).manifest["parity"]["onnx"])
    assert res["parity_max_abs_err"] == load_bundle(out).manifest["parity"]["onnx"]["max_abs_err"]
    assert load_bundle(out).info()["params"] == 64 * 8 + 8 + 8 * 10 + 10


def test_export_trainable_glob(tmp_path: Path) -> None:
    import torch
    from edgelearn.export import ExportError, export_bundle
    from edgelearn.export.zoo import mlp

    torch.manual_seed(0)
    res = export_bundle(mlp(hidden=(8,)), torch.randn(1, 64), tmp_path / "h", trainable="head.*")
    b = load_bundle(tmp_path / "h")
    assert [p.name for p in b.params if p.trainable] == ["head.weight", "head.bias"]
    assert res["trainable_params"] == 8 * 10 + 10
    with pytest.raises(InputError, match="matches no parameter"):
        export_bundle(mlp(hidden=(8,)), torch.randn(1, 64), tmp_path / "n", trainable="nope.*")
    assert not (tmp_path / "n").exists()
    with pytest.raises(ExportError, match="tflite"):
        export_bundle(mlp(hidden=(8,)), torch.randn(1, 64), tmp_path / "f", formats=("tflite",))


# -- scale-aware parity: large logits ------------------------------------------------------------
def _large_logits(wrong_by: float = 0.0) -> Any:
    """MLP 64-256-10 whose head weights are scaled so logits reach ~2e3 (float32 ulp ~1e-4).
    `wrong_by` > 0 makes the exported graph scale its logits by (1 + wrong_by): an export
    that is genuinely wrong, by a relative amount far above float32 rounding."""
    import torch
    from torch import nn

    class LargeLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Linear(64, 256), nn.ReLU())
            self.head = nn.Linear(256, 10)
            with torch.no_grad():
                self.head.weight.mul_(4000.0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.head(self.body(x))
            if wrong_by and torch.compiler.is_exporting():
                y = y * (1.0 + wrong_by)
            return y

    torch.manual_seed(0)
    return LargeLogits()


def test_large_logits_export_within_scaled_bound(tmp_path: Path) -> None:
    """Logits ~2e3: onnxruntime and torch differ by a few float32 ulps (> 1e-5 absolute), which
    the scale-aware bound accepts; the same export under a fixed 1e-5 bound is refused."""
    import torch
    from edgelearn.export import ExportError, export_bundle

    model = _large_logits()
    res = export_bundle(model, torch.randn(1, 64), tmp_path / "big")
    p = load_bundle(tmp_path / "big").manifest["parity"]["onnx"]
    assert p["scale"] > 1e3
    assert res["parity_max_abs_err"] > 1e-5  # a fixed 1e-5 would have failed (below too)
    check_recorded(p)
    with pytest.raises(ExportError, match=r"> bound 1e-05 = atol 1e-05 \+ rtol 0 \*"):
        export_bundle(model, torch.randn(1, 64), tmp_path / "fixed", atol=1e-5, rtol=0)
    assert not (tmp_path / "fixed").exists()
    x = np.random.default_rng(0).standard_normal((16, 64)).astype(np.float32)
    ref = torch_forward(model.eval(), x)
    out = Model(load_bundle(tmp_path / "big"), threads=1).predict(x)
    np.testing.assert_allclose(out, ref, rtol=0, atol=tolerance(ref))


def test_wrong_large_logits_export_is_refused_naming_worst_element(tmp_path: Path) -> None:
    """Off by 0.1% relative (~2 on logits of ~2e3): refused, and the message names the worst
    element, its two values, the output's scale and the bound."""
    import torch
    from edgelearn.export import ExportError, export_bundle

    out = tmp_path / "wrong"
    with pytest.raises(ExportError) as info:
        export_bundle(_large_logits(wrong_by=1e-3), torch.randn(1, 64), out)
    msg = str(info.value)
    assert re.search(r"worst logits\[\d, \d\]: got -?\d+\.\d+, want -?\d+\.\d+, \|diff\| "
                     r"[0-9.]+ > bound 0\.0\d+ = atol 1e-05 \+ rtol 1e-05 \* max\|logits\| "
                     r"\d{4}", msg), msg
    assert not out.exists()


def test_cli_export_atol_rtol(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from edgelearn.cli import main

    base = ["export", "edgelearn.export.zoo:transformer", "--example-shape", "1,10,8"]
    code = main([*base, "--out", str(tmp_path / "tight"), "--atol", "1e-12", "--rtol", "0"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("edgelearn: error: parity check failed")
    assert "rtol 0 *" in err
    assert not (tmp_path / "tight").exists()
    assert main([*base, "--out", str(tmp_path / "ok"), "--rtol", "1e-4", "--json"]) == 0
    p = load_bundle(tmp_path / "ok").manifest["parity"]["onnx"]
    assert (p["atol"], p["rtol"]) == (ATOL, 1e-4)
    assert main([*base, "--out", str(tmp_path / "neg"), "--atol", "-1"]) == 2
    assert "tolerances must be finite and >= 0" in capsys.readouterr().err
