"""What a Session trains (`TrainConfig`) and where it runs (`RuntimeConfig`).

Both are frozen dataclasses that round-trip through JSON (`to_json` / `from_json`): a run
directory records them in `session.json`, so `Session.resume(run_dir)` reopens the run as it
was started. The runtime is resolved against a bundle and a device profile by
`RuntimeConfig.resolve` (flags first, then the named or detected profile, as the CLI does).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from edgelearn.bundle import Bundle
from edgelearn.errors import InputError
from edgelearn.optim import Optimizer, make_optimizer, optimizer_class
from edgelearn.optim.defaults import AUTO, Choice, choose_optimizer, recorded_choice
from edgelearn.training.divergence import DivergencePolicy


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")


def _options_dict(options: Any) -> dict[str, Any]:
    """An optimizer's options as a plain dict (a mapping, or an options dataclass)."""
    if dataclasses.is_dataclass(options) and not isinstance(options, type):
        return dataclasses.asdict(options)
    if not isinstance(options, Mapping):
        raise InputError(f"optimizer options must be a mapping, got {type(options).__name__}")
    return dict(options)


@dataclass(frozen=True)
class TrainConfig:
    """How a run trains: everything its journal pins, plus checkpoint and fsync policy.

    Args:
        optimizer: registry name ("zo-sgd", "tpsgd", "fzoo", "hybrid", "polystep",
            "zo-scale", ...), or "auto" (the default): the bundle's best supported method,
            chosen when a Session opens (`resolve`; rule in edgelearn/optim/defaults.py).
        options: the optimizer's keyword options (`seed` defaults to `seed`); under "auto"
            they override the chosen method's default options.
        trainable: glob pattern(s) of parameters to train (None: the optimizer's default,
            else the bundle's manifest flags).
        objective: loss name (None: cross-entropy for classifiers, mse for regression).
        batch_size: examples per step of `Session.run` (shrunk to fit a memory budget).
        seed: run seed (noise, and the data order of `Session.run`).
        checkpoint_every: steps between checkpoints.
        fsync_every: journal records between fsyncs (1: every step is durable; default 64:
            a power loss takes at most the last 64 steps or 1 s of them, a killed process
            none, since appended records are in the OS's cache; an fsync costs ~4 ms here,
            10x a small model's whole step).
        fsync_seconds: also fsync at an append this many seconds after the last fsync
            (default 1.0; None: by count only).
        divergence: roll back and lower lr when the loss diverges (None: off).
        population: score populations (polystep) with the bundle's population graph.
        record_samples: append every step's batch to `samples.bin` in the run directory, so
            a run fed live samples replays and resumes without its data (tpSGD needs this;
            a step's sha256 is journaled either way).
        chosen_by: why "auto" picked `optimizer` ("auto: NAME (reason)"), set by `resolve`;
            None for an optimizer named explicitly.
    """

    optimizer: str = AUTO
    options: Mapping[str, Any] = field(default_factory=dict)
    trainable: str | Sequence[str] | None = None
    objective: str | None = None
    batch_size: int = 32
    seed: int = 0
    checkpoint_every: int = 100
    fsync_every: int = 64
    fsync_seconds: float | None = 1.0
    divergence: DivergencePolicy | None = None
    population: bool = True
    record_samples: bool = False
    chosen_by: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "options", _options_dict(self.options))
        if not isinstance(self.trainable, str | None):
            object.__setattr__(self, "trainable", tuple(self.trainable))
        for name in ("batch_size", "checkpoint_every", "fsync_every"):
            _positive_int(name, getattr(self, name))
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"seed must be a non-negative integer, got {self.seed!r}")
        if self.fsync_seconds is not None and not (
                isinstance(self.fsync_seconds, int | float) and math.isfinite(self.fsync_seconds)
                and self.fsync_seconds >= 0):
            raise InputError(f"fsync_seconds must be None or >= 0, got {self.fsync_seconds!r}")

    def resolve(self, bundle: Bundle, backend: str, *,
                run_dir: str | os.PathLike | None = None) -> TrainConfig:
        """This config with "auto" replaced by the chosen optimizer (any other: itself).

        Args:
            bundle: the bundle the run trains.
            backend: the run's resolved backend name.
            run_dir: the run directory; when it holds a run, that run's recorded optimizer
                and options are kept, so resuming never changes method (None: a new run).
        Returns: a config naming the optimizer, its options = the choice's defaults
            overridden by this config's, and `chosen_by` = the reason.
        """
        if self.optimizer != AUTO:
            return self
        from edgelearn.training.rundir import recorded_train

        recorded = recorded_train(run_dir) if run_dir is not None else None
        choice = recorded_choice(recorded) if recorded else None
        if choice is not None and run_dir is not None:
            choice = _as_journaled(choice, run_dir)
        if choice is None:
            choice = choose_optimizer(bundle, trainable=self.trainable, backend=backend,
                                      objective=self.objective)
        return dataclasses.replace(self, optimizer=choice.name, chosen_by=choice.why,
                                   options={**choice.options, **self.options})

    def make_optimizer(self) -> Optimizer:
        """A fresh optimizer of this config (its seed defaults to the run seed)."""
        if self.optimizer == AUTO:
            raise InputError('optimizer "auto" is chosen per bundle: resolve() the config')
        return make_optimizer(self.optimizer, **{"seed": self.seed, **self.options})

    def trainable_patterns(self) -> str | Sequence[str] | None:
        """The trainable globs: as given, else the optimizer's default (zo-scale: scales)."""
        if self.trainable is not None or self.optimizer == AUTO:
            return self.trainable
        return optimizer_class(self.optimizer).default_trainable

    def to_json(self) -> dict[str, Any]:
        """JSON data (`from_json` rebuilds an equal config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["options"] = dict(self.options)
        out["trainable"] = self.trainable if isinstance(self.trainable, str | None) \
            else list(self.trainable)
        out["divergence"] = None if self.divergence is None else \
            dataclasses.asdict(self.divergence)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> TrainConfig:
        """Rebuild a config from `to_json` output; InputError naming a bad key."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(f"training config has unknown keys {unknown}")
        kw = dict(data)
        if kw.get("divergence") is not None:
            kw["divergence"] = DivergencePolicy(**kw["divergence"])
        return cls(**kw)


