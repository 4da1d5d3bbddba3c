"""Scoring weights on a data set: mean loss, and accuracy for classifiers."""

from __future__ import annotations

import os
import time

from edgelearn.bundle import Bundle, load_bundle
from edgelearn.data import Dataset
from edgelearn.model import Model
from edgelearn.osutil import peak_rss_mb
from edgelearn.training.config import RuntimeConfig
from edgelearn.training.results import EvalResult


def score(model: Model, data: Dataset, *, batch_size: int = 256,
          objective: str | None = None) -> EvalResult:
    """Loss (and accuracy) of a model's current weights on `data`.

    Args:
        model: a bound model. data: examples to score. batch_size: examples per forward.
        objective: loss name (None: the bundle task's default).
    """
    t0 = time.perf_counter()
    res = model.evaluate(data, batch_size=batch_size, objective=objective)
    return EvalResult(loss=res["loss"], accuracy=res.get("accuracy"), n=res["n"],
                      seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())


def evaluate(bundle: Bundle | str | os.PathLike, data: Dataset, *,
             weights: str | os.PathLike | None = None, runtime: RuntimeConfig | None = None,
             batch_size: int = 256, objective: str | None = None) -> EvalResult:
    """Loss (and accuracy) of a bundle, or of personalized weights, on `data`.

    Args:
        bundle: a loaded Bundle or its directory.
        data: examples to score (`load_data`).
        weights: a safetensors file of trained weights (None: the bundle's own).
        runtime: where to run (default: this machine's detected profile).
        batch_size: examples per forward.
        objective: loss name (None: cross-entropy for classifiers, mse for regression).
    """
    b = bundle if isinstance(bundle, Bundle) else load_bundle(bundle)
    rt = (runtime if runtime is not None else RuntimeConfig()).resolve(b)
    model = Model(b, backend=rt.backend, trainable=(), weights=weights, threads=rt.threads,
                  providers=rt.providers, backend_options=rt.backend_options)
    return score(model, data, batch_size=batch_size, objective=objective)
