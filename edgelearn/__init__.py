"""edgelearn: personalize exported models on device with forward-only optimizers.

The public surface for apps (`import edgelearn as el`):

    bundle = el.load_bundle("bundles/mlp")
    with el.Session(bundle, "runs/u1", el.TrainConfig(optimizer="zo-sgd")) as s:
        s.step((x, y))                      # one journaled step on a sample the app just got
        s.run(el.load_data("user.npz"), steps=500, callbacks=[el.ProgressBar()])
        print(s.evaluate(el.load_data("test.npz")).accuracy)
    el.replay(bundle, "runs/u1/journal.bin").sha256   # the same weights, from the journal

Everything else (`edgelearn.optim`, `edgelearn.backends`, `edgelearn.training.*`, ...) is
Unstable: importable, but its names may change between versions.

Only stdlib and numpy are imported here; runtimes (onnxruntime, LiteRT) load lazily inside
their backend, and torch never loads on the device side.
"""

from edgelearn.bundle import Bundle, load_bundle
from edgelearn.data import Dataset, load_data
from edgelearn.errors import BundleError, EdgelearnError, InputError
from edgelearn.optim import make_optimizer
from edgelearn.params import ParamStore
from edgelearn.training import (
    Callback,
    DivergencePolicy,
    EarlyStopping,
    EvalResult,
    MetricsLog,
    ProgressBar,
    ReplayResult,
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
    "RunResult",
    "RuntimeConfig",
    "Session",
    "StepResult",
    "TrainConfig",
    "TrainingInterrupted",
    "__version__",
    "evaluate",
    "load_bundle",
    "load_data",
    "make_optimizer",
    "replay",
]
