"""Replay x86 journals on an emulated aarch64 Debian and compare the weights' sha256.

Usage (root: debootstrap needs it; network for Debian and PyPI on the first run):
    apt-get install -y debootstrap qemu-user-static
    python benchmarks/arm_replay.py [--cache ~/.cache/edgelearn-arm] [--steps 20]

What it does:
  1. aarch64 userland (cached in --cache, never in the repo): `debootstrap --arch=arm64
     --foreign --variant=minbase --include=python3 bookworm` downloads Debian's arm64 packages;
     every .deb is then unpacked with dpkg-deb. The second stage (maintainer scripts) is not
     run: it would need binfmt_misc to start each aarch64 child; Python needs only the files.
     Binaries run as `qemu-aarch64-static -L ROOT ROOT/usr/bin/python3.11`, no binfmt needed.
  2. Python packages: aarch64 wheels of numpy, onnxruntime, onnx, ai-edge-litert and
     safetensors (the host's versions) via `pip install --target --platform
     manylinux..._aarch64`, and the device wheel (`pip wheel --no-deps` of this checkout,
     built in a temporary copy).
  3. On x86: short runs of zo-sgd (restore copy / drift x noise rademacher / gaussian / pool),
     zo-scale and polystep on an int8 bundle (exported here with torch), polystep float on the
     demo bundle (population graph), tpSGD, zo-gn, zo-readout and lozo on the demo bundle;
     each journal replayed here.
  4. On aarch64: `edgelearn replay` of every journal (tpSGD: re-run on the same data).
Prints ONE JSON object: per case the x86 and aarch64 sha256 of the replayed weights and
whether they are equal (or the aarch64 replay's error), plus both sides' versions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
MIRROR = "http://deb.debian.org/debian"
WHEELS = ("numpy", "onnxruntime", "onnx", "ai-edge-litert", "safetensors")
PLATFORMS = ("manylinux_2_28_aarch64", "manylinux_2_27_aarch64", "manylinux_2_17_aarch64",
             "manylinux2014_aarch64")
QEMU = "qemu-aarch64-static"
# (name, optimizer, bundle: "demo" or "int8", train flags)
CASES: tuple[tuple[str, str, str, tuple[str, ...]], ...] = (
    *((f"zo-sgd/{r}/{n}", "zo-sgd", "demo", ("--restore", r, "--noise", n, "--probes", "2"))
      for r in ("copy", "drift") for n in ("rademacher", "gaussian", "pool")),
    ("zo-sgd/copy/rademacher/cosine", "zo-sgd", "demo",
     ("--restore", "copy", "--schedule", "cosine", "--lr", "0.01")),
    # multipliers from each tensor's RMS, computed again by replay on the device
    ("zo-sgd/relative-lr/groups", "zo-sgd", "demo",
     ("--relative-lr", "--lr", "0.01", "--group", "head.*:eps=rms*0.01", "--trainable", "*")),
    ("zo-scale/int8", "zo-scale", "int8", ()),
    # radius in quantization steps: at the default 0.05 deterministic rounding never moves
    ("polystep/int8", "polystep", "int8", ("--opt", "radius=2")),
    ("polystep/int8/stochastic", "polystep", "int8",
     ("--opt", "radius=2", "--opt", 'rounding="stochastic"')),
    ("polystep/float-population", "polystep", "demo", ()),
    ("tpsgd", "tpsgd", "demo", ()),
    *((f"zo-gn/{r}", "zo-gn", "demo", ("--restore", r, "--probes", "4", "--trainable", "*"))
      for r in ("copy", "drift")),
    # M R summed elementwise in a fixed order: the same float64 sums on every CPU
    ("zo-readout", "zo-readout", "demo", ("--trainable", "head.*")),
    # a trust region that binds: M scaled before it is rounded and journaled
    ("zo-readout/trust", "zo-readout", "demo", ("--trainable", "head.*", "--trust", "0.05")),
    # the update deferred in a pending low-rank sum, added to W when V changes (nu 7 of the
    # run's steps) and at the end; the Gemm engine checked against numpy's bits on each CPU
    *((f"lozo/{e}", "lozo", "demo", ("--trainable", "*", "--nu", "7", "--update-engine", e))
      for e in ("auto", "numpy")),
)


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    """Run a command, raising with its stderr on failure."""
    res = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])}... failed ({res.returncode}):\n"
                           f"{res.stderr[-3000:]}")
    return res


def build_rootfs(cache: Path) -> Path:
    """The arm64 Debian bookworm tree with python3 (cached; built once)."""
    root = cache / "rootfs"
    if (root / "usr/bin/python3").exists():
        return root
    for tool in ("debootstrap", "dpkg-deb", QEMU):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: apt-get install -y debootstrap "
                               "qemu-user-static")
    partial = cache / "rootfs.partial"
    shutil.rmtree(partial, ignore_errors=True)
    run(["debootstrap", "--arch=arm64", "--foreign", "--variant=minbase",
         "--include=python3,ca-certificates", "bookworm", str(partial), MIRROR])
    # Unpack every downloaded package (first stage unpacked only the essential ones).
    for deb in sorted((partial / "var/cache/apt/archives").glob("*.deb")):
        run(["dpkg-deb", "-x", str(deb), str(partial)])
    partial.rename(root)
    return root


# qemu-user shows aarch64 programs the host's x86 /proc/cpuinfo, which onnxruntime's cpuinfo
# library cannot parse (it segfaults on import); `-L ROOT` looks paths up in ROOT first, so an
# ARM cpuinfo there (two Cortex-A72 cores, a Raspberry Pi 4) is what they read instead.
_CPU = ("processor\t: {i}\nBogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\n"
        "CPU implementer\t: 0x41\nCPU architecture: 8\nCPU variant\t: 0x0\n"
        "CPU part\t: 0xd08\nCPU revision\t: 3\n\n")


def describe_cpu(root: Path) -> None:
    """Write the emulated machine's /proc/cpuinfo into the rootfs (see _CPU)."""
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/cpuinfo").write_text("".join(_CPU.format(i=i) for i in range(2)))


