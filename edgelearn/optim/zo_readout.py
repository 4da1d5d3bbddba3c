"""zo-readout: the gradient of a linear output layer, read from the model outputs of K probes.

A ZO probe keeps one number of each forward (the loss); zo-gn (`edgelearn.optim.zo_gn`)
keeps the outputs but reads them along its K probe directions only. On a linear output layer
the outputs say more: the logits are z_b = W h_b + b for example b's head input h_b [D]
(unknown without taps), so a probe that moves W [C, D] by eps U_k (a dense Rademacher matrix,
every weight moved) and b by eps beta_k moves example b's logits by exactly

    Delta_kb = (z_b(theta + eps z_k) - z_b(theta)) / eps = U_k h_b + beta_k,

C numbers about h_b per probe (ten for ten classes) where a loss gives one. The K probes
stacked, R = [U_0; ...; U_{K-1}] [KC, D], give S_b = R h_b, hence the least-squares (minimum
norm) reading of the head input h^_b = R^T (R R^T)^+ S_b: h_b itself when KC >= D, else its
projection on the KC probed input directions. With the loss's gradient over the unperturbed
outputs e_b = dl/dz_b (softmax - one-hot for cross-entropy, over the batch), the step is the
head's gradient in those directions (the exact head rule dl/dW = sum_b e_b h_b^T, as tpSGD's
output layer computes it from a tap):

    M = E^T S (R R^T)^+   [C, KC]           W' = W - lr_t M R,   b' = b - lr_t sum_b e_b

Since R h_b = S_b is read exactly, the step's change of example b's logits is known before it
is taken, -lr_t (M S_b + sum e): a trust region (`trust`, as zo-gn's; Conn, Gould & Toint
2000) scales M and the bias gradient down so that its RMS over the batch is at most `trust`
logits. Fed one sample a step, the plain step overfits each sample (benchmarks/bench_live.py:
0.64 held-out accuracy after 400 samples against 0.76 with trust 1).

A step costs K + 1 forwards, one `Population` request (one runtime call with a population
graph). Per forward it learns C directions of the gradient of W where a loss-reading probe
learns one (zo-sgd) and zo-gn's K dense directions learn K per step; on the demo head (C 10,
D 64) two probes read 20 of 64 input directions, and seven read h_b exactly.

Tramer et al. 2016, "Stealing Machine Learning Models via Prediction APIs" (USENIX Security;
equation solving on a model's outputs), and Carlini et al. 2024, "Stealing Part of a
Production Language Model" (ICML; logits are a linear map of the last hidden state, recovered
from the outputs by linear algebra) read a model's linear layers through its outputs; here
the weights are known and perturbed, and the hidden inputs are what the outputs reveal.
Malladi et al. 2023, "Fine-Tuning Language Models with Just Forward Passes" (MeZO): the
probes z(seed, t, k) are regenerated from their seed (`edgelearn.rng`), never stored.

Scope: the trainable float32 set is the bundle's linear head (its "layers" record with head
true, activation none, no norm and no ops after it, whose preact is the model output), weight
and optionally bias; cross-entropy on logits or mse. Other trainable tensors are refused
(zo-gn and hybrid train them).

The journal record holds the seeds, lr, eps, the loss and M (trust scaling included; base64
float32); replay
regenerates R from the seeds and applies M with the same float operations as training (no
data, no forwards), bit-exact: W' = W - float32(lr_t G), G = M R in float64. M is rounded to
multiples of 2^-22 of its largest power of two (24 significant bits, so float32 holds it
exactly; what it drops is below 2^-23 of the largest entry's share of the step), which makes
every partial sum of M R exact in float64: a BLAS product gives the same G in any summation
order, on any CPU.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from edgelearn.errors import EdgelearnError, InputError
from edgelearn.layers import Layer
from edgelearn.losses import cross_entropy, mse
from edgelearn.optim.base import Forward, Optimizer, register
from edgelearn.optim.kernels import expand_signs
from edgelearn.optim.options import OptimizerOptions, check, meta
from edgelearn.optim.zo_fields import (
    check_lr_eps,
    check_trust,
    scaled_lr,
    schedule_field,
    total_steps_field,
    trust_field,
)
from edgelearn.optim.zo_gn import loss_derivatives
from edgelearn.optim.zo_probe import ProbeArena, decode_array, encode_array
from edgelearn.params import ParamStore
from edgelearn.rng import DEFAULT_CHUNK, Noise

#: the losses whose output gradient the step takes (logits are linear in the head's weights)
OBJECTIVES = ("cross-entropy", "mse")


@dataclass(frozen=True)
class ZOReadoutOptions(OptimizerOptions):
    """Options of zo-readout (the update rule is in the module docstring)."""

    lr: float = field(default=0.3, metadata=meta(
        "step size on the head's read gradient", cli="--lr"))
    eps: float = field(default=1e-2, metadata=meta(
        "probe size (units of the weights); the logits are linear in the head's weights, so "
        "it sets only the float32 rounding of the read", cli="--eps"))
    probes: int = field(default=2, metadata=meta(
        "probes K per step, each reads classes-many input directions; a step costs K + 1 "
        "forwards", cli="--probes"))
    trust: float | None = trust_field()
    schedule: str = schedule_field()
    total_steps: int | None = total_steps_field()

    def __post_init__(self) -> None:
        super().__post_init__()
        check_lr_eps(self.lr, self.eps)
        check(self.probes >= 1, f"probes must be an integer >= 1, got {self.probes!r}")
        check_trust(self.trust)
        check(self.schedule == "constant" or (self.total_steps or 0) > 0,
              f"schedule {self.schedule!r} needs total_steps > 0")


@dataclass(frozen=True)
class HeadSlice:
    """Where the linear head lies in the trainable float32 slice.

    Args:
        weight: (start, end) of W in the slice; shape: W's (classes, inputs) as the logits
            use it; transposed: W is stored [inputs, classes] (an ONNX MatMul's layout).
        bias: (start, end) of b, or None when b is frozen or absent.
    """

    weight: tuple[int, int]
    shape: tuple[int, int]
    transposed: bool
    bias: tuple[int, int] | None


def readable_head(layers: Sequence[Layer], output: str | None = None) -> Layer | str:
    """The linear head whose logits zo-readout reads, or why there is none.

    Args:
        layers: the bundle's layer records. output: the model's output name (checked against
            the head's preact when given).
    """
    heads = [lr for lr in layers if lr.head and lr.kind == "linear"]
    if not heads:
        return "needs the bundle's linear head (a 'layers' record with head true, or one " \
               "found in model.onnx); this bundle has none"
    head = heads[0]
    if head.activation != "none" or head.bn or head.ln or head.post or (
            output is not None and head.preact != output):
        return (f"reads logits made by the head {head.name!r} alone; its output goes "
                "through an activation, norm or other op")
    return head


def readout_head(store: ParamStore, layers: Sequence[Layer], output: str | None = None
                 ) -> HeadSlice:
    """The head's place in `store`'s trainable float32 slice; InputError saying why not.

    Args:
        layers: the bundle's layer records. output: the model's output name (checked against
            the head's preact when given).
    """
    head = readable_head(layers, output)
    if isinstance(head, str):
        raise InputError(f"zo-readout {head}: use zo-gn")
    w, b = head.params.get("weight"), head.params.get("bias")
    segs = {name: (lo, hi) for name, lo, hi in store.segments("float32")}
    extra = sorted(set(segs) - {w, b})
    if extra:
        raise InputError(f"zo-readout trains the linear head's weight ({w}) and bias only; "
                         f"trainable also: {', '.join(extra[:4])} (use --trainable for the "
                         "head, or zo-gn / hybrid)")
    if w not in segs:
        raise InputError(f"zo-readout reads the head through its weight {w}, which is not "
                         "trainable in this run (use --trainable for the head)")
    rows, cols = store[w].shape
    transposed = head.weight_layout == "in_out"
    shape = (cols, rows) if transposed else (rows, cols)
    return HeadSlice(segs[w], shape, transposed, segs.get(b) if b is not None else None)


def probe_rows(z: np.ndarray, head: HeadSlice) -> tuple[np.ndarray, np.ndarray]:
    """(R [K C, D], beta [K, C]) of K probes: each probe's weight part as the logits see it,
    stacked, and its bias part (zeros when the bias is frozen), float64.

    Args:
        z: the probes over the trainable slice, float32 [K, n] (+-1).
    """
    (lo, hi), (c, d), k = head.weight, head.shape, len(z)
    u = z[:, lo:hi].reshape(k, d, c).transpose(0, 2, 1) if head.transposed else \
        z[:, lo:hi].reshape(k, c, d)
    beta = z[:, head.bias[0]:head.bias[1]] if head.bias else np.zeros((k, c), np.float32)
    return u.reshape(k * c, d).astype(np.float64), beta.astype(np.float64)


def read_coefficients(out: np.ndarray, y: Any, loss_fn: Any, rows: np.ndarray,
                      beta: np.ndarray, eps: float, limit: float | None = None
                      ) -> tuple[np.ndarray, np.ndarray, float]:
    """(M [C, K C] float32 on `on_grid`'s grid, the bias gradient [C] float64, the loss at
    theta) of one step.

    Args:
        out: logits of theta and its K probes, [K + 1, batch, C].
        y: the batch's targets (int labels for cross-entropy, [batch, C] for mse).
        loss_fn: `edgelearn.losses.cross_entropy` or `mse`.
        rows, beta: `probe_rows` of the step's probes. eps: the probes' size.
        limit: the largest RMS over the batch of the outputs' change per unit lr,
            S M^T + gb (exact: R h_b = S_b), in logits (cross-entropy) or in units of the
            outputs' RMS error (mse, as zo-gn's); M and gb are scaled down to it (None: no
            limit).
    """
    o = np.asarray(out, np.float64)
    k, c = beta.shape
    if o.ndim != 3 or o.shape[0] != k + 1 or o.shape[2] != c:
        raise InputError(f"zo-readout reads logits [batch, {c}] of the head; the model gives "
                         f"{list(o.shape[1:])}")
    if loss_fn is not cross_entropy and loss_fn is not mse:
        raise InputError(f"zo-readout supports the {' and '.join(OBJECTIVES)} losses")
    s = (o[1:] - o[0]) / eps - beta[:, None, :]  # [K, batch, C]: R h_b, probe by probe
    s = s.transpose(1, 0, 2).reshape(len(o[0]), k * c)
    e, _ = loss_derivatives(o[0], o[:0], y, loss_fn)  # dl/dz over the batch [batch, C]
    m, gb = _right_solve(e.T @ s, rows @ rows.T), e.sum(axis=0)
    loss = float(loss_fn(out[0], y))
    if limit is not None:  # the step's output change is exactly -lr (S M^T + gb)
        unit = math.sqrt(max(loss, 1e-30)) if loss_fn is mse else 1.0
        rms = float(np.sqrt(np.mean(np.square(s @ m.T + gb)))) / unit
        if rms > limit:
            m, gb = m * (limit / rms), gb * (limit / rms)
    return on_grid(m), gb, loss


def _right_solve(rhs: np.ndarray, gram: np.ndarray) -> np.ndarray:
    """rhs (gram)^+ for a symmetric PSD gram [n, n]: a plain solve where gram is regular
    (checked by its residual), the pseudo-inverse where it is not (more probe rows than
    inputs, or repeated rows of a tiny head)."""
    try:
        x = np.linalg.solve(gram, rhs.T).T
        if np.abs(x @ gram - rhs).max() <= 1e-9 * max(np.abs(rhs).max(), 1e-300):
            return x
    except np.linalg.LinAlgError:
        pass
    return rhs @ np.linalg.pinv(gram, hermitian=True)


def on_grid(m: np.ndarray) -> np.ndarray:
    """m rounded to multiples of 2^-22 of its largest power of two, as float32 (exactly): at
    most 24 significant bits, so sums of its entries times +-1 are exact in float64 and M R
    is the same in any summation order (any BLAS, any CPU; module docstring)."""
    big = float(np.abs(m).max()) if m.size else 0.0
    if not 0.0 < big < math.inf:
        return m.astype(np.float32)
    q = math.ldexp(1.0, math.frexp(big)[1] - 23)  # big < 2^e: |m / q| <= 2^23
    return (np.round(m / q) * q).astype(np.float32)


def apply_read(theta: np.ndarray, head: HeadSlice, m: np.ndarray, gb: np.ndarray,
               rows: np.ndarray, lr: float) -> None:
    """theta's head minus lr (M R, the bias gradient), in float32 (training and replay).

    Args:
        m: float32 [C, K C] on `on_grid`'s grid (as journaled); gb: float32 [C];
        rows: float64 [K C, D] (+-1).
    """
    (lo, hi), (c, d) = head.weight, head.shape
    g = m.astype(np.float64) @ rows  # exact: on_grid's entries times +-1 (any order)
    w = theta[lo:hi].reshape(d, c).T if head.transposed else theta[lo:hi].reshape(c, d)
    np.subtract(w, (lr * g).astype(np.float32), out=w)
    if head.bias:
        b = theta[head.bias[0]:head.bias[1]]
        np.subtract(b, (lr * gb.astype(np.float64)).astype(np.float32), out=b)


@register
class ZOReadout(Optimizer):
    """The gradient of a linear head read from the outputs of K dense probes.

    Args:
        **options: `ZOReadoutOptions` fields (lr, eps, probes, schedule, total_steps, seed).
    """

    name = "zo-readout"
    Options = ZOReadoutOptions
    needs = "outputs"
    reads_head = True
    supports_lr_scale = True
    replay_hint = "corrupt, or written with other settings"
    options: ZOReadoutOptions

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.arena = ProbeArena(Noise("rademacher"), DEFAULT_CHUNK, self.name)
        self.head: HeadSlice | None = None

    def setup(self, store: ParamStore, *, layers: Sequence[Layer] = (),
              output: str | None = None, **extra: Any) -> None:
        """Find the head in `store` from the bundle's layer records (`readout_head`)."""
        self.head = readout_head(store, layers, output)

    def memory_bytes(self, store: ParamStore) -> int:
        """The pre-step copy, the probes' packed and expanded signs, R and the float64
        gradient."""
        n, k = store.n_trainable("float32"), self.options.probes
        return 4 * n + k * (n // 8 + 8) + 4 * k * n + 8 * k * n + 8 * n + 8 * DEFAULT_CHUNK

    def example_bytes(self, output_numel: int) -> int:
        """The K + 1 candidates' float32 outputs (copied once as they are stacked) and the
        float64 reads built from them."""
        k = self.options.probes
        return output_numel * (2 * 4 * (k + 1) + 8 * (2 * k + 3))

    def population_size(self, store: ParamStore) -> int:
        """theta and its K probes."""
        return self.options.probes + 1

    def lr_at(self, t: int) -> float:
        """lr of step t under the schedule, times `lr_scale` (divergence rollback)."""
        return scaled_lr(self.options, t, self.lr_scale)

    def _rows(self, theta: np.ndarray, seeds: list[tuple[int, int, int]]
              ) -> tuple[np.ndarray, np.ndarray]:
        assert self.head is not None
        z = expand_signs([self.arena.signs(key, theta.size) for key in seeds], theta.size)
        return probe_rows(z, self.head)

    def _step(self, store: ParamStore, **extra: Any) -> Generator[Any, Any, dict[str, Any]]:
        outputs = extra.get("outputs")
        if outputs is None:
            raise InputError("zo-readout needs the model outputs of its probes: train it with "
                             "a Session (or step(..., outputs=Forwards.outputs))")
        if self.head is None:
            raise InputError("zo-readout needs the bundle's head: train it with a Session (or "
                             "call setup(store, layers=...) first)")
        theta = self.arena.begin(store)
        t, o = self.t, self.options
        seeds = [(self.seed, t, k) for k in range(o.probes)]
        pop = self.arena.population(theta, [[], *([(np.float32(o.eps), key)] for key in seeds)])
        out, y, loss_fn = yield Forward(lambda: outputs(pop), forwards=pop.size)
        assert self.arena.copy is not None
        np.copyto(theta, self.arena.copy)  # a population placed candidate by candidate
        # (no population graph) leaves its last candidate in theta
        lr = self.lr_at(t)
        record: dict[str, Any] = {"seeds": [list(s) for s in seeds], "lr": lr, "eps": o.eps}
        rows, beta = self._rows(theta, seeds)
        limit = None if o.trust is None or lr == 0 else o.trust / lr
        m, gb, loss = read_coefficients(out, y, loss_fn, rows, beta, o.eps, limit)
        m32, gb32 = m, gb.astype(np.float32)
        if not (math.isfinite(loss) and np.isfinite(m32).all() and np.isfinite(gb32).all()):
            return {**record, "m": None, "gb": None, "loss": None, "accepted": False}
        apply_read(theta, self.head, m32, gb32, rows, lr)
        return {**record, "m": encode_array(m32), "gb": encode_array(gb32), "loss": loss,
                "accepted": True}

    def replay(self, store: ParamStore, record: dict[str, Any], **extra: Any) -> None:
        """Apply a journal record: its M with the float operations of training (no data, no
        forwards); InputError when the record does not fit this run's settings and steps."""
        step, o = record.get("step"), self.options
        if self._gen is not None:
            raise EdgelearnError("cannot replay in the middle of a step")
        if self.head is None:
            raise InputError("zo-readout replay needs the bundle's head (setup first)")
        if not (isinstance(step, int) and not isinstance(step, bool) and step >= 0
                and isinstance(record.get("accepted"), bool)):
            raise InputError(f"malformed {self.name} journal record (step {step!r})")
        seeds = [(self.seed, step, k) for k in range(o.probes)]
        lr = self.lr_at(step)
        applied = record.get("m") is not None
        if record.get("seeds") != [list(s) for s in seeds] or record.get("lr") != lr \
                or record.get("eps") != o.eps or record["accepted"] != applied:
            raise InputError(f"journal record of step {step} does not reproduce: "
                             f"{self.replay_hint}")
        self.t = step
        theta = self.arena.begin(store, copy=False)  # replay writes no candidates
        if applied:
            c = self.head.shape[0]
            m = decode_array(record["m"], "zo-readout record m")
            gb = decode_array(record.get("gb"), "zo-readout record gb")
            if m.size != c * c * o.probes or gb.size != c or not (
                    np.isfinite(m).all() and np.isfinite(gb).all()):
                raise InputError(f"malformed {self.name} journal record (step {step})")
            rows, _ = self._rows(theta, seeds)
            apply_read(theta, self.head, m.reshape(c, -1), gb, rows, lr)
        self.t = step + 1
