"""Option fields and the lr schedule shared by the ZO family (zo-sgd, zo-scale, fzoo, adamezo).

One definition per field keeps their help, choices and recording alike across optimizers
(the CLI flags are generated from them, so two copies drifting apart would show as two flags
that mean different things). Field order stays with each Options class: headers record the
fields in declaration order.
"""

from __future__ import annotations

import math
from dataclasses import field
from typing import Any

from edgelearn.optim.options import check, meta
from edgelearn.rng import DEFAULT_CHUNK

SCHEDULES = ("constant", "cosine", "linear")


def scheduled(lr: float, schedule: str, total: int | None, t: int) -> float:
    """lr at step t under `schedule` (constant, cosine or linear decay to 0 over `total`).

    Args:
        lr: base learning rate; schedule: one of SCHEDULES; total: schedule length in steps
            (required unless constant); t: step index (0-based).
    """
    if schedule == "constant":
        return lr
    assert total is not None
    frac = min(t / total, 1.0)
    if schedule == "cosine":
        return lr * 0.5 * (1.0 + math.cos(math.pi * frac))
    return lr * (1.0 - frac)


def scaled_lr(rule: Any, t: int, lr_scale: float) -> float:
    """`scheduled` lr of step t of a rule with fields lr, schedule and total_steps (an
    optimizer's options), times `lr_scale` (the trainer's divergence rollback; 1.0: as is).

    Args:
        rule: options with lr, schedule, total_steps. t: step index. lr_scale: in (0, 1].
    """
    lr = scheduled(rule.lr, rule.schedule, rule.total_steps, t)
    return lr if lr_scale == 1.0 else lr * lr_scale


def trust_field() -> Any:
    """The `trust` option of the optimizers that read the model's outputs (zo-gn,
    zo-readout): a trust region on the outputs' change a step is predicted to make."""
    return field(default=1.0, metadata=meta(
        "trust region: the largest RMS change of the batch's outputs a step is predicted to "
        "make, in logits (cross-entropy) or in RMS errors (mse); larger steps are scaled down "
        "(--opt trust=null: none)", cli="--trust", legacy=None))


def check_trust(trust: float | None) -> None:
    """`trust_field`'s check: None or a finite number > 0 (InputError naming it)."""
    check(trust is None or (math.isfinite(trust) and trust > 0),
          f"trust must be a finite number > 0 or null, got {trust!r}")


def schedule_field() -> Any:
    """The `schedule` option (constant, cosine or linear)."""
    return field(default="constant", metadata=meta(
        "decay of lr over total_steps: constant, cosine or linear", cli="--schedule",
        choices=SCHEDULES))


def total_steps_field(
        help: str = "schedule length (required for non-constant schedules; train sets it to "
                    "--steps)") -> Any:
    """The `total_steps` option (the schedule's length; train fills it in)."""
    return field(default=None, metadata=meta(help))


def chunk_field() -> Any:
    """The `chunk` option (noise chunk size; never recorded: results do not depend on it)."""
    return field(default=DEFAULT_CHUNK, metadata=meta(
        "elements per noise chunk (results do not depend on it)", record="never"))


def pool_size_field() -> Any:
    """The `pool_size` option (the shared noise table's size for noise=pool)."""
    return field(default=1 << 22, metadata=meta("shared-table size for noise=pool"))


def copy_restore_field(name: str) -> Any:
    """The `restore` option of optimizers that always work from a copy of the slice.

    Args:
        name: the optimizer's name, for the help text.
    """
    return field(default="auto", metadata=meta(
        f"accepted for the shared CLI: {name} always writes probes and the update from a "
        "copy of the trainable slice, so every value behaves the same", cli="--restore",
        choices=("auto", "copy", "drift")))


def check_lr_eps(lr: float, eps: float) -> None:
    """The ZO family's checks of its step and perturbation scales (InputError naming them).

    Args:
        lr: learning rate (finite, >= 0). eps: perturbation scale (finite, > 0).
    """
    check(lr >= 0 and math.isfinite(lr), f"lr must be a finite number >= 0, got {lr}")
    check(eps > 0 and math.isfinite(eps), f"eps must be a finite number > 0, got {eps}")


def check_noise_fields(schedule: str, total_steps: int | None, chunk: int,
                       pool_size: int) -> None:
    """The checks of the schedule / chunk / pool fields the batched ZO optimizers share.

    Args:
        schedule, total_steps: `schedule_field()` and `total_steps_field()` values.
        chunk: `chunk_field()` value. pool_size: `pool_size_field()` value.
    """
    check(schedule == "constant" or (total_steps or 0) > 0,
          f"schedule {schedule!r} needs total_steps > 0")
    check(chunk >= 8 and chunk % 8 == 0, f"chunk must be a positive multiple of 8, got {chunk!r}")
    check(pool_size >= 1, f"pool_size must be an integer >= 1, got {pool_size}")