def build_site(cache: Path) -> Path:
    """aarch64 wheels of the device dependencies, at the host's versions (cached per set)."""
    pins = [f"{n}=={metadata.version(n)}" for n in WHEELS]
    site = cache / ("site-" + "-".join(p.replace("==", "_") for p in pins))
    if site.exists():
        return site
    partial = Path(str(site) + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    plat = [a for p in PLATFORMS for a in ("--platform", p)]
    run([sys.executable, "-m", "pip", "install", "-q", "--target", str(partial), *plat,
         "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp", *pins])
    partial.rename(site)
    return site


def build_device_wheel(work: Path) -> Path:
    """This checkout as a pure-Python wheel, unpacked for the emulated interpreter."""
    src = work / "src"
    files = run(["git", "ls-files", "-z"], cwd=REPO).stdout.split("\0")
    for rel in filter(None, files):
        if (REPO / rel).is_file():
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel, src / rel)
    run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
         "-w", str(work / "dist"), str(src)])
    wheel = next((work / "dist").glob("edgelearn-*.whl"))
    target = work / "device-site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
         str(wheel)])
    return target


def digits(work: Path) -> Path:
    """The shipped digits the demo model did not pretrain on, as float32 in [0, 1] (.npz)."""
    import numpy as np

    with np.load(REPO / "edgelearn/data/digits.npz", allow_pickle=False) as f:
        keep = ~f["pretrain"]
        x, y = f["x"][keep].astype(np.float32) / 16.0, f["y"][keep]
    out = work / "digits.npz"
    np.savez(out, x=x, y=y)
    return out


def export_int8(work: Path, data: Path) -> Path:
    """A small int8 (QDQ) MLP bundle for digits, exported on the host with torch."""
    import numpy as np
    import torch
    from edgelearn.export.quantize import export_int8_bundle
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    x = torch.from_numpy(np.load(data)["x"][:8].astype(np.float32))
    out = work / "int8"
    export_int8_bundle(model, x, out, trainable="*")
    return out


def host_cli(args: list[str]) -> dict[str, Any]:
    """`edgelearn ARGS --json` on the host (this checkout first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    res = run([sys.executable, "-m", "edgelearn.cli", *args, "--json"], env=env)
    return json.loads(res.stdout)


def arm_python(root: Path, paths: list[Path], code_or_args: list[str],
               timeout: float = 1800) -> subprocess.CompletedProcess:
    """Run the emulated aarch64 python3 with `paths` as its PYTHONPATH (clean environment)."""
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": ":".join(map(str, paths)),
           "PYTHONDONTWRITEBYTECODE": "1", "HOME": "/tmp", "LANG": "C.UTF-8"}
    return subprocess.run([QEMU, "-L", str(root), str(root / "usr/bin/python3"),
                           *code_or_args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def arm_versions(root: Path, paths: list[Path]) -> dict[str, Any]:
    """What the emulated side runs (machine, Python, numpy, onnxruntime)."""
    code = ("import json,platform,numpy,onnxruntime;print(json.dumps({'machine':"
            "platform.machine(),'python':platform.python_version(),'numpy':numpy.__version__,"
            "'onnxruntime':onnxruntime.__version__}))")
    res = arm_python(root, paths, ["-c", code])
    if res.returncode != 0:
        raise RuntimeError(f"aarch64 python failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout)


def arm_replay(root: Path, paths: list[Path], bundle: Path, journal: Path, out: Path,
               data: Path | None) -> dict[str, Any]:
    """`edgelearn replay --json` on aarch64: its JSON (sha256) or the error it printed."""
    args = ["-m", "edgelearn.cli", "replay", str(bundle), str(journal), "--out", str(out),
            "--json", *(["--data", str(data)] if data else [])]
    res = arm_python(root, paths, args)
    try:
        return json.loads(res.stdout)
    except json.JSONDecodeError:
        return {"error": (res.stderr or res.stdout)[-2000:], "rc": res.returncode}


def base_digest(bundle: Path) -> str:
    """sha256 of a bundle's base weights as replay digests them (nothing trained yet)."""
    from edgelearn.bundle import load_bundle

    return load_bundle(bundle).load_store().digest()


