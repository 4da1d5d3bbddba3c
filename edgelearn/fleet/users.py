"""Per-user data for fleet runs: the demo's shifted digits split into users, one .npz each.

The demo's "new user" handwriting (`edgelearn.demo.user_shift`: one pixel to the right, heavier
strokes) applied to the shipped digits the demo model was not pretrained on, dealt into
`users` disjoint users (seeded). The first `users - holdout` are the fleet's clients; the last
`holdout` are unseen users whose digits form the held-out set.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from edgelearn.errors import InputError


def write_demo_users(out_dir: str | os.PathLike, *, users: int = 12, holdout: int = 2,
                     seed: int = 0) -> dict[str, Any]:
    """Write clients/user_NN.npz and heldout.npz under `out_dir`; what was written.

    Args:
        out_dir: directory to create files in (created).
        users: users in all (>= holdout + 1).
        holdout: unseen users kept for the held-out set (>= 1).
        seed: seed of the deal.
    """
    from edgelearn.demo import DATA, user_shift

    if holdout < 1 or users < holdout + 1:
        raise InputError(f"need users >= holdout + 1 >= 2, got users {users}, holdout {holdout}")
    with np.load(DATA / "digits.npz", allow_pickle=False) as f:
        x = user_shift(f["x"].astype(np.float32) / 16.0)
        y = f["y"].astype(np.int64)
        held = ~f["pretrain"]
    x, y = x[held], y[held]
    order = np.random.Generator(np.random.Philox(np.random.SeedSequence([seed, 0xF1EE7]))) \
        .permutation(len(y))
    parts = np.array_split(order, users)
    out = Path(out_dir)
    (out / "clients").mkdir(parents=True, exist_ok=True)
    files = []
    for u, idx in enumerate(parts[: users - holdout]):
        path = out / "clients" / f"user_{u:02d}.npz"
        np.savez(path, x=x[idx], y=y[idx])
        files.append(str(path))
    rest = np.concatenate(parts[users - holdout:])
    np.savez(out / "heldout.npz", x=x[rest], y=y[rest])
    return {"clients": files, "clients_dir": str(out / "clients"),
            "heldout": str(out / "heldout.npz"), "heldout_examples": int(rest.size),
            "examples_per_client": [int(p.size) for p in parts[: users - holdout]]}
