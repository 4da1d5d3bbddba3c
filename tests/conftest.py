"""Shared fixtures: the digits data set, and each zoo model exported once per session.

Fixtures that need torch call `pytest.importorskip("torch")` so a device-only environment
(numpy + onnxruntime, no torch) still runs every test that does not depend on them.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edgelearn.data import Dataset

ZOO_NAMES = ("mlp", "cnn", "gru", "transformer", "two_norms", "conv1d")


@pytest.fixture(scope="session")
def digits() -> Dataset:
    """sklearn digits: x float32 [1797, 64] scaled to [0, 1], y int64 labels 0..9."""
    datasets = pytest.importorskip("sklearn.datasets")
    d = datasets.load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    return Dataset(np.ascontiguousarray(x), np.ascontiguousarray(y))


@pytest.fixture(scope="session")
def digits_npz(digits: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits data set as a `.npz` data file (x, y)."""
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, x=digits.x, y=digits.y)
    return path


@dataclass
class Exported:
    """One exported zoo model: its bundle directory, the torch module it came from, the
    example input shape (batch first) and the exporter's summary."""

    path: Path
    module: Any
    example_shape: tuple[int, ...]
    summary: dict[str, Any]


@pytest.fixture(scope="session")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Exported]:
    """name -> Exported for every model in edgelearn.export.zoo.ZOO, exported once per session."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import ZOO

    root = tmp_path_factory.mktemp("bundles")
    out: dict[str, Exported] = {}
    for name in ZOO_NAMES:
        factory, shape = ZOO[name]
        torch.manual_seed(0)
        module = factory()
        example = torch.randn(1, *shape)
        summary = export_bundle(module, example, root / name)
        out[name] = Exported(root / name, module.eval(), (1, *shape), summary)
    return out


def torch_forward(module: Any, x: np.ndarray) -> np.ndarray:
    """Run a torch module on a numpy batch (no grad) and return numpy."""
    import torch

    with torch.no_grad():
        return module(torch.from_numpy(np.ascontiguousarray(x))).numpy()


def load_store_into_torch(module: Any, store: Any) -> None:
    """Copy every store view (parameters and float buffers) into the torch module."""
    import torch

    state = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
    missing, unexpected = module.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    # Only non-float buffers (e.g. BatchNorm num_batches_tracked) may be absent from the store.
    sd = module.state_dict()
    assert all(not sd[k].is_floating_point() for k in missing), missing


def load_stress_module() -> Any:
    """benchmarks/stress_kill.py as a module (its tiny torch-free bundle builder and runner)."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("stress_kill",
                                                  root / "benchmarks" / "stress_kill.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pretrain_on_digits(module: Any, digits: Dataset, *, steps: int = 150, n: int = 1000,
                       lr: float = 1e-2) -> Any:
    """Full-batch Adam on the first `n` digits (torch; host side), in place; returns module."""
    import torch

    opt = torch.optim.Adam(module.parameters(), lr=lr)
    x, y = torch.from_numpy(digits.x[:n]), torch.from_numpy(digits.y[:n])
    for _ in range(steps):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(module(x), y).backward()
        opt.step()
    return module


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle dir, data .npz) of the stress script's tiny MLP (benchmarks/stress_kill.py)."""
    pytest.importorskip("onnx")
    stress = load_stress_module()
    root = tmp_path_factory.mktemp("tiny")
    return stress.make_bundle(root / "bundle"), stress.make_data(root / "data.npz")


@pytest.fixture
def terminal_sigint() -> Iterator[None]:
    """Processes the test starts get Ctrl-C's default action, as from a terminal, even when
    the test run itself was started with SIGINT ignored (a background job of a
    non-interactive shell): an ignored signal is inherited across exec, a Python handler is
    not."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, old)