def run_case(case: tuple[str, str, str, tuple[str, ...]], bundles: dict[str, Path],
             data: Path, work: Path, root: Path, paths: list[Path],
             steps: int) -> dict[str, Any]:
    """Train on x86, replay on x86 and on aarch64; the two sha256 and whether they match."""
    name, optimizer, which, flags = case
    slug = name.replace("/", "_")
    run_dir = work / "runs" / slug
    trained = host_cli(["train", str(bundles[which]), "--data", str(data), "--optimizer",
                        optimizer, "--steps", str(steps), "--batch-size", "16", "--out",
                        str(run_dir), *flags])
    journal = run_dir / "journal.bin"
    needs_data = optimizer == "tpsgd"
    x86 = host_cli(["replay", str(bundles[which]), str(journal), "--out",
                    str(work / f"{slug}.x86.safetensors"),
                    *(["--data", str(data)] if needs_data else [])])
    arm = arm_replay(root, paths, bundles[which], journal, work / f"{slug}.arm.safetensors",
                     data if needs_data else None)
    out = {"steps": x86.get("steps"), "x86_sha256": x86.get("sha256"),
           "aarch64_sha256": arm.get("sha256"), "train_loss_last": trained.get("loss_last")}
    out["equal"] = out["x86_sha256"] is not None and out["x86_sha256"] == out["aarch64_sha256"]
    out["moved"] = out["x86_sha256"] != base_digest(bundles[which])  # else the case proves little
    if "sha256" not in arm:
        out["aarch64_error"] = arm.get("error", arm)
    return out


def main(argv: list[str] | None = None) -> int:
    """Build (or reuse) the aarch64 side, run every case, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", type=Path,
                    default=Path.home() / ".cache" / "edgelearn-arm",
                    help="where the arm64 rootfs and wheels are kept (not inside the repo)")
    ap.add_argument("--work", type=Path, default=None,
                    help="runs and replayed weights (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=20, help="training steps per case")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    args = ap.parse_args(argv)
    cache = args.cache.expanduser().resolve()
    if cache == REPO or REPO in cache.parents:
        ap.error("--cache must be outside the repository")
    cache.mkdir(parents=True, exist_ok=True)
    root, site = build_rootfs(cache), build_site(cache)
    describe_cpu(root)
    with tempfile.TemporaryDirectory(prefix="edgelearn-arm-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        work.mkdir(parents=True, exist_ok=True)
        paths = [build_device_wheel(Path(tmp) / "wheel"), site]
        data = digits(work)
        bundles = {"demo": REPO / "edgelearn/data/demo"}
        cases = [c for c in CASES if args.only is None or args.only in c[0]]
        skipped = []
        if any(c[2] == "int8" for c in cases):
            try:
                bundles["int8"] = export_int8(work, data)
            except ImportError:  # no torch on this host: the int8 cases cannot be exported
                skipped = [c[0] for c in cases if c[2] == "int8"]
                cases = [c for c in cases if c[2] != "int8"]
        report: dict[str, Any] = {
            "x86": {"machine": os.uname().machine, "python": sys.version.split()[0],
                    "numpy": metadata.version("numpy"),
                    "onnxruntime": metadata.version("onnxruntime")},
            "aarch64": arm_versions(root, paths), "steps": args.steps, "cases": {}}
        if skipped:
            report["skipped"] = {"cases": skipped, "reason": "torch is needed to export the "
                                 "int8 bundle on the host"}
        for case in cases:
            report["cases"][case[0]] = run_case(case, bundles, data, work, root, paths,
                                                args.steps)
        report["all_equal"] = all(c["equal"] for c in report["cases"].values())
        # tpSGD re-runs forwards and BLAS GEMMs: exact only on the same kind of CPU
        report["zeroth_order_all_equal"] = all(
            c["equal"] for n, c in report["cases"].items() if n != "tpsgd")
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
