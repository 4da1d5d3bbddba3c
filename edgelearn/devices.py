"""Device profiles (`devices/*.toml`) and detection of the machine we run on.

A profile says what a board is (arch, cores, memory), which runtimes install there and under
which Python / glibc constraints, which backend and execution providers to prefer, how many
threads to use and how much memory training may take (`memory_budget_mb`).
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgelearn.errors import InputError

_RUNTIME_MODULES = {"onnxruntime": "onnxruntime", "litert": "ai_edge_litert",
                    "tflite-runtime": "tflite_runtime"}


@dataclass(frozen=True)
class Profile:
    """One device profile.

    Args:
        name: profile name (file stem).
        description: what hardware and OS it describes.
        arch: machine architecture ("aarch64", "x86_64").
        cores / memory_mb: hardware figures (None = read from this machine).
        memory_budget_mb: memory training may use (MiB, whole process peak).
        threads: runtime threads (None = cores).
        backends: backend preference order.
        providers: ORT execution providers preference order.
        runtimes: per-runtime install constraints (pip, python, glibc, numpy, note).
        detect_model: substrings of /proc/device-tree/model identifying the board.
    """

    name: str
    description: str = ""
    arch: str = ""
    cores: int | None = None
    memory_mb: int | None = None
    memory_budget_mb: int | None = None
    threads: int | None = None
    backends: tuple[str, ...] = ("onnxruntime",)
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    runtimes: dict[str, dict[str, Any]] = field(default_factory=dict)
    detect_model: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        """Plain JSON data."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _toml_loads(text: str) -> dict[str, Any]:
    try:
        import tomllib
    except ImportError:  # Python 3.10 (JetPack 6)
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ImportError:
            raise InputError("reading device profiles on Python 3.10 needs `pip install tomli`") \
                from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"device profile is not valid TOML ({e})") from None


def profiles_dir() -> Path:
    """Directory of the shipped profiles (the `devices/` folder, package `edgelearn.profiles`)."""
    from edgelearn import profiles

    return Path(profiles.__file__).parent


def list_profiles() -> list[str]:
    """Names of the shipped profiles."""
    return sorted(p.stem for p in profiles_dir().glob("*.toml"))


def load_profile(name_or_path: str) -> Profile:
    """Load a shipped profile by name, or any profile TOML by path."""
    p = Path(name_or_path)
    if not (p.suffix == ".toml" and p.is_file()):
        if name_or_path not in list_profiles():
            raise InputError(f"unknown device {name_or_path!r}; known: "
                             f"{', '.join(list_profiles())} (or a path to a .toml profile)")
        p = profiles_dir() / f"{name_or_path}.toml"
    if p.stat().st_size > 1 << 20:
        raise InputError(f"{p.name}: device profile larger than 1 MiB")
    data = _toml_loads(p.read_text(encoding="utf-8"))
    known = set(Profile.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    if unknown:
        raise InputError(f"{p.name}: unknown profile keys {unknown}")
    try:
        for key in ("backends", "providers", "detect_model"):
            if key in data:
                data[key] = tuple(str(v) for v in data[key])
        for key in ("cores", "memory_mb", "memory_budget_mb", "threads"):
            if key in data and not (isinstance(data[key], int) and data[key] > 0):
                raise InputError(f"{p.name}: {key} must be a positive integer")
        return Profile(**{"name": p.stem, **data})
    except TypeError as e:
        raise InputError(f"{p.name}: bad device profile ({e})") from None


def _meminfo_mb(key: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def board_model() -> str:
    """The board name from the device tree (Pi, Jetson), or "" on PCs."""
    try:
        return Path("/proc/device-tree/model").read_text(errors="replace").strip("\x00\n ")
    except OSError:
        return ""


def available_backends() -> list[str]:
    """Backends whose runtime module can be imported here (checked without importing it)."""
    out = []
    for name, module in _RUNTIME_MODULES.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):
            found = False
        if found:
            out.append(name)
    return out


def detect() -> dict[str, Any]:
    """What this machine is: arch, cores, memory, Python, glibc, board, runtimes, profile."""
    model = board_model()
    arch = platform.machine()
    match = None
    for name in list_profiles():
        prof = load_profile(name)
        if model and any(s in model for s in prof.detect_model):
            match = name
            break
    if match is None:
        generic = f"generic-{arch}"
        match = generic if generic in list_profiles() else None
    libc, libc_version = platform.libc_ver()
    return {
        "arch": arch,
        "board": model or None,
        "cores": os.cpu_count(),
        "memory_total_mb": _meminfo_mb("MemTotal"),
        "memory_available_mb": _meminfo_mb("MemAvailable"),
        "python": platform.python_version(),
        "glibc": libc_version if libc == "glibc" else None,
        "numpy": _version("numpy"),
        "backends": available_backends(),
        "profile": match,
    }


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except ImportError:
            return None
    return getattr(mod, "__version__", None)


def resolve_backend(profile: Profile | None, requested: str | None) -> str:
    """The backend to use: the one asked for, else the profile's first importable one."""
    if requested:
        return requested
    from edgelearn.backends import BACKENDS

    prefs = profile.backends if profile else ("onnxruntime",)
    have = [b for b in available_backends() if b in BACKENDS]
    for b in prefs:
        if b in have:
            return b
    raise InputError(f"none of the backends {list(prefs)} is installed; "
                     "pip install 'edgelearn[onnx]' or 'edgelearn[litert]'")
