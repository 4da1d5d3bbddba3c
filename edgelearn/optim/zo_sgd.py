"""ZO-SGD with seed replay (MeZO): two forwards per probe, one scalar, an in-place update.

Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes" (MeZO; reference
code princeton-nlp/MeZO `large_models/trainer.py`), after Spall 1992 (SPSA). Variants from
Zhang et al. 2024, "Revisiting Zeroth-Order Optimization for Memory-Efficient LLM Fine-Tuning:
A Benchmark" (ZO-Bench: sign, conservative step) and Qin et al. 2024 (FedKSeed: clip
|L+ - L-|).

For probe k of step t, z_k = z(seed, t, k) (see `edgelearn.rng`):
    L+_k = L(theta + eps z_k),  L-_k = L(theta - eps z_k),  g_k = (L+_k - L-_k) / (2 eps)
    theta <- theta - lr_t / q * sum_k g_k z_k      (then decoupled weight decay on >=2-D params)
z is never stored: it is regenerated chunk by chunk (64 Ki elements) from its seed, so memory
stays that of inference plus a few chunk buffers.

Restore policy (how theta comes back after the +-eps probes):
  * "copy": keep the unperturbed trainable slice; probes are written as copy +- eps z and the
    update as copy - sum c_k z_k. After a step the weights are exactly the update rule applied
    in float32 (no +-eps rounding drift). Costs one extra trainable-sized buffer.
  * "drift": MeZO's in-place +eps, -2eps, +eps. float32 does not restore exactly (about half
    the elements move by an ulp); the drift is reproduced bit-exactly by replay, which performs
    the very same float operations. No extra memory.
  * "auto" (default): "copy" when the trainable slice is at most 16 MiB, else "drift".
In "drift" mode the last probe's restore and the update are fused into one pass
(theta += (eps - c) z), so a 1-probe step costs 3 elementwise passes in either mode.

Batched probes: under "copy" (while the 2q candidate rows take at most 16 MiB) the step asks
its 2q probe points copy +- eps z_k at once, as one `Population` (order +z_0, -z_0, +z_1, ...):
an evaluator with a population graph scores them in one runtime call from `fill` rows, any
other expands it into `place` + one forward each. Both write every probe point with the same
float operations, and the update reads only the copy and the losses, so the weights after a
step are bit-identical either way for the same losses (the journal and replay are unchanged).
Rademacher passes run in `edgelearn.optim.kernels` (one pass for all terms, threaded over
large slices; results do not depend on the thread count).
Option `relative_lr` reads lr as a fraction of each tensor's RMS at the first step (LARS-like,
You et al. 2017): a group rule "*:lr=rms*lr" after the user's. A loss that moves in steps of
one example (error-rate) gives differences |L+ - L-| of 1/batch however small eps is, so a
fixed lr takes the same absolute step on every tensor; on a 1.1M-weight MLP lr 1e-3 took the
held-out accuracy from 0.50 to 0.20, 0.003 x RMS to 0.54 (README "Which optimizer by default").
Parameter groups (option `groups`, edgelearn/optim/groups.py) multiply eps and lr per tensor
where they are applied: the probes are theta +- eps m_eps z, the update
theta - lr m_lr / q sum_k g_k z_k (then the drift restore is not fused with the update).
The journal record of each step holds (step, seeds, projected gradients, lr, eps, losses);
replay re-runs the step with the recorded losses: no data and no forwards.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import InputError
from edgelearn.optim.base import Optimizer, Population, register
from edgelearn.optim.groups import GroupRule, GroupScales, parse_groups
from edgelearn.optim.kernels import (
    SMALL_MAX,
    SignPass,
    draw_signs,
    expand_signs,
    expanded_pass,
    expanded_rows,
    signed_rows,
)
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import (
    check_lr_eps,
    chunk_field,
    pool_size_field,
    scaled_lr,
    schedule_field,
    total_steps_field,
)
from edgelearn.params import ParamStore
from edgelearn.rng import NOISE_KINDS, Noise, noise_chunks

RESTORE_POLICIES = ("auto", "copy", "drift")
AUTO_COPY_MAX_BYTES = 16 << 20
#: copy-policy probes are asked as one Population (K = 2 x probes candidates, scored in one
#: runtime call by a population graph) while K candidate rows take at most this many bytes
POPULATION_MAX_BYTES = 16 << 20

Term = tuple[np.float32, tuple[int, int, int]]


@dataclass(frozen=True)
class ZOSGDOptions(OptimizerOptions):
    """Options of zo-sgd (the update rule is in the module docstring)."""

    lr: float = field(default=1e-3, metadata=meta(
        "learning rate (base value of the schedule)", cli="--lr"))
    eps: float = field(default=1e-3, metadata=meta(
        "perturbation scale (units of the weights)", cli="--eps"))
    probes: int = field(default=1, metadata=meta(
        "perturbation directions per step (q); the update averages them", cli="--probes"))
    noise: str = field(default="rademacher", metadata=meta(
        "rademacher (+-1 from random bits; bit-portable), gaussian or pool (shared noise "
        "table)", cli="--noise", choices=NOISE_KINDS))
    weight_decay: float = field(default=0.0, metadata=meta(
        "decoupled decay on parameters with >= 2 dims (biases and norms skipped)",
        cli="--weight-decay"))
    sign: bool = field(default=False, metadata=meta("use sign(g) (ZO-SignSGD)", cli="--sign"))
    clip: float | None = field(default=None, metadata=meta(
        "clip |L+ - L-| to this value (null: no clipping)", cli="--clip"))
    # recorded only when set, so headers of runs without the guard keep their old form
    reject_above: float | None = field(default=None, metadata=meta(
        "reject the whole step (weights restored, no update) when a probe has |L+ - L-| above "
        "this value; the record says accepted false, rejected reject_above (null: off)",
        cli="--reject-above", record="when-set"))
    conservative: bool = field(default=False, metadata=meta(
        "evaluate the updated weights once more and undo the update if the loss got worse "
        "than the probes' mean (one extra forward)", cli="--conservative"))
    restore: str = field(default="auto", metadata=meta(
        "how weights come back after the probes: copy (probes and update written from a "
        "copy of the trainable weights), drift (moved in place, +eps z then -eps z, no copy; "
        "the float32 drift is replayed bit-exactly) or auto (zo-sgd: copy up to "
        f"{AUTO_COPY_MAX_BYTES >> 20} MiB of trainable weights, drift above, as zo-scale; zo-gn: "
        "copy; the others always work from a copy)",
        cli="--restore", choices=RESTORE_POLICIES))
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field()
    chunk: int = chunk_field()
    pool_size: int = pool_size_field()
    threads: int | None = field(default=None, metadata=meta(
        "threads of the elementwise passes over large slices (null: the usable cores, at most "
        "4; results do not depend on it)", record="never"))
    groups: str | None = field(default=None, metadata=meta(
        "lr / eps per group of tensors, 'PATTERN:lr=X,eps=Y;...' (Y may be rms*C: C times the "
        "tensor's RMS; optim/groups.py); weight decay keeps the base lr", cli="--group",
        record="when-set"))
    relative_lr: bool = field(default=False, metadata=meta(
        "read lr as a fraction of each tensor's RMS at the first step (tensors whose RMS is "
        "0 take lr itself; --group rules that set lr win)", cli="--relative-lr",
        record="when-set"))

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self.threads is None or self.threads >= 1,
              f"threads must be an integer >= 1, got {self.threads!r}")
        check_lr_eps(self.lr, self.eps)
        check(self.probes >= 1, f"probes must be an integer >= 1, got {self.probes!r}")
        check(self.schedule == "constant" or (self.total_steps or 0) > 0,
              f"schedule {self.schedule!r} needs total_steps > 0")
        check(self.clip is None or self.clip > 0, f"clip must be > 0, got {self.clip}")
        check(self.reject_above is None or (self.reject_above > 0
                                            and math.isfinite(self.reject_above)),
              f"reject_above must be a finite number > 0, got {self.reject_above}")
        check(self.chunk >= 8 and self.chunk % 8 == 0,
              f"chunk must be a positive multiple of 8, got {self.chunk!r}")
        check(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
        check(self.pool_size >= 1, f"pool_size must be an integer >= 1, got {self.pool_size}")
        parse_groups(self.groups)  # InputError naming a malformed rule


@register
class ZOSGD(Optimizer):
    """Zeroth-order SGD (MeZO) over the trainable float32 slice of a ParamStore.

    Args:
        **options: `ZOSGDOptions` fields (lr, eps, probes, noise, ..., seed).
    """

    name = "zo-sgd"
    Options = ZOSGDOptions
    supports_lr_scale = True

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        rule = self.rule = self._rule()
        self.noise = Noise(rule.noise, pool_size=rule.pool_size, pool_seed=rule.seed)
        self._n: int | None = None
        self._policy = ""
        self._copy: np.ndarray | None = None
        self._zbuf = np.empty(rule.chunk, np.float32)
        self._abuf = np.empty(rule.chunk, np.float32)
        # Packed Rademacher signs of this step's probes (n/8 bytes each), drawn once per step.
        self._signs: dict[tuple[int, int, int], np.ndarray] = {}
        # small slices: this step's distinct keys and their signs as +-1.0 [d, n], expanded
        # once (the probe rows and the update read the same signs)
        self._expanded: tuple[tuple[tuple[int, int, int], ...], np.ndarray] | None = None
        self._pass = SignPass(threads=rule.threads)
        self._decay_segments: list[tuple[int, int]] = []
        # per-tensor lr / eps multipliers (optim/groups.py); empty: one lr and eps for all
        rules = parse_groups(getattr(rule, "groups", None))
        if getattr(rule, "relative_lr", False):  # after the user's: first rule setting lr wins
            rules = (*rules, GroupRule("*", {"lr": ("rms", rule.lr)}))
        self.groups = GroupScales(rules)

    def _rule(self) -> ZOSGDOptions:
        """The ZO-SGD settings the steps run: zo-sgd's own options (zo-scale maps its own)."""
        assert isinstance(self.options, ZOSGDOptions)
        return self.options

    # -- helpers --------------------------------------------------------------------------------
    def _prepare(self, store: ParamStore) -> np.ndarray:
        """The trainable fp32 slice; sizes buffers and fixes the restore policy on first use."""
        theta = store.flat("float32")
        if theta.size == 0:
            raise InputError("zo-sgd needs trainable float32 parameters; none are selected")
        if self._n is None:
            self._n = theta.size
            self._policy = self._policy_for(theta.size)
            self._decay_segments = [
                (a, b) for name, a, b in store.segments("float32") if store[name].ndim >= 2
            ]
            if self.groups:
                segs = store.segments("float32")
                self.groups.setup(segs, {n: store[n] for n, _, _ in segs},
                                  {"lr": self.rule.lr, "eps": self.rule.eps})
        elif theta.size != self._n:
            raise InputError(f"store has {theta.size} trainable elements, this optimizer "
                             f"was set up for {self._n}")
        return theta

    def memory_bytes(self, store: ParamStore) -> int:
        """Restore copy (copy policy) + packed signs of every probe + chunk buffers (two, and
        the sign kernel's per thread)."""
        n = store.n_trainable("float32")
        policy = self._policy_for(n)
        signs = self.rule.probes * (-(-n // 64) * 8) if self.rule.noise == "rademacher" else 0
        pool = 4 * self.rule.pool_size if self.rule.noise == "pool" else 0
        passes = self._pass.buffer_bytes(n) if self.rule.noise == "rademacher" else 0
        return (4 * n if policy == "copy" else 0) + signs + pool + 8 * self.rule.chunk + passes

    def population_size(self, store: ParamStore) -> int:
        """2q probe points under the copy policy while their rows fit, else 1 (`_probe_losses`)."""
        n, q = store.n_trainable("float32"), self.rule.probes
        copy = self._policy_for(n) == "copy"
        return 2 * q if copy and 2 * q * 4 * n <= POPULATION_MAX_BYTES else 1

    def _policy_for(self, n: int) -> str:
        """The restore policy on a trainable slice of n float32 ("auto" resolved)."""
        if self.rule.restore != "auto":
            return self.rule.restore
        return "copy" if 4 * n <= AUTO_COPY_MAX_BYTES else "drift"

    @property
    def policy(self) -> str:
        """The restore policy in effect ("copy" or "drift"; "" before the first step)."""
        return self._policy

    def lr_at(self, t: int) -> float:
        """Learning rate of step t under the schedule, times `lr_scale` (divergence rollback)."""
        return scaled_lr(self.rule, t, self.lr_scale)

    def state_dict(self) -> dict[str, Any]:
        """Counters, plus the resolved group multipliers when groups are set."""
        return {**super().state_dict(), **self.groups.state()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output (group multipliers included)."""
        super().load_state_dict(state)
        self.groups.load(state)

    def _combine(self, dst: np.ndarray, src: np.ndarray, terms: Sequence[Term],
                 group: str | None = None) -> None:
        """dst = src + sum_k coef_k * z_k, chunk by chunk (same float ops for any chunking);
        `group` ("lr" / "eps"): times each tensor's group multiplier of that key."""
        if self.rule.noise == "rademacher":
            self._combine_signs(dst, src, terms, group)
            return
        z, acc = self._zbuf, self._abuf
        for a, b in noise_chunks(dst.size, self.rule.chunk):
            m = b - a
            zc, ac = z[:m], acc[:m]
            for i, (coef, (seed, step, probe)) in enumerate(terms):
                self.noise.fill(zc, run_seed=seed, step=step, probe=probe, start=a)
                if i == 0:
                    np.multiply(zc, coef, out=ac)
                else:
                    np.multiply(zc, coef, out=zc)
                    np.add(ac, zc, out=ac)
            if group:
                self.groups.apply(group, ac, a, b)
            np.add(src[a:b], ac, out=dst[a:b])

    def _combine_signs(self, dst: np.ndarray, src: np.ndarray, terms: Sequence[Term],
                       group: str | None = None) -> None:
        """Rademacher fast path of `_combine`: the same values, from signs drawn once per step.

        coef * z is gathered from a table indexed by the packed sign bytes (exactly +-coef),
        in one pass for all terms, on a thread pool for large slices (`optim.kernels`).
        """
        if group and self.groups.sets(group):
            self._combine_signs_grouped(dst, src, terms, group)
            return
        if dst.size <= SMALL_MAX:
            z, which = self._expanded_signs([key for _, key in terms], dst.size)
            expanded_pass(dst, src, [coef for coef, _ in terms], z, which)
            return
        self._pass.run(dst, src, [coef for coef, _ in terms], [self._packed(key, dst.size)
                                                               for _, key in terms])

    def _combine_signs_grouped(self, dst: np.ndarray, src: np.ndarray, terms: Sequence[Term],
                               group: str) -> None:
        """`_combine_signs` with per-tensor group multipliers, applied to each chunk's sum of
        terms before it is added to src (the sign kernel's `post`; threaded on large
        slices, the same bits for any thread count)."""
        self._pass.run(dst, src, [coef for coef, _ in terms],
                       [self._packed(key, dst.size) for _, key in terms],
                       post=functools.partial(self.groups.apply, group))

    def _rows_by_signs(self) -> bool:
        """Whether probe rows may be written straight from packed signs (no per-element
        multipliers between the noise and the weights)."""
        return self.rule.noise == "rademacher" and not self.groups.sets("eps")

    def _packed(self, key: tuple[int, int, int], n: int) -> np.ndarray:
        """Packed signs of z(key) over n elements, drawn once per step."""
        signs = self._signs.get(key)
        if signs is None:
            signs = self._signs[key] = draw_signs(*key, n, threads=self._pass.threads)
        return signs

    def _expanded_signs(self, keys: Sequence[tuple[int, int, int]], n: int
                        ) -> tuple[np.ndarray, list[int]]:
        """Signs of `keys` as +-1.0 float32 [d, n] (one row per distinct key; kept for the
        step) and the row of each key: small slices expand their signs once a step."""
        distinct = tuple(dict.fromkeys(keys))
        if self._expanded is None or self._expanded[0] != distinct:
            self._expanded = (distinct, expand_signs([self._packed(k, n) for k in distinct], n))
        return self._expanded[1], [distinct.index(key) for key in keys]

    def _probes(self, theta: np.ndarray, src: np.ndarray, seeds: Sequence[tuple[int, int, int]],
                e32: np.float32) -> Population:
        """The 2q probe points src +- eps z_k as one Population (order +1, -1 per probe):
        `place` writes one into theta, `fill` writes rows with the same float operations."""
        cands: list[Term] = [(sign, key) for key in seeds for sign in (e32, -e32)]
        coefs = [c for c, _ in cands]
        by_signs = self._rows_by_signs()

        def place(j: int) -> None:
            self._combine(theta, src, [cands[j]], "eps")

        def fill(out: dict[str, np.ndarray], lo: int, hi: int) -> None:
            rows = out["float32"]
            if by_signs and src.size <= SMALL_MAX:
                z, which = self._expanded_signs([key for _, key in cands[lo:hi]], src.size)
                expanded_rows(rows, src, coefs[lo:hi], z, which)
                return
            if by_signs:
                n = src.size
                signed_rows(rows, src, coefs[lo:hi], [self._packed(key, n)
                                                      for _, key in cands[lo:hi]])
                return
            for j in range(lo, hi):
                self._combine(rows[j - lo, : src.size], src, [cands[j]], "eps")

        return Population(len(cands), place, fill)

    def _decay(self, theta: np.ndarray, lr: float, *, undo: bool = False) -> None:
        if self.rule.weight_decay == 0.0 or lr == 0.0:
            return
        f = np.float32(1.0 - lr * self.rule.weight_decay)
        op = np.divide if undo else np.multiply
        for a, b in self._decay_segments:
            op(theta[a:b], f, out=theta[a:b])

    # -- the step -------------------------------------------------------------------------------
    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        theta = self._prepare(store)
        t, eps = self.t, self.rule.eps
        e32 = np.float32(eps)
        self._signs.clear()
        self._expanded = None
        copy = None
        if self._policy == "copy":
            if self._copy is None:
                self._copy = np.empty_like(theta)
            copy = self._copy
            copy[...] = theta
        seeds = [(self.seed, t, k) for k in range(self.rule.probes)]
        losses = yield from self._probe_losses(theta, copy, seeds, eps)
        record, gs = self._record(losses, seeds, self.lr_at(t), eps)
        if not record["accepted"]:  # reject: weights back to the pre-step values, no update
            if copy is not None:
                np.copyto(theta, copy)
            elif not self.groups:  # with groups the last restore already ran
                self._combine(theta, theta, [(e32, seeds[-1])])
            return record
        lr, q = record["lr"], len(seeds)
        terms: list[Term] = [(np.float32(-(lr * g / q)), key) for g, key in zip(gs, seeds,
                                                                               strict=True)]
        if copy is None and not self.groups:  # theta = theta_last_minus + eps z_last - sum_k
            terms[-1] = (np.float32(eps - lr * gs[-1] / q), seeds[-1])  # c_k z_k, one pass
        self._combine(theta, theta if copy is None else copy, terms, "lr")
        self._decay(theta, lr)
        if self.rule.conservative:
            l_new = yield
            l_ref = sum(a + b for a, b in losses) / (2 * q)
            if not (math.isfinite(l_new) and l_new <= l_ref):
                record["undone"] = True
                self._undo(theta, copy, gs, seeds, lr)
        return record

    def _probe_losses(self, theta: np.ndarray, copy: np.ndarray | None,
                      seeds: list[tuple[int, int, int]], eps: float
                      ) -> Generator[Any, Any, list[tuple[float, float]]]:
        """(L+, L-) of every probe: one Population under "copy" (while its rows fit), else
        probe by probe (under "drift" theta is left at the last probe's minus point, or
        restored when it is not the last, or when groups are set)."""
        e32 = np.float32(eps)
        if copy is not None and 2 * len(seeds) * theta.nbytes <= POPULATION_MAX_BYTES:
            flat = yield self._probes(theta, copy, seeds, e32)  # one runtime call if possible
            return list(zip(flat[0::2], flat[1::2], strict=True))
        losses = []
        for k, key in enumerate(seeds):
            if copy is not None:
                self._combine(theta, copy, [(e32, key)], "eps")
                lp = yield
                self._combine(theta, copy, [(-e32, key)], "eps")
                lm = yield
            else:
                self._combine(theta, theta, [(e32, key)], "eps")
                lp = yield
                self._combine(theta, theta, [(np.float32(-2.0 * eps), key)], "eps")
                lm = yield
                # the last probe's restore is fused with the update (not across groups,
                # whose eps and lr multipliers differ)
                if k < len(seeds) - 1 or self.groups:
                    self._combine(theta, theta, [(e32, key)], "eps")
            losses.append((lp, lm))
        return losses

    def _record(self, losses: list[tuple[float, float]], seeds: list[tuple[int, int, int]],
                lr: float, eps: float) -> tuple[dict[str, Any], list[float]]:
        """The step's journal record and projected gradients g_k (0 when a loss is not
        finite); "accepted" is False when the step is rejected (non-finite, reject_above)."""
        rule = self.rule
        finite = all(math.isfinite(v) for pair in losses for v in pair)
        over = finite and rule.reject_above is not None and any(
            abs(lp - lm) > rule.reject_above for lp, lm in losses)
        gs: list[float] = []
        for lp, lm in losses:
            d = lp - lm if finite else 0.0
            if rule.clip is not None:
                d = min(max(d, -rule.clip), rule.clip)
            g = d / (2.0 * eps)
            gs.append(float(np.sign(g)) if rule.sign else g)
        record: dict[str, Any] = {"seeds": [list(s) for s in seeds], "g": gs, "lr": lr,
                                  "eps": eps, "accepted": finite, "undone": False}
        if over:
            record["accepted"] = False
            record["rejected"] = "reject_above"
        return record, gs

    def _undo(self, theta: np.ndarray, copy: np.ndarray | None, gs: list[float],
              seeds: list[tuple[int, int, int]], lr: float) -> None:
        """Take back an update (conservative check): the copy, or the update reversed."""
        if copy is not None:
            np.copyto(theta, copy)
            return
        q = len(seeds)  # approximate in float32; replay repeats the same operations
        self._decay(theta, lr, undo=True)
        self._combine(theta, theta, [(np.float32(lr * g / q), key)
                                     for g, key in zip(gs, seeds, strict=True)], "lr")
