"""tpSGD: layer-local target projection from one forward sweep (no backpropagation).

"Learning with Local Gradients at the Edge" (2022; tpSGD, no public code).
Hidden-layer targets follow Direct Random Target Projection (Frenkel, Lefebvre, Bol 2021,
"Learning without feedback: fixed random learning signals allow for feedforward training of
deep neural networks"; ChFrenkel/DirectRandomTargetProjection), whose conv case projects the
label onto the whole C x H x W activation.

One step, on the batch (x, y):
  1. ONE forward of the taps graph (model_taps.onnx, or model_taps.tflite on LiteRT) returns
     every trainable layer's input, pre-activation and activation output (and the logits).
  2. For hidden layer i with output a_i [N, D_i], a fixed random projection B_i
     [classes, D_i] of the one-hot label gives the local target t_i = onehot(y) B_i. a_i is
     the layer's activation after its own pooling when the exporter recorded one (the "post"
     ops: max/avg pool, mean over time, flatten; `target_on="pooled"`, the default), else the
     activation output (conv: C*H*W or C*L units; GRU: the final hidden state). The local
     loss is
        "mse":  L_i = 0.5/N * ||a_i - t_i||^2         (tpSGD l2: delta = (a - t) * f'(z))
        "l1":   L_i = 1/N * |a_i - t_i|_1             (tpSGD l1: delta = sign(a - t) * f'(z))
        "drtp": L_i = -1/N * <a_i, t_i>               (DRTP: delta = -t * f'(z))
     The pooling is differentiated in numpy (`edgelearn.layers.post_backward`); it has no
     parameters and belongs to the layer, so nothing crosses into the next layer. Digits CNN,
     mean of 3 seeds (benchmarks/bench_tpsgd.py): 1.7 / 0.8 points below backprop after
     300 / 1500 steps with targets after pooling, 2.9 / 1.3 with targets before it.
     and its exact gradient w.r.t. that layer's own weights is computed in numpy from the
     layer's taps (edgelearn.layers: linear, conv2d by im2col, conv1d as a 1 x L conv2d,
     batch norm in eval form, GRU by backprop through time inside the layer). The output
     layer uses the true loss.

     Modern layers, each still differentiated only inside its own layer:
     - activations GELU (exact and tanh form; Hendrycks & Gimpel 2016), SiLU (Elfwing et al.
       2018), ReLU6 (MobileNetV2, Sandler et al. 2018) and hardswish (MobileNetV3, Howard et
       al. 2019): f'(z) from the tapped pre-activation (`edgelearn.layers.act_grad`);
     - layer norm after a layer (Ba, Kiros, Hinton 2016): its per-sample statistics make the
       backward an exact projection, not a fixed scale (`ln_backward`); gamma/beta train with
       the layer's local loss, as batch norm's do;
     - residual additions (He et al. 2016): `y = skip + f(x)` after a layer is one of its
       post ops; the target sits on y, the residual stream, and dy/df = 1 because the skip
       path is computed before the layer (its weights cannot change it); no activation is
       needed before it (a linear bottleneck or a transformer MLP's second projection);
     - depthwise and grouped convolutions (Howard et al. 2017, MobileNets): im2col per group,
       one batched GEMM;
     - global average pooling (adaptive avg pool to 1, mean over the spatial axes, the
       functional forms too): a "mean" post op.
     DRTP's argument (a fixed random projection of the label as each layer's target; Frenkel
     et al. 2021, section 3) does not depend on the layer type, and putting a local loss after
     each residual block is how local-loss training is applied to ResNets (Nokland & Eidnes
     2019, "Training Neural Networks with Local Error Signals").
     Head only, any backbone: when the torch model cannot be traced into layers (attention,
     anything unsupported) or for a prepared ONNX model, the taps graph is built from the ONNX
     graph itself (`edgelearn.graph_taps`): the output layer's exact update needs only its
     input and the logits.
     Head only, on cached frozen-prefix features (onnxruntime), `head_update="graph"` (or
     "auto") computes that update inside the suffix's runtime call instead of in numpy
     (`edgelearn.graph_update`): the same rule in float32, so other floats; the option and
     the graph's form (`head_graph`) are recorded in the journal header and replay re-runs
     the same graph.
  3. Each layer's trainable slice of the arena is updated in place, W -= lr * dL_i/dW, and
     its taps are dropped. No gradient crosses a layer boundary.
B_i is drawn from (seed, layer index) with a counter-based generator, so the run's seed (in the
journal header) is all that is needed to rebuild it.

Replay: the update depends on the data, not only on scalars, so a journal record cannot
rebuild it alone. tpSGD is deterministic given the weights and the batch, and the batch of
step t is a pure function of (data, data seed, t) (`edgelearn.data.batch_indices`), so replay
= re-running the same step on the same data: `replay(store, record, taps=...)` re-runs the
forward and the update and checks that the regenerated record (true loss and every local loss,
exact floats) equals the stored one, which fails loudly on different data or weights. The
journal header of a tpsgd run also holds the data's sha256.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn import graph_update
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.layers import (
    Layer,
    act_grad,
    bn_backward,
    conv1d_grads,
    conv2d_grads,
    gru_grads,
    linear_grads,
    ln_backward,
    post_backward,
)
from edgelearn.optim.base import Forward, Optimizer, StepInfo, register
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.params import ParamStore

LOCAL_LOSSES = ("mse", "l1", "drtp")
TARGETS_ON = ("pooled", "activation")
HEAD_LOSSES = ("cross-entropy", "mse")
HEAD_UPDATES = ("numpy", "graph", "auto")
_B_DOMAIN = 0x7B5D  # separates projection draws from noise/data draws of the same seed

#: the `taps=` input of a tpsgd step: () -> (taps: name -> array incl. the model input,
#: targets y)
TapsEvaluate = Callable[[], tuple[dict[str, np.ndarray], np.ndarray]]


def projection(seed: int, index: int, rows: int, cols: int, scale: float) -> np.ndarray:
    """The fixed random projection B of layer `index`: float32 [rows, cols], N(0, scale^2)."""
    ss = np.random.SeedSequence([seed, _B_DOMAIN, index])
    b = np.random.Generator(np.random.Philox(ss)).standard_normal((rows, cols), np.float32)
    return b * np.float32(scale)


def head_grad(out: np.ndarray, y: np.ndarray, loss: str) -> tuple[float, np.ndarray]:
    """(loss, dL/d out) of the true loss (cross-entropy on logits, or mean squared error)."""
    # fewer numpy calls than the textbook form, each value computed by the same float
    # operations in the same order (replay checks every bit): both operands cast to float64
    # before the subtraction, one row sum serves p and the log-sum, and np.mean is
    # add.reduce / n
    if loss == "cross-entropy":
        n = len(y)
        z = np.subtract(out, out.max(axis=1, keepdims=True), dtype=np.float64)
        e = np.exp(z)
        s = e.sum(axis=1, keepdims=True)
        p = np.divide(e, s, out=e)
        idx = np.arange(n)
        logs = np.log(s.reshape(n), out=s.reshape(n))
        value = float(np.add.reduce(np.subtract(logs, z[idx, y], out=logs))) / n
        p[idx, y] -= 1.0
        return value, np.divide(p, n, out=p).astype(np.float32)
    d = np.subtract(out, np.asarray(y).reshape(out.shape), dtype=np.float64)
    value = float(np.add.reduce(np.multiply(d, d), axis=None)) / d.size
    g = np.multiply(2.0, d, out=d)
    g /= d.size
    return value, g.astype(np.float32)


@dataclass(frozen=True)
class TPSGDOptions(OptimizerOptions):
    """Options of tpsgd (module docstring: the local losses and targets)."""

    lr: float = field(default=0.05, metadata=meta(
        "learning rate of the output layer (and of every layer when hidden_lr is null)",
        cli="--lr"))
    local_loss: str = field(default="mse", metadata=meta(
        "hidden-layer loss against the projected label: mse or l1 (tpSGD), drtp",
        cli="--local-loss", choices=LOCAL_LOSSES))
    # ReLU layers can only reach the positive half of a target, and a larger scale makes that
    # half win over the units pushed to zero (digits MLP/CNN: 3 beat 1 by 1-20 points)
    target_scale: float = field(default=3.0, metadata=meta(
        "standard deviation of the random label projections", cli="--target-scale"))
    head_loss: str = field(default="cross-entropy", metadata=meta(
        "true loss of the output layer (train: mse with --objective mse)", choices=HEAD_LOSSES))
    # A conv layer's local loss sums over every position of its maps, so its gradients are
    # large: a CNN trains best with hidden_lr well below lr (digits CNN, 300 steps: lr 0.2 with
    # hidden_lr 0.01 is 1-2 points below backprop; hidden_lr = lr collapses to chance).
    hidden_lr: float | None = field(default=None, metadata=meta(
        "learning rate of the hidden layers' local updates (null: lr)", cli="--hidden-lr"))
    # journals written before target_on existed put every target on the activation output
    target_on: str = field(default="pooled", metadata=meta(
        "put a layer's target after its own pooling (pooled, when the exporter recorded one) "
        "or on its activation output", cli="--target-on", choices=TARGETS_ON,
        legacy="activation"))

    # the graph update rounds differently (float32 loss and G): a run records its mode, and
    # journals without the key replay the numpy path
    head_update: str = field(default="numpy", metadata=meta(
        "where a head-only run on cached prefix features computes the head's update: numpy, "
        "graph (inside the suffix's onnxruntime call; edgelearn.graph_update) or auto (graph "
        "where it can run, else numpy)", choices=HEAD_UPDATES, record="when-set"))
    # recorded with every non-numpy head_update (`config`); a header with a graph head update
    # and no head_graph ran form 1, the only one before this option (`from_config`)
    head_graph: int = field(default=graph_update.VERSION, metadata=meta(
        "form of the head update graph (edgelearn.graph_update): 2 (6 nodes, targets and "
        "scale fed in place) or 1 (the first form, which older journals replay with)",
        record="never"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.lr >= 0 and math.isfinite(self.lr),
              f"lr must be a finite number >= 0, got {self.lr}")
        check(self.target_scale > 0 and math.isfinite(self.target_scale),
              f"target_scale must be > 0, got {self.target_scale}")
        check(self.hidden_lr is None or (self.hidden_lr >= 0 and math.isfinite(self.hidden_lr)),
              f"hidden_lr must be a finite number >= 0, got {self.hidden_lr}")
        check(self.head_graph in graph_update.VERSIONS,
              f"head_graph must be one of {graph_update.VERSIONS}, got {self.head_graph}")

    def config(self) -> dict[str, Any]:
        out = super().config()
        if self.head_update != "numpy" or self.head_graph != graph_update.VERSION:
            out["head_graph"] = self.head_graph  # which graph replay must build
        return out

    @classmethod
    def from_config(cls, owner: str, config: Any) -> TPSGDOptions:
        if (isinstance(config, dict) and config.get("head_update", "numpy") != "numpy"
                and "head_graph" not in config):
            config = {**config, "head_graph": 1}  # recorded before form 2 existed
        return super().from_config(owner, config)


@register
class TPSGD(Optimizer):
    """tpSGD over the layers a bundle's taps graph exposes.

    Steps need `taps=` (see `_step`) and a `setup(store, layers=...)` first.

    Args:
        **options: `TPSGDOptions` fields (lr, hidden_lr, local_loss, ..., seed: projections).
    """

    name = "tpsgd"
    Options = TPSGDOptions
    needs = "taps"
    replay_hint = ("tpSGD replay re-runs the taps forward and numpy/BLAS matrix products, "
                   "which are bit-exact only on the kind of CPU, runtime and BLAS build that "
                   "trained the run (another CPU rounds differently); else the journal is "
                   "corrupt or the settings, weights or data differ")
    options: TPSGDOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.layers: list[Layer] = []
        self._proj: dict[int, np.ndarray] = {}
        self._drop: list[list[str]] = []  # layer index -> taps last used by that layer
        self._blas: _OneBlasThread | None = None
        # per layer (trainable roles, trainable norm roles), for the store it was made for
        self._plan: tuple[Any, list[tuple[list[str], list[str]]]] = (None, [])
        self._copies: tuple[Any, list[tuple[np.ndarray, str]]] = (None, [])

    def setup(self, store: ParamStore, *, layers: Sequence[Layer] = (),
              targets: np.ndarray | None = None, out_shape: Sequence[int] | None = None,
              **extra: Any) -> None:
        """Attach the bundle's layer records; every trainable parameter must belong to one.

        Args:
            store: the parameters to train.
            layers: the bundle's layer records, head last (`edgelearn.layers.parse_layers`).
            targets: the run's targets y [N, ...], checked against `out_shape` before any step
                (optional; `check_targets`).
            out_shape: the model output's shape without the batch.
        """
        if not layers:
            raise InputError("tpsgd needs a bundle exported with layer taps "
                             "(model_taps.onnx / model_taps.tflite)")
        if not layers[-1].head:
            raise InputError("tpsgd: the last layer record must be the output layer")
        owned = {n for layer in layers for n in layer.param_names()}
        # batch-norm running statistics are read (eval form), never trained: a "*" glob that
        # marks them trainable is harmless
        owned |= {layer.bn[k] for layer in layers if layer.bn
                  for k in ("running_mean", "running_var")}
        stray = sorted(set(store.trainable_names) - owned)
        if stray:
            only = (f"; this bundle's taps cover only its head: --trainable "
                    f"'{','.join(layers[-1].params.values())}'" if len(layers) == 1 else "")
            raise InputError(f"tpsgd cannot train {stray[:8]}{' ...' if len(stray) > 8 else ''}"
                             f" (no layer record owns them); freeze them with --trainable{only}")
        if targets is not None and out_shape is not None:
            self.check_targets(targets, tuple(out_shape))
        self.layers = list(layers)
        self._blas = _OneBlasThread.make()
        self._plan, self._copies = (None, []), (None, [])
        last_use: dict[str, int] = {}
        for i, layer in enumerate(self.layers):
            for tap in (layer.input, layer.preact, layer.output, layer.raw, layer.target):
                if tap is not None:
                    last_use[tap] = i
        self._drop = [[k for k, last in last_use.items() if last == i]
                      for i in range(len(self.layers))]

    def check_targets(self, y: np.ndarray, out_shape: tuple[int, ...]) -> None:
        """Raise InputError unless `y` [N, ...] are targets the head loss can use.

        Args:
            y: batch targets. out_shape: the model output's shape without the batch.
        """
        y = np.asarray(y)
        if self.options.head_loss == "cross-entropy" and not (y.ndim == 1 and y.dtype.kind in "iu"):
            raise InputError(f"tpsgd's cross-entropy head needs integer class labels [N], got "
                             f"{y.dtype} {y.shape}; use head_loss='mse' for target vectors")
        if self.options.head_loss == "mse" and y.shape[1:] != tuple(out_shape) and (
                int(np.prod(y.shape[1:])) != int(np.prod(out_shape))):
            raise InputError(f"tpsgd's mse head needs targets shaped like the output "
                             f"{tuple(out_shape)} per example, got {y.shape[1:]}")

    # -- the step -------------------------------------------------------------------------------
    def _target(self, i: int, y: np.ndarray, classes: int, shape: tuple[int, ...]) -> np.ndarray:
        n, scale = len(y), self.options.target_scale
        cols = int(np.prod(shape[1:]))
        if y.ndim == 1 and y.dtype.kind in "iu":
            b = self._proj.get(i)
            if b is None or b.shape != (classes, cols):
                b = self._proj[i] = projection(self.seed, i, classes, cols, scale)
            return b[y].reshape(shape)  # onehot(y) @ B, without the matmul
        yy = np.asarray(y, np.float32).reshape(n, -1)
        b = self._proj.get(i)
        if b is None or b.shape != (yy.shape[1], cols):
            b = self._proj[i] = projection(self.seed, i, yy.shape[1], cols, scale)
        return (yy @ b).reshape(shape)

    def _local(self, a: np.ndarray, t: np.ndarray) -> tuple[float, np.ndarray]:
        n = a.shape[0]
        # _sum_products64: the same values as sum(d.astype(float64) ** 2) and
        # sum(a.astype(float64) * t), without float64 temporaries the size of a
        if self.options.local_loss == "mse":
            d = a - t
            value = 0.5 * _sum_products64(d, d) / n
            return value, np.divide(d, np.float32(n), out=d)
        if self.options.local_loss == "l1":
            d = a - t
            value = float(np.sum(np.abs(d), dtype=np.float64)) / n
            return value, np.divide(np.sign(d, out=d), np.float32(n), out=d)
        return -_sum_products64(a, t) / n, t / np.float32(-n)

    def step(self, store: ParamStore, evaluate: Callable[[], float] | None = None,
             evaluate_population: Any = None, **extra: Any) -> StepInfo:
        """`Optimizer.step`; when the taps forward ran a form-2 head update graph (it returns
        the updated head weights), the step is that forward and `_graph_step`, without the
        generator dialogue: the same record, weights and forward count as through `_step`
        (which replay runs)."""
        taps = extra.get("taps")
        if (taps is None or self.options.head_update == "numpy" or self.options.head_graph == 1
                or not self.layers or self._gen is not None):
            return super().step(store, evaluate, evaluate_population, **extra)
        arrays, y = taps()
        if graph_update.LOSS not in arrays:  # the numpy update (auto, or a disabled cache)
            return super().step(store, evaluate, evaluate_population,
                                **{**extra, "taps": lambda: (arrays, y)})
        self._evals, self._losses = 1, []
        return self._finish(self._graph_step(store, arrays))

    def _step(self, store: ParamStore, *, taps: TapsEvaluate | None = None,
              **extra: Any) -> Generator[Forward, Any, dict[str, Any]]:
        """One tpSGD step: one taps forward, then each layer's local update, in place.

        Args:
            store: weights (trainable views are updated in place).
            taps: () -> (taps, y): every tap array of one taps-graph forward at the current
                weights (name -> array, including the model input), and the batch targets.
                Replay needs it too: it re-runs the forward on the step's batch.
        """
        if not self.layers:
            raise EdgelearnError("tpsgd is not set up: call setup(store, layers=...) first")
        if taps is None:
            raise InputError("tpsgd updates depend on the data: each step (and its replay) "
                             "runs one taps forward on the step's batch, so it needs taps= "
                             "(replay: the run's data, --data)")
        arrays, y = yield Forward(taps)
        if graph_update.LOSS in arrays:  # the update ran in the graph: no BLAS call here
            if self.options.head_graph != 1:
                return self._graph_step(store, arrays)
            return self._update(store, dict(arrays), y)
        # the local GEMMs are small ([O, N*H*W] x [N*H*W, C*k*k]): BLAS threads cost more than
        # they save (measured 23 ms vs 0.13 ms for a 32x512x144 sgemm on 2 busy cores)
        with self._blas or contextlib.nullcontext():
            return self._update(store, dict(arrays), y)

    def _layer_plan(self, store: ParamStore) -> list[tuple[list[str], list[str]]]:
        """Per layer: its trainable param roles and trainable norm roles in `store` (made once
        per store: a store's trainable set is fixed when it is built)."""
        if self._plan[0] is not store:
            plan = []
            for layer in self.layers:
                norm = layer.bn or layer.ln or {}
                plan.append(([r for r, n in layer.params.items() if store.specs[n].trainable],
                             [k for k in ("weight", "bias")
                              if k in norm and store.specs[norm[k]].trainable]))
            self._plan = (store, plan)
        return self._plan[1]

    def _update(self, store: ParamStore, taps: dict[str, np.ndarray], y: np.ndarray
                ) -> dict[str, Any]:
        head = self.layers[-1]
        logits = taps[head.preact]
        classes = logits.shape[1]
        y = np.asarray(y)
        self.check_targets(y, logits.shape[1:])
        lr, hidden_lr = np.float32(self.options.lr), self.options.hidden_lr
        if not np.isfinite(logits).all():  # reject: no layer is updated
            return {"loss": None, "local": [None] * len(self.layers), "lr": self.options.lr,
                    "accepted": False, "step": self.t}
        if graph_update.LOSS in taps:
            return self._graph_update(store, taps)
        if self.options.head_update == "graph":
            raise InputError("tpsgd head_update='graph': this step's taps forward did not run "
                             "the head update graph (it runs on cached frozen-prefix features "
                             "only: turn the prefix cache on; or the cache was disabled, see "
                             "its report)")
        loss, locals_ = math.nan, []
        for i, (layer, (train, bn_train)) in enumerate(zip(self.layers, self._layer_plan(store),
                                                           strict=True)):
            bn = layer.bn or layer.ln or {}
            if layer.head:
                loss, d_z = head_grad(logits, y, self.options.head_loss)
                locals_.append(loss)
                grads = _head_grads(layer, taps[layer.input], d_z) if train else {}
                bn_grads: dict[str, np.ndarray] = {}
            elif not (train or bn_train):
                locals_.append(None)
                grads, bn_grads = {}, {}
            else:
                grads, bn_grads, value = self._layer_grads(i, layer, taps, y, classes, store)
                locals_.append(value)
            lr_i = lr if layer.head or hidden_lr is None else np.float32(hidden_lr)
            for role in train:
                _sub(store[layer.params[role]], grads[role], lr_i)
            for role in bn_train:
                _sub(store[bn[role]], bn_grads[role], lr_i)
            del grads, bn_grads
            for name in self._drop[i]:
                taps.pop(name, None)  # no activation outlives its layer's update
        finite = math.isfinite(loss) and all(v is None or math.isfinite(v) for v in locals_)
        local = [None if v is None or not math.isfinite(v) else v for v in locals_]
        return {"loss": loss if math.isfinite(loss) else None, "local": local,
                "lr": self.options.lr, "accepted": finite, "step": self.t}

    def _graph_update(self, store: ParamStore, taps: dict[str, np.ndarray]) -> dict[str, Any]:
        """Copy the head weights the taps graph updated (`edgelearn.graph_update`) into the
        arena in place: a head-only run, so no other layer has a trainable weight."""
        head = self.layers[-1]
        for role in self._layer_plan(store)[-1][0]:
            view = store[head.params[role]]
            np.copyto(view, taps[graph_update.output_name(role)].reshape(view.shape))
        loss = float(taps[graph_update.LOSS])
        finite = math.isfinite(loss)
        local = [None] * (len(self.layers) - 1) + [loss if finite else None]
        return {"loss": loss if finite else None, "local": local, "lr": self.options.lr,
                "accepted": finite, "step": self.t}

    def _graph_step(self, store: ParamStore, out: dict[str, np.ndarray]) -> dict[str, Any]:
        """`_update` of a form-2 head update graph's outputs `out` (logits, LOSS, updated
        head parameters; `edgelearn.graph_update`), with the same record and weights.

        Nothing is re-checked per step: the targets were checked when the run started, as
        the graph's outputs were when it was built. A non-finite logit makes LOSS non-finite
        (log P is NaN or -inf there, times a 0 or -1/N one-hot entry), so the logits are
        checked only then: a step with non-finite logits is rejected without an update, one
        whose loss alone overflowed is applied and not accepted, as in `_update`.
        """
        loss = float(out[graph_update.LOSS])
        finite = math.isfinite(loss)
        if not finite and not np.isfinite(out[self.layers[-1].preact]).all():
            return {"loss": None, "local": [None] * len(self.layers), "lr": self.options.lr,
                    "accepted": False, "step": self.t}
        copies = self._copies
        if copies[0] is not store:  # (arena view, graph output) per trainable head param
            head = self.layers[-1]
            copies = self._copies = (store, [
                (store[head.params[r]], graph_update.output_name(r))
                for r in self._layer_plan(store)[-1][0]])
        for view, name in copies[1]:  # the graph's outputs come shaped like the params
            np.copyto(view, out[name])
        local = [None] * (len(self.layers) - 1) + [loss if finite else None]
        return {"loss": loss if finite else None, "local": local, "lr": self.options.lr,
                "accepted": finite, "step": self.t}

    def _layer_grads(self, i: int, layer: Layer, taps: dict[str, np.ndarray], y: np.ndarray,
                     classes: int, store: ParamStore) -> tuple[dict, dict, float]:
        x = taps[layer.input]
        assert layer.output is not None
        a = taps[layer.output]
        if layer.kind == "gru":
            last = a[:, -1]
            value, d_last = self._local(last, self._target(i, y, classes, last.shape))
            p = layer.params
            g = gru_grads(x, a, store[p["weight_ih"]], store[p["weight_hh"]],
                          store[p["bias_ih"]] if "bias_ih" in p else None,
                          store[p["bias_hh"]] if "bias_hh" in p else None, d_last)
            return g, {}, value
        if layer.post and self.options.target_on == "pooled":
            assert layer.target is not None
            at = taps[layer.target]
            value, d_at = self._local(at, self._target(i, y, classes, at.shape))
            d_a = post_backward(layer.post, a, d_at)
        else:
            value, d_a = self._local(a, self._target(i, y, classes, a.shape))
        assert layer.preact is not None
        d_pre = act_grad(layer.activation, taps[layer.preact], a, d_a)
        bn_grads: dict[str, np.ndarray] = {}
        if layer.ln:
            ln = layer.ln
            assert layer.raw is not None
            d_pre, bn_grads = ln_backward(
                taps[layer.raw], ln["eps"], ln["dims"],
                store[ln["weight"]] if "weight" in ln else None, d_pre,
                params=any(k in ln and store.specs[ln[k]].trainable for k in ("weight", "bias")))
        elif layer.bn:
            bn = layer.bn
            affine = any(k in bn and store.specs[bn[k]].trainable for k in ("weight", "bias"))
            assert layer.raw is not None
            # a frozen norm is a fixed per-channel scale: its raw input is not even tapped
            d_pre, bn_grads = bn_backward(
                taps[layer.raw] if affine else None, store[bn["running_mean"]],
                store[bn["running_var"]], bn["eps"],
                store[bn["weight"]] if "weight" in bn else None, d_pre, params=affine)
        if layer.kind == "linear":
            return linear_grads(x, d_pre), bn_grads, value
        w = store[layer.params["weight"]]
        if layer.kind == "conv1d":
            g = conv1d_grads(x, d_pre, w.shape[2], stride=layer.stride[1],
                             padding=layer.padding[1], dilation=layer.dilation[1],
                             groups=layer.groups)
            return g, bn_grads, value
        g = conv2d_grads(x, d_pre, (w.shape[2], w.shape[3]), stride=layer.stride,
                         padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        return g, bn_grads, value


def _head_grads(layer: Layer, x: np.ndarray, d_z: np.ndarray) -> dict[str, np.ndarray]:
    """The output layer's exact gradients; an ONNX MatMul head's weight is [in, out]."""
    g = linear_grads(x, d_z)
    if layer.weight_layout == "in_out":
        g["weight"] = np.ascontiguousarray(g["weight"].T)
    return g


class _OneBlasThread:
    """Context: the BLAS libraries run one thread inside it (threadpoolctl's `limit(limits=1,
    user_api="blas")` without rebuilding its library info on every step).

    Args:
        libs: threadpoolctl's controllers of the loaded BLAS libraries.
        ownership: threadpoolctl's OpenBLAS controlling-thread counter (None in versions
            without one).
    """

    def __init__(self, libs: Sequence[Any], ownership: Any) -> None:
        self.libs, self.ownership = list(libs), ownership
        self.saved: list[tuple[Any, int]] = []

    @classmethod
    def make(cls) -> _OneBlasThread | None:
        """One for the BLAS libraries loaded now; None without threadpoolctl (optional on
        device)."""
        try:
            import threadpoolctl
        except ImportError:
            return None
        libs = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        return cls(libs, getattr(threadpoolctl, "CONTROLLING_THREAD_OWNERSHIP", None))

    def __enter__(self) -> None:
        if self.ownership is not None:  # as threadpoolctl's limiter: released on exit
            self.ownership.increment()
        self.saved = [(lib, n) for lib in self.libs
                      if (n := lib.get_num_threads()) is not None and n != 1]
        for lib, _ in self.saved:
            lib.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        for lib, n in self.saved:
            lib.set_num_threads(n)
        self.saved = []
        if self.ownership is not None:
            self.ownership.decrement()


_SUM_CHUNK = 1 << 16  # float64 elements per product chunk (512 KiB: stays in cache)


def _sum_products64(x: np.ndarray, y: np.ndarray) -> float:
    """float(np.sum(np.multiply(x, y, dtype=float64))) bit for bit, in cache-sized chunks.

    numpy sums a contiguous array pairwise: halves split at n//2 rounded down to a multiple of
    8, down to blocks of 128. Recursing on those same split points and summing each chunk with
    np.sum keeps its exact order, while the float64 products never exist at full size (a conv
    map of batch 256 is 6.4M elements: 51 MB of float64 freshly mapped every step otherwise).
    """
    if not (x.shape == y.shape and x.flags.c_contiguous and y.flags.c_contiguous):
        return float(np.sum(np.multiply(x, y, dtype=np.float64)))
    return float(_pairwise_products(x.reshape(-1), y.reshape(-1)))


def _pairwise_products(x: np.ndarray, y: np.ndarray) -> np.float64:
    n = x.size
    if n <= _SUM_CHUNK:
        return np.sum(np.multiply(x, y, dtype=np.float64))
    h = n // 2
    h -= h % 8
    return _pairwise_products(x[:h], y[:h]) + _pairwise_products(x[h:], y[h:])


def _sub(view: np.ndarray, grad: np.ndarray, lr: np.float32) -> None:
    """view -= lr * grad, in place on the arena (float32); grad is scratch (overwritten)."""
    if grad.dtype == np.float32 and grad.flags.writeable:
        g = np.multiply(grad, lr, out=grad)  # no temporary the size of the layer
    else:
        g = np.multiply(grad, lr, dtype=np.float32)
    np.subtract(view, g.reshape(view.shape), out=view)
