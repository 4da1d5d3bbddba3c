"""Examples run as users run them (short settings)."""

from __future__ import annotations

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
