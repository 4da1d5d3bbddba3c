"""Hybrid: exact layer-local updates where the bundle has taps, ZO-SGD for the rest.

After ElasticZO (Sugiura & Matsutani 2025, "ElasticZO: A Memory-Efficient On-Device Learning
with Combined Zeroth- and First-Order Optimization", arXiv:2501.04287): the last layers get
exact gradients, the rest a zeroth-order estimate from the same step. Here the exact part is
tpSGD's rule (edgelearn/optim/tpsgd.py: the true-loss gradient of the head, and the local
target-projection update of every other layer it supports) and the ZO part is MeZO / SPSA
with seed replay (edgelearn/optim/zo_sgd.py) over every trainable tensor tpSGD does not
update: tensors no layer record owns (norms, embeddings, exotic layers) and layers left out of
the `exact` globs.

One step on batch (x, y), probe k = 0..q-1, z_k = z(seed, t, k) over the ZO tensors only:
  1. ZO tensors <- copy + eps m_eps z_k; ONE taps forward -> logits -> L+_k (the head loss).
  2. ZO tensors <- copy - eps m_eps z_k; ONE taps forward -> L-_k.
     (the loss comes from the taps forward's logits: no separate loss forward)
  3. After the last probe, tpSGD's update of the exact tensors from that forward's taps.
     The exact tensors are never perturbed; the ZO ones sit at theta - eps z, an O(eps)
     offset (ElasticZO, too, takes the first-order gradient at perturbed ZO weights).
  4. ZO tensors <- copy - zo_lr m_lr / q sum_k g_k z_k, g_k = (L+_k - L-_k) / (2 eps).
So a step costs 2q forwards (q = 1: the cost of a ZO-SGD step) and updates every trainable
tensor. m_eps / m_lr are per-tensor multipliers of parameter groups (option `groups`,
edgelearn/optim/groups.py). Without ZO tensors a step is tpSGD's (one forward); without exact
tensors it is ZO-SGD on taps forwards. The copy restore keeps the ZO tensors exact.

Option `exact_each` (the exact tensors must be the head's): step 3 runs after EVERY taps
forward, not only the last, so the head takes 2q exact steps per step, as many as tpSGD on the
head alone gets from the same forwards. A head update between the probes would leak into
L-_k, so every L+-_k is rescored from the forward's head-input tap h with the step's starting
head: L = loss(h W0^T + b0) (the head is linear; h does not depend on the head's weights).
The record's "exact" is then the list of the 2q tpSGD records.

Journal: one record per step holds the ZO seeds, projected gradients and losses and, under
"exact", tpSGD's record (head loss and every local loss, exact floats). As for tpSGD the
update depends on the data, so replay re-runs the step's forwards on its batch
(`replay(store, record, taps=...)`) and checks that the regenerated record equals the stored
one, bit for bit.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.layers import Layer
from edgelearn.optim.base import Forward, Optimizer, register
from edgelearn.optim.groups import GroupScales, parse_groups
from edgelearn.optim.options import check, meta
from edgelearn.optim.tpsgd import TPSGD, TapsEvaluate, TPSGDOptions, head_grad
from edgelearn.params import ParamSpec, ParamStore
from edgelearn.rng import DEFAULT_CHUNK, NOISE_KINDS, Noise, noise_chunks

#: a ZO tensor's place: (name, start in the trainable slice, stop, start in the ZO copy)
Segment = tuple[str, int, int, int]


@dataclass(frozen=True)
class HybridOptions(TPSGDOptions):
    """Options of hybrid: tpSGD's (for the exact layers) plus the ZO part's."""

    zo_lr: float = field(default=1e-3, metadata=meta(
        "learning rate of the ZO-updated tensors", cli="--zo-lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "perturbation scale of the ZO-updated tensors (units of the weights)", cli="--eps"))
    probes: int = field(default=1, metadata=meta(
        "ZO directions per step (2 taps forwards each)"))
    noise: str = field(default="rademacher", metadata=meta(
        "ZO noise: rademacher, gaussian or pool", cli="--noise", choices=NOISE_KINDS))
    exact: str = field(default="*", metadata=meta(
        "comma-separated globs of the tensors updated exactly (among those a layer record "
        "owns); every other trainable tensor is updated by ZO", cli="--exact"))
    groups: str | None = field(default=None, metadata=meta(
        "lr / eps per group of ZO tensors, 'PATTERN:lr=X,eps=Y;...' (optim/groups.py)",
        cli="--group"))
    pool_size: int = field(default=1 << 22, metadata=meta("shared-table size for noise=pool"))
    exact_each: bool = field(default=False, metadata=meta(
        "apply the exact update after every taps forward (2 x probes per step), not only "
        "after the last; the exact tensors must be the (linear) head's", cli="--exact-each"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.zo_lr >= 0 and math.isfinite(self.zo_lr),
              f"zo_lr must be a finite number >= 0, got {self.zo_lr}")
        check(self.eps > 0 and math.isfinite(self.eps),
              f"eps must be a finite number > 0, got {self.eps}")
        check(self.probes >= 1, f"probes must be an integer >= 1, got {self.probes!r}")
        check(self.pool_size >= 1, f"pool_size must be an integer >= 1, got {self.pool_size}")
        parse_groups(self.groups)


class _ExactView:
    """The store as tpSGD's exact part sees it: same arrays, only the exact tensors trainable.

    Args:
        store: the run's parameters. exact: names tpSGD updates.
    """

    def __init__(self, store: ParamStore, exact: set[str]) -> None:
        self._store = store
        self.specs: dict[str, ParamSpec] = {
            n: dataclasses.replace(s, trainable=n in exact) for n, s in store.specs.items()}

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, s in self.specs.items() if s.trainable]

    def __getitem__(self, name: str) -> np.ndarray:
        return self._store[name]


def split_trainable(store: ParamStore, layers: Sequence[Layer], exact: str
                    ) -> tuple[set[str], list[str]]:
    """(exact tensors, ZO tensors) of the store's trainable set.

    Args:
        layers: the bundle's layer records. exact: comma-separated globs.
    """
    owned = {n for layer in layers for n in layer.param_names()}
    stats = {layer.bn[k] for layer in layers if layer.bn
             for k in ("running_mean", "running_var")}  # read, never trained (as tpSGD)
    globs = [g.strip() for g in exact.split(",") if g.strip()]
    chosen = {n for n in owned if any(fnmatch.fnmatchcase(n, g) for g in globs)}
    train = store.trainable_names
    exact_set = {n for n in train if n in chosen}
    zo = [n for n in train if n not in exact_set and n not in stats
          and store.specs[n].dtype == "float32"]
    return exact_set, zo


@register
class Hybrid(Optimizer):
    """tpSGD on the layers it reaches, ZO-SGD on the rest, in one step (module docstring).

    Steps need `taps=` and a `setup(store, layers=...)` first.

    Args:
        **options: `HybridOptions` fields.
    """

    name = "hybrid"
    Options = HybridOptions
    needs = "taps"
    replay_hint = TPSGD.replay_hint
    options: HybridOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        o = self.options
        tp = {f.name for f in dataclasses.fields(TPSGDOptions)}
        self.exact = TPSGD(**{k: v for k, v in o.as_kwargs().items() if k in tp})
        self.noise = Noise(o.noise, pool_size=o.pool_size, pool_seed=o.seed)
        self.groups = GroupScales(parse_groups(o.groups))
        self.layers: list[Layer] = []
        self.exact_names: set[str] = set()
        self.segments: list[Segment] = []
        self._view: _ExactView | None = None
        self._copy = np.empty(0, np.float32)
        self._head0: dict[str, np.ndarray] = {}  # exact_each: the step's starting head
        self._z = np.empty(DEFAULT_CHUNK, np.float32)
        self._w = np.empty(DEFAULT_CHUNK, np.float32)

    def setup(self, store: ParamStore, *, layers: Sequence[Layer] = (),
              targets: np.ndarray | None = None, out_shape: Sequence[int] | None = None,
              **extra: Any) -> None:
        """Split the trainable set into exact and ZO tensors and set up the exact part.

        Args:
            store: the parameters to train.
            layers: the bundle's layer records, head last (the taps graph's).
            targets / out_shape: as for tpSGD (checked before any step).
        """
        if not layers or not layers[-1].head:
            raise InputError("hybrid needs a bundle exported with layer taps "
                             "(model_taps.onnx / model_taps.tflite), head last")
        self.layers = list(layers)
        self.exact_names, zo = split_trainable(store, layers, self.options.exact)
        if not self.exact_names and not zo:
            raise InputError("hybrid needs trainable float32 parameters; none are selected")
        self._view = _ExactView(store, self.exact_names)
        if self.exact_names:
            self.exact.setup(self._view, layers=layers)  # type: ignore[arg-type]
        head = self.layers[-1]
        if self.options.exact_each and (head.kind != "linear" or not self.exact_names
                                        or not self.exact_names <= set(head.param_names())):
            raise InputError("hybrid exact_each needs the exact tensors to be the linear "
                             f"head's ({', '.join(head.param_names())}); got "
                             f"{', '.join(sorted(self.exact_names)) or 'none'}")
        if targets is not None and out_shape is not None:
            self.check_targets(targets, tuple(out_shape))
        where = {n: (a, b) for n, a, b in store.segments("float32")}
        pos, self.segments = 0, []
        for n in zo:
            a, b = where[n]
            self.segments.append((n, a, b, pos))
            pos += b - a
        self._copy = np.empty(pos, np.float32)
        if self.groups:
            self.groups.setup([(n, a, b) for n, a, b, _ in self.segments],
                              {n: store[n] for n in zo},
                              {"lr": self.options.zo_lr, "eps": self.options.eps})

    def check_targets(self, y: np.ndarray, out_shape: tuple[int, ...]) -> None:
        """As tpSGD's: the head loss must be able to use targets `y`."""
        self.exact.check_targets(y, out_shape)

    def memory_bytes(self, store: ParamStore) -> int:
        """The ZO tensors' restore copy and a noise chunk."""
        return 4 * sum(b - a for _, a, b, _ in self.segments) + 8 * DEFAULT_CHUNK

    def state_dict(self) -> dict[str, Any]:
        """Counters, plus the resolved group multipliers when groups are set."""
        return {**super().state_dict(), **self.groups.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (group multipliers included)."""
        super().load_state_dict(state)
        self.groups.load(state)

    # -- the ZO part ------------------------------------------------------------------------
    def _place(self, theta: np.ndarray, coefs: Mapping[str, Sequence[tuple[float, int]]]
               ) -> None:
        """ZO tensor <- copy + sum_k coef_k z_k (coefs: name -> (coef, probe) pairs, the same
        probes for every tensor). z is indexed over the ZO tensors only (exact tensors shift
        no noise) and drawn once per chunk of that space and probe, whatever the tensors."""
        seed, t, n = self.seed, self.t, self._copy.size
        probes = [k for _, k in coefs[self.segments[0][0]]]
        for lo, hi in noise_chunks(n, DEFAULT_CHUNK):
            segs = [s for s in self.segments if s[3] < hi and s[3] + s[2] - s[1] > lo]
            for _, a, b, c in segs:  # start from the pre-step values
                x, y = max(lo, c), min(hi, c + b - a)
                np.copyto(theta[a + x - c:a + y - c], self._copy[x:y])
            for i, k in enumerate(probes):
                z = self.noise.fill(self._z[:hi - lo], run_seed=seed, step=t, probe=k,
                                    start=lo)
                for name, a, b, c in segs:
                    x, y = max(lo, c), min(hi, c + b - a)
                    term = np.multiply(z[x - lo:y - lo], np.float32(coefs[name][i][0]),
                                       out=self._w[:y - x])
                    np.add(theta[a + x - c:a + y - c], term, out=theta[a + x - c:a + y - c])

    def _probe_coefs(self, k: int, sign: float) -> dict[str, list[tuple[float, int]]]:
        eps = self.options.eps
        return {n: [(sign * eps * self.groups.multiplier(n, "eps"), k)]
                for n, _, _, _ in self.segments}

    def _update_coefs(self, gs: Sequence[float]) -> dict[str, list[tuple[float, int]]]:
        lr, q = self.options.zo_lr, len(gs)
        return {n: [(-(lr * self.groups.multiplier(n, "lr") * g / q), k)
                    for k, g in enumerate(gs)] for n, _, _, _ in self.segments}

    def _loss(self, arrays: Mapping[str, np.ndarray], y: np.ndarray) -> float:
        """The head loss of one taps forward (its logits; exact_each: the logits of the step's
        starting head on the forward's head input)."""
        head = self.layers[-1]
        logits = arrays[head.preact]
        if self._head0:
            h = arrays[head.input]
            w = self._head0["weight"]
            logits = h @ (w if head.weight_layout == "in_out" else w.T)
            if "bias" in self._head0:
                logits = logits + self._head0["bias"]
        with np.errstate(all="ignore"):
            return head_grad(logits, np.asarray(y), self.options.head_loss)[0]

    def _exact_step(self, arrays: Any, y: np.ndarray) -> dict[str, Any]:
        """tpSGD's update of the exact tensors from one forward's taps; its record."""
        self.exact.t = self.t
        info = self.exact.step(self._view, taps=lambda: (arrays, y))  # type: ignore[arg-type]
        return {k: v for k, v in info.record.items() if k != "step"}

    # -- the step ---------------------------------------------------------------------------
    def _step(self, store: ParamStore, *, taps: TapsEvaluate | None = None,
              **extra: Any) -> Generator[Forward, Any, dict[str, Any]]:
        """One hybrid step (module docstring); `taps` as tpSGD's (replay needs it too)."""
        if self._view is None:
            raise EdgelearnError("hybrid is not set up: call setup(store, layers=...) first")
        if taps is None:
            raise InputError("hybrid updates depend on the data: each step (and its replay) "
                             "runs taps forwards on the step's batch, so it needs taps= "
                             "(replay: the run's data, --data)")
        theta = store.flat("float32")
        for _, a, b, c in self.segments:
            self._copy[c:c + b - a] = theta[a:b]
        q = self.options.probes if self.segments else 0
        each = self.options.exact_each and q > 0
        head = self.layers[-1]
        self._head0 = {r: store[n].copy() for r, n in head.params.items()} if each else {}
        losses: list[list[float | None]] = []
        exact: list[dict[str, Any]] = []
        arrays: Any = None
        for k in range(q):
            pair = []
            for sign in (1.0, -1.0):
                self._place(theta, self._probe_coefs(k, sign))
                arrays, y = yield Forward(taps)
                pair.append(self._loss(arrays, y))
                if each:
                    exact.append(self._exact_step(arrays, y))
            losses.append(pair)
        if arrays is None:  # no ZO tensors: tpSGD's single forward
            arrays, y = yield Forward(taps)
        record: dict[str, Any] = {}
        if each:
            record["exact"] = exact
        elif self.exact_names:
            record["exact"] = self._exact_step(arrays, y)
        record.update(self._zo_update(theta, losses,
                                      all(r["accepted"] for r in exact) if each else None))
        return record

    def _zo_update(self, theta: np.ndarray, losses: list[list[float]],
                   each_ok: bool | None = None) -> dict[str, Any]:
        """Apply the ZO update (or restore on a non-finite loss); the record's ZO part.
        each_ok: (exact_each) whether every exact update of the step was accepted."""
        exact = self.exact.last_info if self.exact_names else None
        exact_ok = (exact is None or exact.accepted) if each_ok is None else each_ok
        if not self.segments:
            return {"loss": None if exact is None else exact.record["loss"],
                    "accepted": exact_ok}
        finite = all(math.isfinite(v) for pair in losses for v in pair)
        eps = self.options.eps
        gs = [(lp - lm) / (2.0 * eps) if finite else 0.0 for lp, lm in losses]
        if finite:
            self._place(theta, self._update_coefs(gs))
        else:  # reject: ZO tensors back to their pre-step values
            self._place(theta, {n: [] for n, _, _, _ in self.segments})  # copy back
        flat = [v for pair in losses for v in pair]
        return {"seeds": [[self.seed, self.t, k] for k in range(len(losses))], "g": gs,
                "zo": [[v if math.isfinite(v) else None for v in p] for p in losses],
                "loss": sum(flat) / len(flat) if finite else None,
                "accepted": finite and exact_ok}
