"""Shared pieces of the batched ZO optimizer tests (fzoo, adamezo): the shipped demo bundle,
a torch twin of its MLP, the device's noise split into named tensors, and a scale-aware
closeness check."""

from __future__ import annotations

from typing import Any

import numpy as np

from edgelearn.bundle import load_bundle
from edgelearn.demo import DATA, demo_data
from edgelearn.params import ParamStore
from edgelearn.parity import tolerance
from edgelearn.rng import Noise


def demo():
    """(bundle, user train set, user test set) of `edgelearn demo` (no export, no torch)."""
    train, test, _ = demo_data(0)
    return load_bundle(DATA / "demo"), train, test


def torch_demo_module() -> Any:
    """The demo MLP (64 -> 64 relu -> 10) in torch, parameter names as in the bundle."""
    from torch import nn

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.Sequential(nn.Linear(64, 64), nn.ReLU())
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            return self.head(self.layers(x))

    return Mlp().eval()


def named_noise(store: ParamStore, key: tuple[int, int, int], kind: str = "rademacher"
                ) -> dict[str, Any]:
    """The device's z(key) over the trainable slice, as named torch tensors."""
    import torch

    z = Noise(kind).fill(np.empty(store.n_trainable("float32"), np.float32), run_seed=key[0],
                         step=key[1], probe=key[2], start=0)
    return {name: torch.from_numpy(z[a:b].reshape(store[name].shape).copy())
            for name, a, b in store.segments("float32")}


def assert_close(got: Any, ref: Any, *, atol: float = 1e-6, rtol: float = 1e-6) -> None:
    """|got - ref| <= atol + rtol * max|ref| (tolerance scaled by the magnitude compared)."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    bound = tolerance(ref, atol=atol, rtol=rtol)
    err = float(np.max(np.abs(got - ref)))
    assert err <= bound, f"max |diff| {err:.3g} > {bound:.3g}"


def assert_step_applied(store: ParamStore, params: dict[str, Any], new: dict[str, Any],
                        zs: list[dict[str, Any]], coefs: list[float], lr: float) -> None:
    """After one batched-ZO step: the weights are the torch reference's `new` (rtol 1e-4: the
    coefficients carry forward noise), exactly params - lr sum_k coefs_k z_k from the device's
    own coefficients (1e-6), and every tensor not in `new` is untouched."""
    for name, ref in new.items():
        assert_close(store[name], ref.numpy(), rtol=1e-4)
    for name in zs[0]:
        rule = params[name] - lr * sum(c * z[name] for c, z in zip(coefs, zs, strict=True))
        assert_close(store[name], rule.numpy())
    for name in store.names:  # frozen tensors untouched
        if name not in new:
            np.testing.assert_array_equal(store[name], params[name].numpy())


def outputs_of(model: Any, x: np.ndarray, y: np.ndarray, calls: list[int],
               seen: list[np.ndarray] | None = None):
    """outputs= for a bare `opt.step` (zo-gn, zo-readout): each candidate placed and run
    (one call per request; its size appended to `calls`), cross-entropy; the outputs of each
    request are appended to `seen` when given."""
    from edgelearn.losses import cross_entropy

    def outputs(pop: Any):
        calls.append(pop.size)
        rows = []
        for j in range(pop.size):
            pop.place(j)
            rows.append(np.array(model.predict(x)))
        if seen is not None:
            seen.append(np.stack(rows))
        return np.stack(rows), y, cross_entropy
    return outputs


def assert_cached_prefix_run_is_the_plain_one(tmp_path: Any, optimizer: str,
                                              options: dict[str, Any]) -> None:
    """Head-only, 8 steps on the demo: the outputs from the cached frozen prefix's suffix or
    from the whole model give the same steps (losses to float rounding), and each journal
    replays to its run's weights exactly."""
    from sessions import replay_journal, train

    from edgelearn.journal import read_journal

    bundle, data, _ = demo()
    kw = {"steps": 8, "seed": 4, "optimizer": optimizer, "trainable": "head.*",
          "batch_size": 32, "options": options, "population": False}
    cached = train(bundle, data, tmp_path / "cached", **kw)
    plain = train(bundle, data, tmp_path / "plain", prefix_cache=False, **kw)
    assert cached["cache"]["enabled"]
    assert plain["cache"] is None or not plain["cache"].get("enabled")
    ra, rb = ([r for r in read_journal(res["journal"])[0] if r.get("kind") == "step"]
              for res in (cached, plain))
    for p, q in zip(ra, rb, strict=True):
        assert_close(q["loss"], p["loss"], rtol=1e-5)
    for res in (cached, plain):
        store, _ = replay_journal(bundle, res["journal"])
        assert store.digest() == res["sha256"]
