"""The default optimizer: which method `train` (and a Session) uses when none is named.

One rule, read from the bundle's manifest and the run's trainable set alone (no runtime is
imported; a bundle without layer records has its model.onnx parsed for its head where onnx is
installed), in this order:

  1. trainable int8 weights          -> polystep on their int8 grid (radius 2 quantization
                                        steps; the only optimizer that steps int8 weights)
  2. trainable set = int8 scales only -> zo-scale (QZO: relative steps on the scales)
  3. a taps graph the backend runs, an objective tpSGD's head loss computes (cross-entropy
     or mse), and
       every trainable tensor owned by a layer record -> tpsgd (exact updates, one forward)
       some owned (e.g. a prepared model's head)      -> hybrid (those exact, ZO the rest)
  4. otherwise (no taps, or a loss only ZO can use):
       the trainable set is the linear head (weight, and bias or not) of at most 64
       classes, cross-entropy or mse                  -> zo-readout (the head's gradient read
                                                         from the logits of 2 probes, 3
                                                         forwards a step)
       else -> zo-gn (Gauss-Newton steps from the
     outputs of 16 probes) for cross-entropy, mse and bce: from a copy of the slice up to
     64 MiB of trainable float32 weights, in place above (restore "drift": no copy, the
     candidates one forward each); for error-rate zo-sgd with lr 0.003 of each tensor's RMS
     (`relative_lr`; its restore by size: a copy up to 16 MiB, in place above)

Why this order, measured on the demo digits (`benchmarks/bench_defaults.py`, README "Which
optimizer by default"): where taps exist, tpSGD's exact head update reaches in a few hundred
forwards what ZO-SGD does not reach in thousands; without taps, on the head alone,
zo-readout reaches ZO-SGD's final accuracy in 0.06 of its forwards and ends at 0.877 (zo-gn:
0.40 and 0.824; FZOO: 0.58 and 0.744; on two classes zo-readout 0.33 and 0.871, zo-gn 0.39
and 0.868). For any other trainable set zo-gn: its damping is scale-free, so it also leads
on a 4.35M-weight MLP (17 MB; `benchmarks/bench_zo_gn_scale.py`), where zo-sgd's default lr
diverges, and on a 17.1M-weight one (68 MB, above the copy limit), where zo-sgd at its
default lr took the held-out accuracy from 0.514 to 0.078: above 64 MiB zo-gn probes in place
rather than hand the run to zo-sgd.
On a wake-word-like head (one sigmoid probability, bce; bench_defaults.py's "binary" kind)
zo-gn ends at 0.886 where fzoo ends at 0.863 and zo-sgd's best lr at 0.867.
error-rate moves in steps of one example, so a ZO difference is 1/batch whatever eps is and a
fixed lr takes the same absolute step on every tensor: with fzoo and zo-sgd at their own lrs,
the defaults before, MLPs of 1.1M / 4.35M / 17.1M weights (the same task, 3000 forwards,
seed 0; `benchmarks/bench_zo_gn_scale.py --objective error-rate`) went from 0.50 / 0.51 /
0.51 held-out accuracy to 0.17 / 0.28 / 0.14; zo-sgd with lr 0.003 of each tensor's RMS ends
at 0.54 / 0.56 / 0.56.
int8 weights and scales have one optimizer each. Explicit choices always win: this rule runs
only for optimizer "auto".
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgelearn.optim.zo_gn import OBJECTIVES as ZO_GN_OBJECTIVES

#: the largest trainable float32 slice zo-gn probes from a copy of by default (in place
#: above; module docstring, rule 4)
ZO_GN_COPY_MAX_BYTES = 64 << 20

if TYPE_CHECKING:
    from edgelearn.bundle import Bundle

#: the most classes a head may have for zo-readout to be the default (its journal record
#: holds classes^2 x probes float32 a step: 800 bytes for 10 classes, 32 KB for 64; a
#: 1000-class head would journal 8 MB a step)
READOUT_MAX_CLASSES = 64

#: the name that asks for this rule (`train --optimizer auto`, the default)
AUTO = "auto"

#: objectives tpSGD's head computes exactly -> its `head_loss` option
TAPS_OBJECTIVES = {"cross-entropy": "cross-entropy", "mse": "mse"}

#: each default's options that differ from its Options defaults (measured; see the README)
RECIPES: dict[str, dict[str, Any]] = {
    "tpsgd": {"lr": 0.1},
    "hybrid": {"lr": 0.1, "zo_lr": 0.01},
    "zo-gn": {},
    "zo-readout": {},
    # error-rate (module docstring): lr as a fraction of each tensor's RMS
    "zo-sgd": {"relative_lr": True, "lr": 0.003},
    "zo-scale": {},
    "polystep": {"radius": 2.0},
}


def rule_summary() -> str:
    """The rule of the module docstring in one sentence (`train --optimizer`'s help), its
    sizes and options read from the constants the rule uses."""
    tp, hy = RECIPES["tpsgd"], RECIPES["hybrid"]
    return (f"polystep (radius {RECIPES['polystep']['radius']:g}) for int8 weights, zo-scale "
            f"for int8 scales only, tpsgd (lr {tp['lr']:g}) when taps cover every trainable "
            f"tensor, hybrid (lr {hy['lr']:g}, zo-lr {hy['zo_lr']:g}) when they cover some, "
            f"else zo-readout when the linear head alone (up to {READOUT_MAX_CLASSES} "
            f"classes) trains on cross-entropy or mse, "
            f"zo-gn for {', '.join(ZO_GN_OBJECTIVES)} (probes written in place above "
            f"{ZO_GN_COPY_MAX_BYTES >> 20} MiB of trainable weights) and zo-sgd (lr "
            f"{RECIPES['zo-sgd']['lr']:g}) relative to each tensor's RMS for other losses")


@dataclass(frozen=True)
class Choice:
    """The optimizer the rule picked.

    Args:
        name: registry name. options: its options besides its Options defaults.
        why: one line, "auto: NAME (reason)", recorded with the run.
    """

    name: str
    options: dict[str, Any] = field(default_factory=dict)
    why: str = ""


def _pick(name: str, reason: str, **extra: Any) -> Choice:
    return Choice(name, {**RECIPES[name], **extra}, f"auto: {name} ({reason})")


def choose_optimizer(bundle: Bundle, *, trainable: str | Sequence[str] | None = None,
                     backend: str = "onnxruntime", objective: str | None = None) -> Choice:
    """The default optimizer for training `trainable` of `bundle` on `backend`.

    Args:
        bundle: a loaded bundle (manifest and file list only).
        trainable: the run's trainable globs (None: the manifest's flags).
        backend: the resolved backend name ("onnxruntime" or "litert").
        objective: the run's loss (None: the bundle's default loss).
    Raises: InputError when `trainable` matches nothing.
    """
    from edgelearn.bundle import param_role
    from edgelearn.losses import default_loss

    specs = bundle.param_specs(trainable)
    train = [s for s in specs if s.trainable]
    roles = {s.name: param_role(s) for s in train}
    if any(r == "int8" for r in roles.values()):
        return _pick("polystep", "int8 weights train on their int8 grid; radius in "
                     "quantization steps")
    if train and all(r == "scale" for r in roles.values()):
        return _pick("zo-scale", "only int8 quantization scales train")
    if not train and any(param_role(s) == "scale" for s in specs):
        return _pick("zo-scale", "no trainable flags; the int8 quantization scales train")
    objective = objective or default_loss(bundle.task, bundle.outputs)
    taps = _taps_choice(bundle, [s.name for s in train], backend, objective)
    if taps is not None:
        return taps
    return _zo_choice(bundle, train, backend, objective)


def _taps_choice(bundle: Bundle, train: list[str], backend: str,
                 objective: str) -> Choice | None:
    """tpsgd or hybrid where the bundle's taps reach (part of) the trainable set, else None."""
    if _taps_missing(bundle, backend) or objective not in TAPS_OBJECTIVES or not train:
        return None
    from edgelearn.layers import parse_layers

    layers = parse_layers(bundle.manifest, {p.name for p in bundle.params})
    if not layers or not layers[-1].head:
        return None
    owned = {n for layer in layers for n in layer.param_names()}
    owned |= {layer.bn[k] for layer in layers if layer.bn
              for k in ("running_mean", "running_var")}
    extra = {"head_loss": TAPS_OBJECTIVES[objective]} if objective != "cross-entropy" else {}
    covered = [n for n in train if n in owned]
    if len(covered) == len(train):
        return _pick("tpsgd", f"taps cover all {len(train)} trainable tensors: exact "
                     "layer-local updates, one forward a step", **extra)
    if covered:
        return _pick("hybrid", f"taps cover {len(covered)} of {len(train)} trainable tensors: "
                     "those exact, ZO on the rest, two forwards a step", **extra)
    return None


