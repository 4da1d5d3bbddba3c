"""The device side never imports torch (nor the host-only onnxscript): checked in fresh
interpreters, since this test process itself has torch loaded by the export fixtures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from conftest import Exported

from edgelearn.data import Dataset

HOST_ONLY = ("torch", "onnxscript", "export")


def run_python(code: str, cwd: Path) -> dict:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=cwd, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


EVAL_SCRIPT = """
import json, sys
{prelude}
import edgelearn
from edgelearn.data import load_npz
from edgelearn.model import Model
bundle = edgelearn.load_bundle({bundle!r})
data = load_npz({data!r})
res = Model(bundle, trainable="*").evaluate(data, batch_size=100)
res_baked = Model(bundle, trainable=()).evaluate(data)
print(json.dumps({{"res": res, "baked": res_baked,
                   "loaded": [m for m in {host!r} if m in sys.modules],
                   "ort": "onnxruntime" in sys.modules}}))
"""


def test_evaluate_without_torch(bundles: dict[str, Exported], digits_npz: Path,
                                tmp_path: Path) -> None:
    code = EVAL_SCRIPT.format(prelude="", bundle=str(bundles["mlp"].path), data=str(digits_npz),
                              host=HOST_ONLY)
    out = run_python(code, tmp_path)
    assert out["loaded"] == []
    assert out["ort"] is True  # the runtime did load: the check is not vacuous
    assert out["res"]["n"] == 1797
    assert 0.0 <= out["res"]["accuracy"] <= 1.0
    assert abs(out["res"]["loss"] - out["baked"]["loss"]) <= 1e-6 + 1e-5 * abs(out["baked"]["loss"])
    assert out["res"]["accuracy"] == out["baked"]["accuracy"]


def test_evaluate_with_torch_unimportable(bundles: dict[str, Exported], digits: Dataset,
                                          tmp_path: Path) -> None:
    """Same, on an interpreter where `import torch` fails (a device without torch)."""
    images = tmp_path / "digits_8x8.npz"
    np.savez(images, x=digits.x.reshape(-1, 1, 8, 8), y=digits.y)
    prelude = "sys.modules['torch'] = None; sys.modules['onnxscript'] = None"
    code = EVAL_SCRIPT.format(prelude=prelude, bundle=str(bundles["cnn"].path),
                              data=str(images), host=())
    out = run_python(code, tmp_path)
    assert out["res"]["n"] == 1797
    assert 0.0 <= out["res"]["accuracy"] <= 1.0


def test_import_edgelearn_is_numpy_only(tmp_path: Path) -> None:
    code = ("import json, sys, edgelearn, edgelearn.cli, edgelearn.model, edgelearn.bundle\n"
            "print(json.dumps(sorted(m for m in ('torch', 'onnxscript', 'onnx', 'onnxruntime',"
            " 'safetensors') if m in sys.modules)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == []


def test_cli_eval_without_torch(bundles: dict[str, Exported], digits_npz: Path,
                                tmp_path: Path) -> None:
    argv = ["edgelearn", "eval", str(bundles["mlp"].path), "--data", str(digits_npz), "--json"]
    code = (
        "import io, json, runpy, sys, contextlib\n"
        f"sys.argv = {argv!r}\n"
        "buf = io.StringIO()\n"
        "try:\n"
        "    with contextlib.redirect_stdout(buf):\n"
        "        runpy.run_module('edgelearn.cli', run_name='__main__', alter_sys=True)\n"
        "    code = 0\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "assert 'onnxscript' not in sys.modules, 'onnxscript was imported'\n"
        "print(json.dumps({'code': code, 'out': json.loads(buf.getvalue())}))\n"
    )
    out = run_python(code, tmp_path)
    assert out["code"] == 0
    assert out["out"]["n"] == 1797
    assert 0.0 <= out["out"]["accuracy"] <= 1.0
