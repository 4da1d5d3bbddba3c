"""Memory budget: predict a training run's peak and pick a batch size that fits.

The prediction is grounded in a measurement: the process's resident memory once the bundle
is loaded and the session bound (weights, runtime, Python), plus what a step adds on top —
the optimizer's trainable-sized buffers and the activations of one batch. Activations per
example come from ONNX shape inference: the sum of every batch-dependent tensor in the graph,
an upper bound (the runtime reuses buffers), so a batch that fits here fits on the device.
A symbolic dimension other than the batch (a transformer's "sequence") takes its size from
the data the run trains on (`data_dims`: the inputs declaring it); one the data does not size
counts 1 and the plan lists it under "unsized_dims". Before, every such dimension counted 1:
an int8 MiniLM-L6 at sequence length 128 planned 596 MB for a 1046 MB peak.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from edgelearn.backends.ort_population import POP_ROLE
from edgelearn.data import EXAMPLE_DIGEST_BYTES, PERMUTATIONS_CACHED
from edgelearn.errors import EdgelearnError, InputError
from edgelearn.inputs import Inputs
from edgelearn.osutil import current_rss_mb
from edgelearn.rng import cache_bytes as rng_cache_bytes

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle

_ONNX_ITEMSIZE = {1: 4, 2: 1, 3: 1, 4: 2, 5: 2, 6: 4, 7: 8, 9: 1, 10: 2, 11: 8, 12: 4, 13: 8,
                  16: 2}
MARGIN = 1.10


def data_dims(inputs: Sequence[Any], x: Inputs) -> dict[str, int]:
    """Sizes of the inputs' symbolic dimensions other than their first (the batch), read off
    the arrays of `x` (the largest where inputs disagree).

    Args:
        inputs: the bundle's input `TensorSpec`s (shapes with str symbols).
        x: one array (a single-input model) or input name -> array.
    """
    arrays = x if isinstance(x, Mapping) else {inputs[0].name: x} if inputs else {}
    batch = _batch_symbols(inputs)
    dims: dict[str, int] = {}
    for spec in inputs:
        shape = np.shape(arrays[spec.name]) if spec.name in arrays else ()
        for d, n in zip(spec.shape[1:], shape[1:], strict=False):
            if isinstance(d, str) and d not in batch:
                dims[d] = max(dims.get(d, 0), int(n))
    return dims


def unsized_dims(inputs: Sequence[Any], dims: Mapping[str, int]) -> list[str]:
    """The inputs' symbolic non-batch dimensions `dims` does not size (the plan counts 1)."""
    batch = _batch_symbols(inputs)
    return sorted({d for spec in inputs for d in spec.shape[1:]
                   if isinstance(d, str) and d not in batch and d not in dims})


def _batch_symbols(inputs: Sequence[Any]) -> set[str]:
    """The symbols that name the inputs' first (batch) dimension."""
    return {spec.shape[0] for spec in inputs if spec.shape and isinstance(spec.shape[0], str)}


def activation_bytes_per_example(model_path: str | os.PathLike) -> int:
    """Upper bound of activation bytes one example adds to a forward (ONNX shape inference).

    Returns 0 when onnx is not installed (LiteRT-only device); `plan_batch` then assumes
    16 x (input + output) bytes per example.
    """
    return activation_profile(model_path)[0]


def activation_profile(model_path: str | os.PathLike,
                       dims: Mapping[str, int] | None = None) -> tuple[int, int]:
    """(per example, fixed): an upper bound of the activation bytes one example adds to a
    forward (every batch-dependent tensor), and the peak bytes of the intermediates whose
    shape has no batch axis that are alive at once when the nodes run in the graph's order
    (an int8 model's weights dequantized as it runs: Cast, then Mul by the scale; each freed
    after its last reader). (0, 0) when onnx is not installed.

    Args:
        dims: sizes of symbolic dimensions other than the batch (`data_dims`); others count 1.
    """
    g = _inferred_graph(model_path)
    if g is None:
        return 0, 0
    per_example, static = 0, {}
    for vi in [*g.input, *g.value_info, *g.output]:
        shape = vi.type.tensor_type.shape.dim
        if shape and shape[0].dim_param:
            per_example += _known_bytes(vi, dims)
        elif shape and all(d.dim_value > 0 and not d.dim_param for d in shape):
            static[vi.name] = _known_bytes(vi)
    for t in [*g.initializer, *g.input]:
        static.pop(t.name, None)  # weights and inputs: in the base, not made by a forward
    return per_example, _live_peak(g, static)