def _taps_missing(bundle: Bundle, backend: str) -> str | None:
    """Why the bundle has no taps graph `backend` can run (None: it has one)."""
    if "onnx_taps" not in bundle.files:
        return "no taps graph"
    if backend == "litert" and "tflite_taps" not in bundle.files:
        return "no model_taps.tflite for litert"
    return None


def _zo_choice(bundle: Bundle, train: Sequence[Any], backend: str, objective: str) -> Choice:
    """zo-gn (cross-entropy, mse, bce; in place above 64 MiB of trainable weights), else
    zo-sgd with its lr relative to each tensor's RMS (error-rate)."""
    why = _taps_missing(bundle, backend) or (
        f"the {objective} loss is not one tpSGD's head computes" if objective not in
        TAPS_OBJECTIVES else "no layer record owns a trainable tensor")
    nbytes = sum(s.nbytes for s in train if s.dtype == "float32")
    size = f"{nbytes / (1 << 20):.0f} MiB of trainable weights"
    readout = _readout_choice(bundle, train, objective, why)
    if readout is not None:
        return readout
    if objective in ZO_GN_OBJECTIVES:
        if nbytes > ZO_GN_COPY_MAX_BYTES:
            return _pick("zo-gn", f"{why}; {size}: Gauss-Newton steps from its probes' "
                         "outputs, written in place (no copy of them)", restore="drift")
        return _pick("zo-gn", f"{why}: Gauss-Newton steps from the outputs of its probes, "
                     "ends above fzoo and zo-sgd")
    return _pick("zo-sgd", f"{why}: the loss moves in steps of one example, so each "
                 "tensor's step is a fraction of its RMS")