@dataclass(frozen=True)
class Runtime:
    """A resolved runtime: what the session really runs on.

    Args:
        backend: backend name. threads: runtime threads (None: its default).
        providers: ORT execution providers (None: CPU). memory_budget_mb: peak memory the
        run may use (None: no budget). profile: the device profile applied (None: none).
        backend_options: further backend keyword options.
    """

    backend: str
    threads: int | None
    providers: list[str] | None
    memory_budget_mb: float | None
    profile: str | None
    backend_options: dict[str, Any]


@dataclass(frozen=True)
class RuntimeConfig:
    """Where a session runs: explicit settings win over the device profile's.

    Args:
        backend: "onnxruntime" or "litert" (None: the profile's first backend that imports
            here and for which the bundle has a model).
        threads: runtime threads (None: the profile's).
        providers: ORT execution providers (None: the profile's that this build has, or CPU).
        memory_budget_mb: peak memory the run may use (None: the named profile's budget;
            a detected profile's budget is not applied).
        device: a shipped profile name or a profile TOML path; "auto" detects this machine's
            profile; None applies no profile.
        backend_options: Unstable: further backend options (litert: {"strategy": ...}).
        prefix_cache: train on cached frozen-prefix features when only a suffix of the graph
            trains (bit-identical results; onnxruntime and litert; `train --no-cache` turns
            it off).
    """

    backend: str | None = None
    threads: int | None = None
    providers: Sequence[str] | None = None
    memory_budget_mb: float | None = None
    device: str | None = "auto"
    backend_options: Mapping[str, Any] = field(default_factory=dict)
    prefix_cache: bool = True

    def __post_init__(self) -> None:
        if self.providers is not None:
            object.__setattr__(self, "providers", tuple(self.providers))
        object.__setattr__(self, "backend_options", dict(self.backend_options))
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise InputError(f"memory_budget_mb must be > 0, got {self.memory_budget_mb!r}")

    def resolve(self, bundle: Bundle | None) -> Runtime:
        """The runtime for `bundle` on this machine (InputError when no backend can run it)."""
        from edgelearn.devices import load_profile, machine_profile, resolve_backend

        named = self.device if self.device not in (None, "auto") else None
        prof = load_profile(named) if named else \
            (machine_profile() if self.device == "auto" else None)
        backend = resolve_backend(prof, self.backend, bundle)
        budget = self.memory_budget_mb
        if budget is None and named and prof:
            budget = prof.memory_budget_mb
        providers = list(self.providers) if self.providers else None
        if providers is None and prof and backend in ("onnxruntime", "ort"):
            providers = usable_providers(prof.providers)
        return Runtime(backend=backend, threads=self.threads or (prof.threads if prof else None),
                       providers=providers, memory_budget_mb=budget,
                       profile=prof.name if prof else None,
                       backend_options=dict(self.backend_options))

    def to_json(self) -> dict[str, Any]:
        """JSON data (`from_json` rebuilds an equal config)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["providers"] = None if self.providers is None else list(self.providers)
        out["backend_options"] = dict(self.backend_options)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RuntimeConfig:
        """Rebuild a config from `to_json` output; InputError naming a bad key."""
        unknown = sorted(set(data) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InputError(f"runtime config has unknown keys {unknown}")
        return cls(**data)


def usable_providers(wanted: Sequence[str]) -> list[str] | None:
    """The ORT providers of `wanted` that this onnxruntime build has (CUDA only on GPU builds)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have] or None


def _as_journaled(choice: Choice, run_dir: str | os.PathLike) -> Choice:
    """`choice` with the options its run's journal header holds (the values that run used for
    options newer than it, its defaults for options whose default changed since), so an "auto"
    run resumes as it was journaled; `choice` itself when the header does not say."""
    from edgelearn.training.header import header_options
    from edgelearn.training.rundir import recorded_header

    header = recorded_header(run_dir)
    if header is None or header.get("optimizer") != choice.name:
        return choice
    options = header_options(header)
    if options is None:
        return choice
    defaults = optimizer_class(choice.name).Options().config()
    pinned = {k: v for k, v in options.items()  # the run's seed stays TrainConfig.seed
              if k != "seed" and (k not in defaults or defaults[k] != v)}
    return dataclasses.replace(choice, options={**choice.options, **pinned})