def _inferred_graph(model_path: str | os.PathLike) -> Any:
    """The ONNX graph at `model_path` after shape inference (None: onnx not installed)."""
    try:
        import onnx
    except ImportError:
        return None
    return onnx.shape_inference.infer_shapes(onnx.load(str(model_path),
                                                       load_external_data=False)).graph


def _known_bytes(vi: Any, dims: Mapping[str, int] | None = None) -> int:
    """Bytes of a tensor (ValueInfo): symbolic dims sized by `dims`, other symbolic or unknown
    dims counting 1."""
    tt = vi.type.tensor_type
    n = _ONNX_ITEMSIZE.get(tt.elem_type, 4)
    for d in tt.shape.dim:
        n *= d.dim_value if not d.dim_param and d.dim_value > 0 else \
            (dims or {}).get(d.dim_param, 1)
    return n


def _live_peak(g: Any, sizes: dict[str, int]) -> int:
    """Peak bytes of the tensors in `sizes` alive at once, nodes run in `g`'s order (a
    tensor lives from its node to its last reader; graph outputs to the end)."""
    last = {name: i for i, node in enumerate(g.node) for name in node.input if name in sizes}
    outputs = {o.name for o in g.output}
    live = peak = 0
    for i, node in enumerate(g.node):
        live += sum(sizes.get(o, 0) for o in node.output)
        peak = max(peak, live)
        live -= sum(sizes[n] for n in set(node.input)
                    if n in sizes and last.get(n) == i and n not in outputs)
        live -= sum(sizes.get(o, 0) for o in node.output if o not in last and o not in outputs)
    return peak


def population_activation_bytes(model_path: str | os.PathLike,
                                dims: Mapping[str, int] | None = None) -> tuple[int, int]:
    """(shared, per candidate): upper bounds of the activation bytes one example adds to a
    population graph's call, apart from its candidates and for each of them (`dims`: as
    `activation_profile`'s).

    The graph's trainable inputs carry the population dimension K first and its data inputs
    the batch dimension; after shape inference a tensor with both symbols is computed per
    candidate (vmap batches only what depends on the candidates: a frozen body runs once).
    (0, 0) when onnx is not installed.
    """
    g = _inferred_graph(model_path)
    if g is None:
        return 0, 0
    inits = {t.name for t in g.initializer}
    firsts = [vi.type.tensor_type.shape.dim[0].dim_param for vi in g.input
              if vi.name not in inits and vi.type.tensor_type.shape.dim]
    # the batch symbol leads the data input(s), K the trainable parameters that follow them
    batch, k = (firsts[0], next((s for s in firsts if s and s != firsts[0]), None)) \
        if firsts else (None, None)
    shared = per_candidate = 0
    for vi in [*g.input, *g.value_info, *g.output]:
        syms = [d.dim_param for d in vi.type.tensor_type.shape.dim]
        if not batch or batch not in syms:
            continue  # not batch dependent (weights, shapes)
        if k is not None and k in syms:
            per_candidate += _known_bytes(vi, dims)
        else:
            shared += _known_bytes(vi, dims)
    return shared, per_candidate


def run_memory_bytes(*, n_examples: int, trainable_bytes: int, snapshots: bool,
                     timing_samples: int, timers: int) -> int:
    """Bytes a training run keeps besides the model, optimizer and activations.

    The run keeps nothing that grows with its length: journal records are streamed to disk
    (never listed in memory), timings live in fixed rings and only the first and last loss
    are kept. What it does keep is bounded and counted here, with the noise generator's key
    and sign-block caches (`edgelearn.rng.cache_bytes`, filled by a run's first steps).

    Args:
        n_examples: training examples (the cached epoch permutations are int64 of this size;
            the batch digests keep `EXAMPLE_DIGEST_BYTES` per example).
        trainable_bytes: bytes of the trainable slices (a divergence snapshot copies them).
        snapshots: True with a divergence policy: one good snapshot is kept, and resuming
            keeps a second copy (the base weights) while it replays.
        timing_samples: samples per timing ring.
        timers: number of timing rings.
    """
    permutations = (PERMUTATIONS_CACHED * 8 + EXAMPLE_DIGEST_BYTES) * n_examples
    copies = 2 * trainable_bytes if snapshots else 0
    return permutations + copies + 8 * timing_samples * timers + rng_cache_bytes()


