"""Bit-exact on ARM: x86 journals replayed on an emulated aarch64 Debian give the same weights.

Runs benchmarks/arm_replay.py (debootstrap + qemu-user; minutes under emulation). Skipped when
the tools, root or the network (needed until the rootfs and wheels are cached) are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CACHE = Path.home() / ".cache" / "edgelearn-arm"

pytestmark = [pytest.mark.slow, pytest.mark.torch]


def _online(host: str) -> bool:
    try:
        socket.create_connection((host, 443), timeout=5).close()
        return True
    except OSError:
        return False


def test_x86_journals_replay_bit_exact_on_aarch64(tmp_path) -> None:
    pytest.importorskip("torch")  # the int8 bundle is exported on the host
    for tool in ("debootstrap", "dpkg-deb", "qemu-aarch64-static"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} missing (apt-get install debootstrap qemu-user-static)")
    cached = (CACHE / "rootfs/usr/bin/python3").exists() and any(CACHE.glob("site-*"))
    if not cached and (os.geteuid() != 0 or not _online("deb.debian.org")
                       or not _online("pypi.org")):
        pytest.skip("building the aarch64 rootfs needs root and network")
    res = subprocess.run([sys.executable, str(REPO / "benchmarks/arm_replay.py"), "--steps",
                          "5", "--work", str(tmp_path)], capture_output=True, text=True,
                         timeout=1500, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(res.stdout)
    assert report["aarch64"]["machine"] == "aarch64"
    cases = report["cases"]
    assert len(cases) >= 12
    for name, case in cases.items():
        if name == "tpsgd":  # BLAS GEMMs: equal, or a replay error that names the cause
            assert case["equal"] or "bit-exact only on the kind of CPU" in str(
                case.get("aarch64_error")), case
            continue
        assert case["equal"], (name, case)
        assert case["moved"], (name, case)  # the run changed the weights
        assert case["x86_sha256"] == case["aarch64_sha256"]