def _readout_choice(bundle: Bundle, train: Sequence[Any], objective: str, why: str
                    ) -> Choice | None:
    """zo-readout where the trainable set is the bundle's linear head (its weight, and its
    bias or not) and the loss one it reads, else None."""
    from edgelearn.graph_taps import head_layers
    from edgelearn.optim.zo_readout import OBJECTIVES, readable_head

    if objective not in OBJECTIVES:
        return None
    head = readable_head(head_layers(bundle), bundle.outputs[0].name)
    names = {s.name for s in train}
    if isinstance(head, str) or head.params.get("weight") not in names \
            or not names <= set(head.params.values()):
        return None
    shape = next(s.shape for s in train if s.name == head.params["weight"])
    classes = shape[1] if head.weight_layout == "in_out" else shape[0]
    if classes > READOUT_MAX_CLASSES:
        return None  # its journal would hold classes^2 x probes floats a step
    return _pick("zo-readout", f"{why}; the trainable set is the linear head: its gradient "
                 "read from the outputs of its probes, classes-many directions a forward")


def recorded_choice(train: Mapping[str, Any]) -> Choice | None:
    """The choice a run directory's recorded training config holds (its `session.json`
    "train" object), so that resuming an "auto" run keeps its optimizer and options even when
    this rule would now pick another; None when it records no optimizer.

    Args:
        train: `TrainConfig.to_json()` of the recorded run.
    """
    name, options = train.get("optimizer"), train.get("options")
    if not isinstance(name, str) or name == AUTO or not isinstance(options, Mapping):
        return None
    why = train.get("chosen_by") or f"auto: {name} (the optimizer of the run being resumed)"
    return Choice(name, dict(options), str(why))