def plan_batch(
    bundle: Any,
    *,
    batch_size: int,
    budget_mb: float,
    extra_bytes: int = 0,
    base_mb: float | None = None,
    candidates: int = 1,
    example_bytes: int = 0,
    dims: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Largest batch <= batch_size whose predicted training peak fits the budget.

    Args:
        bundle: the loaded Bundle (its ONNX graph gives activation sizes).
        batch_size: batch the user asked for.
        budget_mb: memory budget for the whole process (MiB).
        extra_bytes: optimizer buffers (e.g. the restore copy of the trainable slice) and
            what the run keeps (`run_memory_bytes`).
        base_mb: resident memory with the model loaded (default: measured after the graph
            analyses, returned as "base_mb" for later plans of the same process).
        candidates: forwards one runtime call runs at once (a population graph scores an
            optimizer's candidates together): the activations the graph computes per
            candidate (`population_activation_bytes`) count this many times.
        example_bytes: what the optimizer keeps per example besides the runtime's
            (`Optimizer.example_bytes`: zo-gn's candidate outputs).
        dims: sizes of the inputs' symbolic non-batch dimensions (`data_dims` of the data
            the run trains on); the others count 1 and are listed under "unsized_dims".
    Returns: {"batch_size", "requested_batch_size", "predicted_peak_mb", "budget_mb",
              "activation_kb_per_example", "unbatched_intermediates_kb" (`activation_profile`'s
              fixed part), "optimizer_kb_per_example", "candidates_per_call", "extra_bytes",
              "base_mb", "dims", "unsized_dims"}. Raises InputError if even batch 1 does not
              fit.
    """
    dims = dict(dims or {})
    per_ex = fixed = 0
    if "onnx" in bundle.files:
        per_ex, fixed = activation_profile(bundle.files["onnx"], dims)
    if per_ex == 0:
        io = sum(_numel(t.shape, dims) * 4 for t in [*bundle.inputs, *bundle.outputs])
        per_ex = 16 * io
    if candidates > 1:  # one call runs the candidates together
        shared, each = population_activation_bytes(bundle.files[POP_ROLE], dims) \
            if POP_ROLE in bundle.files else (0, per_ex)
        if shared + each:
            per_ex = max(per_ex, shared + candidates * each)
        else:  # onnx not installed: every activation counted per candidate
            per_ex *= candidates
    # measured after the graph analyses: their onnx import and protos stay resident
    base = current_rss_mb() if base_mb is None else base_mb

    def peak(b: int) -> float:
        return MARGIN * (base + (extra_bytes + fixed + (per_ex + example_bytes) * b) / (1 << 20))

    if peak(1) > budget_mb:
        raise InputError(
            f"training this bundle needs about {peak(1):.0f} MB even at batch size 1, over the "
            f"memory budget of {budget_mb:.0f} MB (model and runtime alone take {base:.0f} MB)"
        )
    lo, hi = 1, batch_size  # peak() grows with the batch: binary search the largest fit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if peak(mid) <= budget_mb:
            lo = mid
        else:
            hi = mid - 1
    fit = lo
    return {"batch_size": fit, "requested_batch_size": batch_size,
            "predicted_peak_mb": peak(fit), "budget_mb": budget_mb,
            "activation_kb_per_example": round(per_ex / 1024, 1),
            "unbatched_intermediates_kb": round(fixed / 1024, 1),
            "optimizer_kb_per_example": round(example_bytes / 1024, 1), "base_mb": base,
            "candidates_per_call": candidates, "extra_bytes": extra_bytes, "dims": dims,
            "unsized_dims": unsized_dims(bundle.inputs, dims)}


def output_numel(bundle: Any, dims: Mapping[str, int] | None = None) -> int:
    """Elements of the bundle's first output per example (symbolic dims sized by `dims`,
    others counting 1)."""
    return _numel(bundle.outputs[0].shape, dims) if bundle.outputs else 1


def _numel(shape: tuple[int | str, ...], dims: Mapping[str, int] | None = None) -> int:
    n = 1
    for d in shape[1:]:
        n *= d if isinstance(d, int) else (dims or {}).get(d, 1)
    return n


@dataclass(frozen=True)
class DevicePlan:
    """What fits a memory budget when a bundle trains here, per registered optimizer.

    Args:
        path: the bundle's path.
        backend: the backend it was sized on.
        budget_mb: the memory budget (MiB, whole process peak).
        trainable_params: float32 parameters trained.
        plans: optimizer -> `plan_batch`'s result, or {"error": why} when the bundle cannot
            train with it or even batch 1 does not fit.
    """

    path: str
    backend: str
    budget_mb: float
    trainable_params: int
    plans: dict[str, dict[str, Any]]

    @property
    def max_batch(self) -> dict[str, int | None]:
        """optimizer -> the largest batch that fits (None when it does not run)."""
        return {k: v.get("batch_size") for k, v in self.plans.items()}

    def to_json(self) -> dict[str, Any]:
        """The `bundle` object of `edgelearn device BUNDLE --json`."""
        return {"path": self.path, "backend": self.backend, "budget_mb": self.budget_mb,
                "trainable_params": self.trainable_params, "max_batch": self.max_batch,
                "plans": self.plans}


def plan_device(bundle: Bundle, *, backend: str, budget_mb: float, batch_size: int = 32,
                trainable: str | None = None, threads: int | None = None,
                dims: Mapping[str, int] | None = None) -> DevicePlan:
    """The largest batch <= batch_size each registered optimizer can train `bundle` with here
    (`plan_batch` with the optimizer's own buffers), measured with the model loaded.

    Args:
        bundle: a loaded bundle.
        backend: the runtime to load it on (see `edgelearn.devices.resolve_backend`).
        budget_mb: memory budget for the whole process (MiB).
        batch_size: the batch wanted.
        trainable: glob(s) of parameters to train (None = the manifest's).
        threads: runtime intra-op threads (None = the runtime's choice).
        dims: sizes of the inputs' symbolic non-batch dimensions (`plan_batch`'s); a name
            that is not one is an InputError.
    """
    from edgelearn.capabilities import optimizer_support

    symbols = unsized_dims(bundle.inputs, {})
    unknown = sorted(set(dims or {}) - set(symbols))
    if unknown:
        named = ", ".join(symbols) or "none"
        raise InputError(f"no input dimension named {', '.join(unknown)} (the bundle's "
                         f"symbolic dimensions besides the batch: {named})")
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    model = Model(bundle, backend=backend, trainable=trainable, threads=threads)
    # the population graph's session, as a run loads it (its memory is in the base)
    scorer = model.backend.population_scorer() if model.backend.can_score_population() else None
    base = None  # measured by the first plan, after its graph analyses; then the same for all
    fits: dict[str, dict[str, Any]] = {}
    for name, support in optimizer_support(bundle).items():
        if support["supported"] is False:
            fits[name] = {"error": f"not for this bundle: {support['why']}"}
            continue
        try:
            opt = make_optimizer(name)
            cands = opt.population_size(model.store)
            extra, rows = opt.memory_bytes(model.store), 1
            if scorer is not None:  # a run scores its populations with it (candidate rows)
                extra += scorer.memory_bytes(cands)
                rows = max(1, min(cands, scorer.max_population))
            fits[name] = plan_batch(bundle, batch_size=batch_size, budget_mb=budget_mb,
                                    extra_bytes=extra, base_mb=base, candidates=rows, dims=dims,
                                    example_bytes=opt.example_bytes(output_numel(bundle, dims)))
            base = fits[name]["base_mb"]
        except EdgelearnError as e:
            fits[name] = {"error": str(e)}
    if scorer is not None:
        scorer.close()
    return DevicePlan(path=str(bundle.path), backend=backend, budget_mb=budget_mb,
                      trainable_params=model.store.n_trainable("float32"), plans=fits)
