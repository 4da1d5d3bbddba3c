"""Optimizer options: one frozen dataclass per optimizer, from which everything else derives.

After evosax's `Params` (hyperparameters kept apart from the optimizer's state). Each optimizer
declares its options once, as a frozen dataclass subclassing `OptimizerOptions`; every field
carries its default, its type and, in `dataclasses.field(metadata=meta(...))`, its help text
and the `edgelearn train` flag that sets it:

    lr: float = field(default=1e-3, metadata=meta("learning rate", cli="--lr"))

Types (and `choices`) are checked here for every class, ranges in each class's
`__post_init__`, all with InputError. `config()` (journal header, optimizer state),
`from_config` (a header read back: a key an older journal lacks takes the value its run used,
metadata "legacy"), the `--opt KEY=VALUE` keys and the train flags an optimizer accepts all
come from the dataclass's fields.
"""

from __future__ import annotations

import dataclasses
import functools
import numbers
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from edgelearn.errors import InputError

#: how an option appears in `config()`: always; only when it differs from its default (so
#: headers of runs that do not use a newer option keep their old form); never (results do not
#: depend on it, e.g. a chunk size)
RECORD = ("always", "when-set", "never")
_KINDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}

OptionsT = TypeVar("OptionsT", bound="OptimizerOptions")


def meta(help: str, *, cli: str | None = None, choices: Sequence[str] | None = None,
         legacy: Any = dataclasses.MISSING, record: str = "always") -> dict[str, Any]:
    """Metadata of one option field.

    Args:
        help: one-line help text.
        cli: the `edgelearn train` flag that sets this option ("--lr"), or None when only
            `--opt KEY=VALUE` does.
        choices: the values allowed (None: any value of the field's type).
        legacy: the value a journal header without this key implies (its run predates the
            option, or the option's default has changed since); default: the field's default.
        record: one of RECORD.
    """
    if record not in RECORD:
        raise ValueError(f"record must be one of {RECORD}, got {record!r}")
    out: dict[str, Any] = {"help": help, "cli": cli, "choices": choices, "record": record}
    if legacy is not dataclasses.MISSING:
        out["legacy"] = legacy
    return out


def check(ok: bool, message: str) -> None:
    """Raise InputError(message) unless `ok` (option range checks in `__post_init__`)."""
    if not ok:
        raise InputError(message)


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """`value` as the field's declared type (an integer becomes a float for float fields)."""
    args = typing.get_args(hint)
    optional = type(None) in args
    kind = next(a for a in args if a is not type(None)) if args else hint
    if value is None and optional:
        return None
    if kind is float and isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if kind in (bool, str) and isinstance(value, kind):
        return value
    raise InputError(f"{name} must be {_KINDS.get(kind, kind)}{' or null' if optional else ''}"
                     f", got {value!r}")


@dataclass(frozen=True)
class OptimizerOptions:
    """Options every optimizer takes; each optimizer's subclass adds its own (all defaulted).

    Args:
        seed: run seed; every random draw of the optimizer derives from it.
    """

    seed: int = field(default=0, metadata=meta(
        "run seed (edgelearn train --seed, which also orders the data)"))

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            choices = f.metadata.get("choices")
            if choices is not None and value is not None and value not in choices:
                raise InputError(f"{f.name} must be one of {tuple(choices)}, got {value!r}")
            object.__setattr__(self, f.name, value)
        check(self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")

    # -- derived views ---------------------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        """Every option, in declaration order (the keywords the optimizer takes)."""
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def opt_keys(cls) -> list[str]:
        """The keys `edgelearn train --opt KEY=VALUE` accepts: every option but the run seed
        (that is --seed), sorted."""
        base = {f.name for f in dataclasses.fields(OptimizerOptions)}
        return sorted(n for n in cls.names() if n not in base)

    @classmethod
    def cli_flags(cls) -> dict[str, str]:
        """`edgelearn train` flag -> option name, for the options a flag of their own sets."""
        return {f.metadata["cli"]: f.name for f in dataclasses.fields(cls)
                if f.metadata.get("cli")}

    def config(self) -> dict[str, Any]:
        """The options as JSON data (journal header, optimizer state), per field's `record`."""
        out = {}
        for f in dataclasses.fields(self):
            value, record = getattr(self, f.name), f.metadata.get("record", "always")
            if record == "always" or (record == "when-set" and value != f.default):
                out[f.name] = value
        return out

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def create(cls: type[OptionsT], owner: str, values: Mapping[str, Any]) -> OptionsT:
        """Options of optimizer `owner` from keyword values; an unknown key is refused with
        the valid ones."""
        unknown = sorted(set(values) - set(cls.names()))
        if unknown:
            raise InputError(f"optimizer {owner!r} has no option {unknown[0]!r} "
                             f"(valid keys: {', '.join(cls.names())})")
        return cls(**values)

    @classmethod
    def from_config(cls: type[OptionsT], owner: str, config: Any) -> OptionsT:
        """Options back from `config()` data (a journal header's "config").

        A key the header lacks takes the value its run used: the field's "legacy" metadata when
        the option is newer than the header or its default changed since, else its default.
        """
        if not isinstance(config, dict):
            raise InputError(f"optimizer {owner!r}: config must be a JSON object, got "
                             f"{type(config).__name__}")
        legacy = {f.name: f.metadata["legacy"] for f in dataclasses.fields(cls)
                  if "legacy" in f.metadata and f.name not in config}
        return cls.create(owner, {**legacy, **config})

    def as_kwargs(self) -> dict[str, Any]:
        """Every option as keyword arguments of the optimizer (`make_optimizer(name, **...)`)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
