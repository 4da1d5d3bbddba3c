"""Model: a bundle, its ParamStore and a bound backend — what eval and training operate on."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from edgelearn.backends import make_backend
from edgelearn.bundle import Bundle
from edgelearn.data import Dataset
from edgelearn.errors import InputError
from edgelearn.losses import accuracy, default_loss, get_loss


class Model:
    """A loaded bundle ready to run.

    Args:
        bundle: the validated bundle.
        backend: backend name ("onnxruntime" or "litert").
        trainable: glob patterns of parameters to keep live (None = manifest flags; () = bake
            everything, fastest for pure inference).
        weights: optional safetensors file overriding the bundle weights.
        threads: runtime intra-op threads (None = runtime default).
        providers: execution providers for ORT.
        backend_options: further backend keyword options (litert: {"strategy": ...}).
    """

    def __init__(
        self,
        bundle: Bundle,
        *,
        backend: str = "onnxruntime",
        trainable: str | Sequence[str] | None = None,
        weights: str | os.PathLike | None = None,
        threads: int | None = None,
        providers: Sequence[str] | None = None,
        backend_options: Mapping[str, Any] | None = None,
    ) -> None:
        self.bundle = bundle
        self.store = bundle.load_store(trainable=trainable, weights=weights)
        self._single = len(bundle.inputs) == 1
        self.input_name = bundle.inputs[0].name
        self.output_name = bundle.outputs[0].name
        opts: dict[str, Any] = {"threads": threads}
        if providers:
            opts["providers"] = providers
        opts.update(backend_options or {})
        self.backend = make_backend(backend, bundle, **opts)
        self.backend.bind(self.store)

    def predict(self, x: np.ndarray) -> np.ndarray:
        """First model output for input batch `x` (float32, model input layout)."""
        if not self._single:
            raise InputError("predict() needs a single-input model; call backend.forward()")
        return self.backend.forward({self.input_name: x})[self.output_name]

    def check_data(self, data: Dataset) -> None:
        """Raise InputError if `data` does not fit the model (input shape, label range)."""
        spec = self.bundle.inputs[0]
        probe = data.x[:1]
        spec.check(probe)
        if self.bundle.task == "classification":
            n_cls = self.bundle.outputs[0].shape[-1]
            if isinstance(n_cls, int) and int(data.y.max()) >= n_cls:
                raise InputError(
                    f"labels go up to {int(data.y.max())} but the model has {n_cls} classes"
                )
            if data.y.dtype.kind in "iu" and data.y.size and int(data.y.min()) < 0:
                # numpy would wrap a negative class index around to the last classes
                raise InputError(f"labels must be >= 0, got {int(data.y.min())}")

    def evaluate(
        self, data: Dataset, *, batch_size: int = 256, objective: str | None = None
    ) -> dict[str, Any]:
        """Mean loss (and accuracy for classifiers) over `data`.

        Args:
            data: examples to score.
            batch_size: examples per forward.
            objective: loss name (default from the bundle task).
        Returns: {"loss", "accuracy" (classification only), "n"}.
        """
        self.check_data(data)
        loss_fn = get_loss(objective or default_loss(self.bundle.task))
        total_loss, total_acc, n = 0.0, 0.0, 0
        for xb, yb in data.batches(batch_size):
            out = self.predict(xb)
            total_loss += loss_fn(out, yb) * len(xb)
            if self.bundle.task == "classification":
                total_acc += accuracy(out, yb) * len(xb)
            n += len(xb)
        res: dict[str, Any] = {"loss": total_loss / n, "n": n}
        if self.bundle.task == "classification":
            res["accuracy"] = total_acc / n
        return res
