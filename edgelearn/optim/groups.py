"""Parameter groups: a learning rate and a perturbation scale per group of tensors.

One lr for every tensor does not fit a head trained with its LayerNorms: a norm's gain sits
near 1 and its loss is steep in it, so an lr that moves the head makes the norms diverge.
Groups set lr and eps per tensor, by glob on the tensor's name (first rule that sets a key
wins), either as a number or relative to the tensor's magnitude:

    "head.*:lr=0.01;*norm*:lr=1e-4,eps=rms*0.01"

  * `KEY=NUMBER`: the tensor's value of lr or eps.
  * `KEY=rms*C`: C times the tensor's root-mean-square at the weights the run starts from
    (a tensor whose RMS is 0, e.g. a zero-initialised bias, keeps the optimizer's value).
Layer-wise scales as in LARS (You et al. 2017, "Large Batch Training of Convolutional
Networks"); MeZO's reference code likewise treats biases and norms apart (no weight decay).

An optimizer applies a group as a multiplier of its own lr / eps (value / base value), where
it applies lr and eps, so schedules and divergence rollbacks scale every group alike. The
option string is part of the optimizer's config (the journal header); values derived from
RMS are computed at step 0's weights, which replay starts from too, and travel in the
optimizer state for resumes (`GroupScales.state` / `load`).
"""

from __future__ import annotations

import bisect
import fnmatch
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgelearn.errors import InputError

GROUP_KEYS = ("lr", "eps")


@dataclass(frozen=True)
class GroupRule:
    """One rule: tensors matching `pattern` get the `values` it sets.

    Args:
        pattern: fnmatch glob on tensor names.
        values: key ("lr" / "eps") -> ("abs", value) or ("rms", factor).
    """

    pattern: str
    values: Mapping[str, tuple[str, float]]


def _number(text: str, what: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise InputError(f"groups: {what} must be a number or rms*NUMBER, got {text!r}") \
            from None
    if not (math.isfinite(v) and v >= 0):
        raise InputError(f"groups: {what} must be a finite number >= 0, got {text!r}")
    return v


def _rule(text: str) -> GroupRule:
    """One `PATTERN:KEY=VALUE,...` rule."""
    pattern, sep, body = text.strip().rpartition(":")
    if not sep or not pattern or not body:
        raise InputError(f"groups: expected PATTERN:KEY=VALUE[,KEY=VALUE], got {text!r}")
    values: dict[str, tuple[str, float]] = {}
    for item in body.split(","):
        key, eq, value = (s.strip() for s in item.partition("="))
        if not eq or key not in GROUP_KEYS or key in values:
            raise InputError(f"groups: {item.strip()!r} in {text!r} is not one of "
                             f"{', '.join(k + '=VALUE' for k in GROUP_KEYS)} (each once)")
        if value.startswith("rms*"):
            values[key] = ("rms", _number(value[4:], key))
        else:
            values[key] = ("abs", _number(value, key))
    return GroupRule(pattern, values)


def parse_groups(text: str | None) -> tuple[GroupRule, ...]:
    """The rules of a groups option: `PATTERN:KEY=VALUE[,...]` separated by ';' (None: none).

    Raises InputError ("groups must be ...") naming the malformed rule.
    """
    if text is None or not text.strip():
        return ()
    try:
        return tuple(_rule(part) for part in text.split(";") if part.strip())
    except InputError as e:
        raise InputError("groups must be PATTERN:KEY=VALUE[,KEY=VALUE] rules separated by "
                         f"';' ({e})") from None


def _rms(view: np.ndarray) -> float:
    return float(np.sqrt(np.mean(np.square(view, dtype=np.float64)))) if view.size else 0.0


def resolve(rules: Sequence[GroupRule], views: Mapping[str, np.ndarray],
            base: Mapping[str, float]) -> dict[str, dict[str, float]]:
    """Per-tensor multipliers of the base lr / eps the rules give.

    Args:
        rules: parsed groups (first rule that sets a key for a tensor wins).
        views: tensor name -> its current values (RMS-relative rules read them).
        base: key -> the optimizer's own value (lr, eps); a multiplier is value / base
            (0 where the base is 0).
    Returns: name -> {key: multiplier} for every tensor some rule sets a key of.
    """
    out: dict[str, dict[str, float]] = {}
    for name, view in views.items():
        for key in GROUP_KEYS:
            rule = next((r for r in rules if key in r.values
                         and fnmatch.fnmatchcase(name, r.pattern)), None)
            if rule is None:
                continue
            kind, number = rule.values[key]
            value = number if kind == "abs" else number * _rms(view)
            if kind == "rms" and value == 0.0:
                continue  # an all-zero tensor keeps the base value
            out.setdefault(name, {})[key] = value / base[key] if base[key] else 0.0
    return out


class GroupScales:
    """Multipliers of lr and eps over a flat trainable slice, applied chunk by chunk.

    Args:
        rules: parsed groups.
    """

    def __init__(self, rules: Sequence[GroupRule]) -> None:
        self.rules = tuple(rules)
        self.table: dict[str, dict[str, float]] | None = None
        self._runs: dict[str, list[tuple[int, int, np.float32]]] = {}

    def __bool__(self) -> bool:
        return bool(self.rules)

    def sets(self, key: str) -> bool:
        """Whether some rule sets `key` ("lr" / "eps"): else its multipliers are all 1."""
        return any(key in r.values for r in self.rules)

    def setup(self, segments: Sequence[tuple[str, int, int]],
              views: Mapping[str, np.ndarray], base: Mapping[str, float]) -> None:
        """Resolve the rules for the tensors at `segments` of the flat slice (once: a table
        restored by `load` is kept)."""
        if self.table is None:
            self.table = resolve(self.rules, views, base)
        self._runs = {key: [(a, b, np.float32(self.table[n][key])) for n, a, b in segments
                            if key in self.table.get(n, {})] for key in GROUP_KEYS}

    def multiplier(self, name: str, key: str) -> float:
        """The resolved multiplier of `key` for tensor `name` (1.0 where no rule sets it)."""
        return (self.table or {}).get(name, {}).get(key, 1.0)

    def apply(self, key: str, chunk: np.ndarray, a: int, b: int) -> None:
        """chunk *= multiplier of `key`, in place, for the slice elements a..b-1 it holds."""
        runs = self._runs.get(key)
        if not runs:
            return
        i = max(0, bisect.bisect_right(runs, (a, math.inf)) - 1)
        for lo, hi, m in runs[i:]:
            if lo >= b:
                break
            lo, hi = max(lo, a), min(hi, b)
            if lo < hi:
                np.multiply(chunk[lo - a:hi - a], m, out=chunk[lo - a:hi - a])

    def state(self) -> dict[str, Any]:
        """The resolved table as JSON data (optimizer state: a resume keeps step 0's RMS)."""
        return {} if self.table is None else {"group_scales": self.table}

    def load(self, state: Mapping[str, Any]) -> None:
        """Restore `state()` output (absent: resolve again at the next setup)."""
        table = state.get("group_scales")
        if table is None:
            return
        if not (isinstance(table, dict) and all(
                isinstance(v, dict) and all(k in GROUP_KEYS and isinstance(m, int | float)
                                            for k, m in v.items()) for v in table.values())):
            raise InputError("bad group_scales in optimizer state")
        self.table = {n: {k: float(m) for k, m in v.items()} for n, v in table.items()}
