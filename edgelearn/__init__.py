"""edgelearn: personalize exported models on device with forward-only optimizers.

The public surface for apps (`import edgelearn as el`):

    bundle = el.load_bundle("bundles/mlp")
    with el.Session(bundle, "runs/u1", el.TrainConfig(optimizer="zo-sgd")) as s:
        s.step((x, y))                      # one journaled step on a sample the app just got
        s.run(el.load_data("user.npz"), steps=500, callbacks=[el.ProgressBar()])
        print(s.evaluate(el.load_data("test.npz")).accuracy)
    el.replay(bundle, "runs/u1/journal.bin").sha256   # the same weights, from the journal

What is available and what fits here: `el.optimizers()` (name -> its Options),
`el.auto_rule()` (what optimizer "auto", the default, picks), `el.objectives()`,
`el.backend_names()`, `el.device_profiles()`, `el.device(bundle)` (this machine, its profile
and the largest batch per optimizer under its memory budget), `el.describe(bundle)` (what a
bundle can train with). `el.tools` holds the tool-level entry points of `edgelearn
prepare|bake|bench`.

Unstable: `el.tools` and everything outside `__all__` (`edgelearn.optim`, `edgelearn.backends`,
`edgelearn.training.*`, ...): importable, but its names may change between versions.

Only stdlib and numpy are imported here; runtimes (onnxruntime, LiteRT) load lazily inside
their backend, and torch never loads on the device side.
"""

from edgelearn import fleet as fleet  # el.fleet: a subpackage, outside __all__
from edgelearn import tools
from edgelearn.bundle import Bundle, load_bundle
from edgelearn.capabilities import describe
from edgelearn.data import Dataset, load_data
from edgelearn.devices import device, device_profiles
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.optim import make_optimizer
from edgelearn.params import ParamStore
from edgelearn.registries import auto_rule, backend_names, objectives, optimizers
from edgelearn.training import (
    Callback,
    DivergencePolicy,
    EarlyStopping,
    EvalResult,
    MetricsLog,
    ProgressBar,
    ReplayResult,
    RunMetrics,
    RunResult,
    RuntimeConfig,
    Session,
    StepResult,
    TrainConfig,
    TrainingInterrupted,
    evaluate,
    replay,
)

__version__ = "0.1.0"

__all__ = [
    "Bundle",
    "BundleError",
    "Callback",
    "Dataset",
    "DivergencePolicy",
    "EarlyStopping",
    "EdgelearnError",
    "EvalResult",
    "InputError",
    "MetricsLog",
    "ParamStore",
    "ProgressBar",
    "ReplayResult",
    "RunMetrics",
    "RunResult",
    "RuntimeConfig",
    "Session",
    "StepResult",
    "TrainConfig",
    "TrainingInterrupted",
    "__version__",
    "auto_rule",
    "backend_names",
    "describe",
    "device",
    "device_profiles",
    "evaluate",
    "load_bundle",
    "load_data",
    "make_optimizer",
    "objectives",
    "optimizers",
    "replay",
    "tools",
]
