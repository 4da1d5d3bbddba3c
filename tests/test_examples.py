"""Examples run as users run them (short settings)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.torch
def test_personalize_digits_example(tmp_path: Path) -> None:
    pytest.importorskip("sklearn")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "personalize_digits.py"), "--out",
         str(tmp_path), "--steps", "400"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch_loaded_on_device"] is False
    assert res["accuracy_after"] > res["accuracy_before"] + 0.1
    assert Path(res["weights"]).is_file()


@pytest.mark.torch
def test_har_loso_example(tmp_path: Path) -> None:
    # only seglearn's data file is used; importing seglearn itself would need pandas
    if importlib.util.find_spec("seglearn") is None:
        pytest.skip("seglearn (the watch dataset) is not installed")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "har_loso.py"), "--quick", "--subjects", "1",
         "--budget", "1500", "--out", str(tmp_path)],
        check=True, capture_output=True, text=True, timeout=600,
    )
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["torch_loaded_on_device"] is False
    (row,) = res["per_subject"]
    # the device's "before" is the exported model: it must score what torch scored (parity is
    # ~1e-6 on logits, so at most a near-tie window or two may flip)
    assert row["before"] == pytest.approx(row["before_torch"], abs=2 / row["n_held_out"])
    # a real learning signal: the ceiling and the best forward-only variant both improve on
    # held-out windows of a subject the model never saw, at the same forward budget
    assert row["backprop"]["accuracy"] > row["before"] + 0.03
    best_zo = max(row[m]["accuracy"] for m in ("zo-head", "zo-last", "zo-full"))
    assert best_zo > row["before"] + 0.03
    assert all(row[m]["forwards"] <= 1500 for m in ("backprop", "zo-head", "zo-last", "zo-full"))
    # the watch data was converted once into a pickle-free .npz
    assert (tmp_path / "watch.npz").is_file()
