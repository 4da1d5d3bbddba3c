"""Install truth: extras, quiet exports, the demo asset builder leaving committed files alone."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
ROOT = Path(__file__).resolve().parents[1]


def _extras() -> dict[str, list[str]]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["project"]["optional-dependencies"]


def test_onnx_export_extra_does_not_pull_the_tflite_converter() -> None:
    extras = _extras()
    assert not any("litert" in dep for dep in extras["export"]), extras["export"]
    assert any(dep.startswith("litert-torch") for dep in extras["export-tflite"])
    assert not any("torch" in dep for dep in extras["onnx"] + extras["litert"])


def _export(tmp_path: Path, *flags: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "edgelearn.cli", "export", "edgelearn.export.zoo:mlp",
           "--example-shape", "1,64", "--out", str(tmp_path / "b"), "--formats", "onnx,tflite",
           *flags]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)


@pytest.mark.torch
def test_export_prints_no_third_party_noise_unless_verbose(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    quiet = _export(tmp_path, "--json")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == ""
    assert json.loads(quiet.stdout)["formats"] == ["onnx", "tflite"]
    loud = _export(tmp_path, "--overwrite", "-v")
    assert loud.returncode == 0, loud.stderr
    assert loud.stderr.strip()  # the converters' own logs come back under -v
    assert loud.stdout.strip().startswith("wrote ")


@pytest.mark.torch
def test_build_demo_writes_elsewhere_unless_asked(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    pytest.importorskip("litert_torch")
    pytest.importorskip("sklearn")
    data = ROOT / "edgelearn" / "data"
    before = {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()}
    out = subprocess.run([sys.executable, "-m", "edgelearn.export.build_demo", "--out",
                          str(tmp_path)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert Path(summary["bundle"]) == tmp_path / "demo"
    assert (tmp_path / "demo" / "manifest.json").is_file()
    assert {p: p.stat().st_mtime_ns for p in data.rglob("*") if p.is_file()} == before


def test_wheel_installs_only_edgelearn_at_top_level(tmp_path: Path) -> None:
    pytest.importorskip("setuptools")
    src = tmp_path / "src"  # a copy: setuptools writes build/ beside the sources it builds
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for name in ("edgelearn", "export", "devices"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                          "--no-build-isolation", "-q", "-w", str(tmp_path), str(src)],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    (wheel,) = tmp_path.glob("edgelearn-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (top,) = [n for n in names if n.endswith("top_level.txt")]
        assert z.read(top).decode().split() == ["edgelearn"]
    assert {n.split("/")[0] for n in names if not n.startswith("edgelearn-")} == {"edgelearn"}
    assert "edgelearn/profiles/raspberry-pi-4.toml" in names
    for init in (ROOT / "edgelearn").rglob("__init__.py"):  # every subpackage ships
        assert init.relative_to(ROOT).as_posix() in names, init
    assert "edgelearn/export/onnx_export.py" in names
    assert not [n for n in names if "reference" in n]  # torch references stay with the tests
