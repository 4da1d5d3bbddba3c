"""Device profiles (`devices/*.toml`) and detection of the machine we run on.

A profile says what a board is (arch, cores, memory), which runtimes install there and under
which Python / glibc constraints, which backend and execution providers to prefer, how many
threads to use and how much memory training may take (`memory_budget_mb`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgelearn.errors import InputError

if TYPE_CHECKING:
    from edgelearn.budget import DevicePlan
    from edgelearn.bundle import Bundle


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


def device_profiles() -> list[Profile]:
    """Every shipped profile, loaded (sorted by name)."""
    return [load_profile(n) for n in list_profiles()]


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
    """Backends whose runtime really imports here (a broken install does not count)."""
    from edgelearn.backends import BACKENDS, import_problem

    return [b for b in BACKENDS if import_problem(b) is None]


def detect_profile() -> str | None:
    """Name of the shipped profile for this machine: the board (device tree) first, else
    `generic-<arch>`, else None. Imports no runtime."""
    model = board_model()
    for name in list_profiles():
        if model and any(s in model for s in load_profile(name).detect_model):
            return name
    generic = f"generic-{platform.machine()}"
    return generic if generic in list_profiles() else None


def machine_profile() -> Profile | None:
    """The detected profile, loaded; None when none fits or profiles cannot be read here
    (Python 3.10 without tomli: commands then use the default backend order)."""
    try:
        name = detect_profile()
        return load_profile(name) if name else None
    except InputError:
        return None


def detect() -> dict[str, Any]:
    """What this machine is: arch, cores, memory, Python, glibc, board, backends, profile."""
    from edgelearn.backends import BACKENDS, import_problem

    problems = {b: import_problem(b) for b in BACKENDS}
    libc, libc_version = platform.libc_ver()
    return {
        "arch": platform.machine(),
        "board": board_model() or None,
        "cores": os.cpu_count(),
        "memory_total_mb": _meminfo_mb("MemTotal"),
        "memory_available_mb": _meminfo_mb("MemAvailable"),
        "python": platform.python_version(),
        "glibc": libc_version if libc == "glibc" else None,
        "numpy": _version("numpy"),
        "backends": [b for b, why in problems.items() if why is None],
        "backends_missing": {b: why for b, why in problems.items() if why is not None},
        "profile": detect_profile(),
    }


def _version(module: str) -> str | None:
    mod = sys.modules.get(module)
    if mod is None:
        try:
            mod = __import__(module)
        except ImportError:
            return None
    return getattr(mod, "__version__", None)


def resolve_backend(profile: Profile | None, requested: str | None,
                    bundle: Bundle | None = None) -> str:
    """The backend to use: the one asked for, else the first of the profile's preference
    order (then any other) whose runtime imports and, given a bundle, for which the bundle
    carries a model (onnxruntime: model.onnx, litert: model.tflite).

    Raises InputError saying what is missing when no backend can run the bundle here.
    """
    if requested:
        return requested
    from edgelearn.backends import BACKENDS, MODEL_FILE, import_problem

    prefs = [b for b in (profile.backends if profile else ()) if b in BACKENDS]
    prefs += [b for b in BACKENDS if b not in prefs]
    for b in prefs:
        if bundle is not None and MODEL_FILE[b][0] not in bundle.files:
            continue  # checked before importing: a runtime we will not use is not loaded
        if import_problem(b) is None:
            return b
    raise InputError(_no_backend_message(prefs, bundle))


def _no_backend_message(prefs: list[str], bundle: Bundle | None) -> str:
    """Why no backend can run `bundle` here: nothing imports, or the bundle lacks the model
    of every backend that does."""
    from edgelearn.backends import EXPORT_FORMATS, INSTALL, MODEL_FILE, import_problem

    problems = {b: import_problem(b) for b in prefs}
    installed = [b for b, why in problems.items() if why is None]
    absent = [b for b, why in problems.items() if why is not None]
    missing = "; ".join(str(problems[b]) for b in absent)
    if not installed:
        return (f"no inference runtime imports here ({missing}); "
                f"{' or '.join(INSTALL[b] for b in absent)}")
    assert bundle is not None  # an installed backend is only skipped for a bundle's sake
    lacking = []
    for b in installed:
        role, fname, label = MODEL_FILE[b]
        why = bundle.manifest.get(f"{role}_skipped")
        lacking.append(f"no {label} model ({fname}{': ' + str(why) if why else ''})")
    fixes = [f"re-export it with {EXPORT_FORMATS[b]}" for b in installed]
    fixes += [f"install {b} ({INSTALL[b]})" for b in absent if MODEL_FILE[b][0] in bundle.files]
    return (f"bundle {bundle.path} has {' and '.join(lacking)}, and only "
            f"{' and '.join(installed)} is installed here ({missing}): {' or '.join(fixes)}")


@dataclass(frozen=True)
class DeviceReport:
    """This machine, the profile used for it and, for a bundle, what fits its memory budget.

    Args:
        machine: `detect()`'s figures.
        profile: the profile asked for, else the detected one (None when none fits).
        bundle: the plan for a bundle (`edgelearn.budget.plan_device`), when one was given.
    """

    machine: dict[str, Any]
    profile: Profile | None
    bundle: DevicePlan | None = None

    def to_json(self) -> dict[str, Any]:
        """The `edgelearn device [BUNDLE] --json` object."""
        res = {"machine": self.machine, "profile": self.profile.to_json() if self.profile
               else None}
        if self.bundle is not None:
            res["bundle"] = self.bundle.to_json()
        return res


def device(bundle: Bundle | str | os.PathLike | None = None, *, profile: str | None = None,
           backend: str | None = None, trainable: str | None = None, batch_size: int = 32,
           memory_budget_mb: float | None = None,
           dims: Mapping[str, int] | None = None) -> DeviceReport:
    """Detect this machine and, given a bundle, the largest batch each optimizer fits in.

    Args:
        bundle: a loaded bundle or its directory (loaded and verified); None = machine only.
        profile: profile name or .toml path (default: the one detected for this machine).
        backend: runtime to size on (default: `resolve_backend` with the profile).
        trainable: glob(s) of parameters to train (None = the manifest's).
        batch_size: the batch wanted.
        memory_budget_mb: budget (MiB; default: the profile's, else the free memory).
        dims: sizes of the bundle inputs' symbolic dimensions besides the batch, e.g.
            {"sequence": 128} (the plan counts an unsized one 1 and names it).
    """
    from edgelearn.budget import plan_device
    from edgelearn.bundle import Bundle, load_bundle

    machine = detect()
    name = profile or machine["profile"]
    prof = load_profile(name) if name else None
    if bundle is None:
        return DeviceReport(machine, prof)
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    budget = memory_budget_mb or (prof.memory_budget_mb if prof else None) or \
        machine["memory_available_mb"]
    plan = plan_device(b, backend=resolve_backend(prof, backend, b), budget_mb=budget,
                       batch_size=batch_size, trainable=trainable,
                       threads=prof.threads if prof else None, dims=dims)
    return DeviceReport(machine, prof, plan)
