"""adamezo on the shipped demo bundle: torch parity over steps (moments included), replay
sha256 == trained, and a checkpoint resume that carries the moments bit-exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sessions import replay_journal, train
from zo_helpers import assert_close, demo, named_noise, torch_demo_module

from edgelearn.errors import InputError
from edgelearn.losses import cross_entropy
from edgelearn.model import Model
from edgelearn.optim import make_optimizer


@pytest.mark.torch
def test_steps_match_torch_reference_with_the_devices_moments() -> None:
    """Three steps: each device step == the reference step from the same weights and moments
    (the moments, bias correction and update rule are compared, not just the first step)."""
    import torch
    from torch_reference import adamezo_step

    bundle, data, _ = demo()
    model = Model(bundle, trainable="head.*")
    store = model.store
    module = torch_demo_module()
    module.load_state_dict({n: torch.from_numpy(np.array(store[n])) for n in store.names})
    # lr small enough that float32 forward noise in the losses (through g = dL / 2 eps)
    # stays below the 1e-6 bound on the weights; the moments are compared scale-aware
    lr, eps, q = 1e-4, 1e-3, 2
    opt = make_optimizer("adamezo", lr=lr, eps=eps, probes=q, seed=9)
    moments = {n: (torch.zeros(store[n].shape), torch.zeros(store[n].shape))
               for n, _, _ in store.segments("float32")}
    for t in range(3):
        x, y = data.x[32 * t: 32 * t + 32], data.y[32 * t: 32 * t + 32]
        params = {n: torch.from_numpy(np.array(store[n])) for n in store.names}
        info = opt.step(store, lambda x=x, y=y: cross_entropy(model.predict(x), y))
        zs = [named_noise(store, (9, t, k)) for k in range(q)]
        new, moments, losses = adamezo_step(module, params, zs, moments, torch.from_numpy(x),
                                            torch.from_numpy(y), update=t + 1, lr=lr, eps=eps)
        assert info.evaluations == 2 * q
        assert_close(info.record["evals"], losses)
        for (name, a, b) in store.segments("float32"):
            assert_close(store[name], new[name].numpy())
            assert_close(opt.m[a:b], moments[name][0].numpy().ravel(), atol=0, rtol=1e-2)
        moments = {n: (torch.from_numpy(opt.m[a:b].reshape(store[n].shape).copy()),
                       torch.from_numpy(opt.v[a:b].reshape(store[n].shape).copy()))
                   for n, a, b in store.segments("float32")}


def test_replay_and_resume_rebuild_the_moments_bit_exactly(tmp_path) -> None:
    bundle, data, _ = demo()
    kw = {"optimizer": "adamezo", "trainable": "head.*", "batch_size": 32, "seed": 4,
          "options": {"lr": 0.01}}
    full = train(bundle, data, tmp_path / "full", steps=60, **kw)
    assert full["population_graph"]  # the 2q candidates of a step in one runtime call
    store, steps = replay_journal(bundle, full["journal"])
    assert steps == 60
    assert store.digest() == full["sha256"]
    part = tmp_path / "part"  # stop at 45 (checkpoint at 40 carries m and v), resume to 60
    train(bundle, data, part, steps=45, checkpoint_every=20, **kw)
    res = train(bundle, data, part, steps=60, checkpoint_every=20, **kw)
    assert res["resumed_from"] == 45
    assert res["sha256"] == full["sha256"]


def test_state_with_bad_moments_is_refused() -> None:
    opt = make_optimizer("adamezo")
    store = Model(demo()[0], trainable="head.*").store
    opt.step(store, lambda: float(np.sum(store.flat() ** 2)))
    state = json.loads(json.dumps(opt.state_dict()))
    assert set(state) >= {"m", "v", "updates"}
    for bad in ({"m": "@@"}, {"v": state["m"][:-8]}, {"updates": -1}):
        with pytest.raises(InputError):
            make_optimizer("adamezo").load_state_dict({**state, **bad})
