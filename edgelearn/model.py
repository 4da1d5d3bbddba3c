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
from edgelearn.inputs import Inputs, feeds
from edgelearn.losses import default_loss, get_accuracy, get_loss


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
        self.input_name = bundle.inputs[0].name
        # inputs whose batch dimension is fixed at 1: a larger batch runs one example at a time
        self._batch1 = {s.name for s in bundle.inputs if s.shape and s.shape[0] == 1}
        self.output_name = bundle.outputs[0].name
        opts: dict[str, Any] = {"threads": threads}
        if providers:
            opts["providers"] = providers
        opts.update(backend_options or {})
        self.backend = make_backend(backend, bundle, **opts)
        self.backend.bind(self.store)

    def predict(self, x: Inputs, *, release: bool = False) -> np.ndarray:
        """First model output for input batch `x`.

        Args:
            x: the input [batch, ...] of a single-input model, or a dict input name -> array
                (`edgelearn.inputs`: integer inputs stay integers, floats become the declared
                float type). A model whose batch is fixed at 1 runs a batch one example at a
                time (outputs concatenated).
            release: a one-off forward: the runtime gives its working memory back after it
                (`Backend.forward`).
        """
        feed = feeds(self.bundle.inputs, x)
        n = next((len(feed[k]) for k in self._batch1), 1)
        if n <= 1:
            return self.backend.forward(feed, release=release)[self.output_name]
        outs = [self.backend.forward({k: v[i : i + 1] if k in self._batch1 else v
                                      for k, v in feed.items()}, release=release)
                [self.output_name] for i in range(n)]
        return np.concatenate(outs)

    def check_data(self, data: Dataset, *, objective: str | None = None) -> None:
        """Raise InputError if `data` does not fit the model (inputs, label range).

        Args:
            data: the examples. objective: the loss they train / score (None: the default).
        """
        self.bundle.check_inputs(feeds(self.bundle.inputs, next(data.batches(1))[0]))
        self.check_labels(data.y, objective=objective)

    def check_labels(self, y: np.ndarray, *, objective: str | None = None) -> None:
        """Raise InputError if labels `y` [n] are out of the model's class range (classifiers),
        or mse targets do not match the output's size (the label half of `check_data`)."""
        objective = objective or default_loss(self.bundle.task, self.bundle.outputs)
        if objective == "mse":
            self._check_mse_targets(y)
            return
        if self.bundle.task != "classification":
            return
        if y.dtype.kind in "iu" and y.size and int(y.min()) < 0:
            # numpy would wrap a negative class index around to the last classes
            raise InputError(f"labels must be >= 0, got {int(y.min())}")
        n_cls = 2 if objective == "bce" else self.bundle.outputs[0].shape[-1]
        if isinstance(n_cls, int) and int(y.max()) >= n_cls:
            raise InputError(
                f"labels go up to {int(y.max())} but the model has {n_cls} classes"
                + (" (bce: labels 0 / 1)" if objective == "bce" else ""))

    def _check_mse_targets(self, y: np.ndarray) -> None:
        """Raise InputError unless targets `y` [n, ...] hold as many numbers per example as
        the output (mse compares the two elementwise; a classifier's labels are one each)."""
        shape = list(self.bundle.outputs[0].shape[1:])
        if not all(isinstance(d, int) for d in shape):
            return
        if int(np.prod(y.shape[1:])) != int(np.prod(shape)):
            raise InputError(
                f"mse needs targets shaped like the output {shape} per example, got "
                f"{list(y.shape[1:])}" + ("; a classifier's labels are one number each: "
                                          "use cross-entropy" if y.ndim == 1 else ""))

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
        objective = objective or default_loss(self.bundle.task, self.bundle.outputs)
        self.check_data(data, objective=objective)
        loss_fn, accuracy = get_loss(objective), get_accuracy(objective)
        total_loss, total_acc, n = 0.0, 0.0, 0
        for xb, yb in data.batches(batch_size):
            out = self.predict(xb)
            total_loss += loss_fn(out, yb) * len(yb)
            if self.bundle.task == "classification":
                total_acc += accuracy(out, yb) * len(yb)
            n += len(yb)
        res: dict[str, Any] = {"loss": total_loss / n, "n": n}
        if self.bundle.task == "classification":
            res["accuracy"] = total_acc / n
        return res
