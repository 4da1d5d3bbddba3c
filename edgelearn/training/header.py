"""The journal's header record and what the training loop adds to step records.

The header (the journal's first record) holds everything resume and replay must agree on:
the optimizer and its config, the trainable set, the base weights' sha256, the objective and
how the steps were fed (a data set's size, batch size and order seed; or live samples). A
command whose settings differ from the header is refused with every change named
(`header_changes`). Step records are the optimizer's own record plus the identity of the batch
the step was fed (`LOOP_KEYS`, stripped before the optimizer replays the record): new runs
write `batch_digest` (`edgelearn.data.batch_digest`, from per-example digests) and say so in
the header (`"batch_identity": "example-sha256"`); a journal without that key is an older
run's, whose records hold `batch_sha256` (sha256 of the batch's arrays): it keeps writing
that field when resumed, and replay checks each record by the field it holds.
"""

from __future__ import annotations

import json
from typing import Any

from edgelearn.bundle import Bundle
from edgelearn.errors import InputError
from edgelearn.optim import Optimizer, optimizer_from_config
from edgelearn.params import ParamStore
from edgelearn.training.divergence import DEFAULT_SMOOTHING

#: keys the loop adds to an optimizer's step record (the optimizer never sees them)
LOOP_KEYS = ("kind", "batch_sha256", "batch_digest")
#: the header key naming a run's batch identity scheme, and its values: per-example digests
#: (`batch_digest`, new runs), or the whole batch's sha256 (`batch_sha256`, a header without
#: the key: runs journaled before per-example digests)
BATCH_IDENTITY = "batch_identity"
EXAMPLE_DIGESTS = "example-sha256"
BATCH_SHA256 = "batch-sha256"


def make_header(bundle: Bundle, store: ParamStore, opt: Optimizer, **run: Any) -> dict[str, Any]:
    """The journal's first record: everything replay and resume must agree on.

    Args:
        run: how the run is fed and guarded (batch_size, data_seed, n_examples, objective,
            feed, samples, data_sha256, taps_backend, divergence).
    """
    return {
        "kind": "header", "version": 1, "optimizer": opt.name, "config": opt.config(),
        "trainable": store.trainable_names, "n_trainable": store.n_trainable("float32"),
        "base_sha256": bundle.manifest["files"]["weights"]["sha256"],
        BATCH_IDENTITY: EXAMPLE_DIGESTS, **run,
    }


def batch_identity(header: dict[str, Any]) -> str:
    """The batch identity scheme a journal's step records use (`EXAMPLE_DIGESTS` or
    `BATCH_SHA256`)."""
    return str(header.get(BATCH_IDENTITY, BATCH_SHA256))


def optimizer_from_header(header: dict[str, Any]) -> Optimizer:
    """Rebuild the optimizer a journal was written with."""
    try:
        return optimizer_from_config(header["optimizer"], header["config"])
    except (KeyError, TypeError) as e:
        raise InputError(f"journal header does not describe an optimizer ({e})") from None


def header_options(header: dict[str, Any]) -> dict[str, Any] | None:
    """The options a journal header's optimizer ran with, keys an older header lacks filled
    with the values its run used (`OptimizerOptions.from_config`); None when the header does
    not describe an optimizer this version knows."""
    try:
        return optimizer_from_header(header).config()
    except (InputError, KeyError, TypeError, ValueError, OverflowError):  # a hostile config
        return None


def optimizer_record(record: dict[str, Any]) -> dict[str, Any]:
    """A journaled step record as the optimizer wrote it (the loop's own keys removed)."""
    return {k: v for k, v in record.items() if k not in LOOP_KEYS}


#: header keys -> the setting's name in messages (config keys are the optimizer's options)
_SETTING_NAMES = {"data_seed": "seed", "base_sha256": "bundle weights", "data_sha256": "data",
                  "n_examples": "examples", "n_trainable": "trainable params",
                  "taps_backend": "taps backend", "version": "journal version",
                  "feed": "fed by", "samples": "recorded samples",
                  BATCH_IDENTITY: "batch identity"}


def header_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """`name old -> new` for every setting two journal headers disagree on (config first).

    Args:
        old: the header in the run directory's journal.
        new: the header the current command would write.
    """
    out: list[str] = []
    for key, prefix in (("config", ""), ("divergence", "divergence ")):
        a, b = old.get(key), new.get(key)
        same_optimizer = key != "config" or old.get("optimizer") == new.get("optimizer")
        if key == "config" and same_optimizer:  # an option newer than a run: its old value
            a, b = header_options(old) or a, header_options(new) or b
        if isinstance(a, dict) and isinstance(b, dict) and same_optimizer:
            out += [f"{prefix}{k} {_show(a.get(k), k in a)} -> {_show(b.get(k), k in b)}"
                    for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)
                    and not (key == "divergence" and _former_rule(a, b, k))]
        elif a != b and key == "divergence":
            out.append(f"divergence {_show_policy(a)} -> {_show_policy(b)}")
    for key in sorted((set(old) | set(new)) - {"config", "divergence"}):
        if key == BATCH_IDENTITY and key not in old:
            continue  # an older run continues with the batch identity it was journaled with
        if old.get(key) != new.get(key):
            out.append(f"{_SETTING_NAMES.get(key, key)} {_show(old.get(key), key in old)} -> "
                       f"{_show(new.get(key), key in new)}")
    return list(dict.fromkeys(out))  # config seed and data_seed say the same thing once


def _former_rule(old: dict[str, Any], new: dict[str, Any], key: str) -> bool:
    """A divergence policy key that differs only because the run was journaled before the
    loss level's smoothing existed (and the new policy asks for the default): it goes on with
    the rule it was journaled with."""
    return key == "smoothing" and key not in old and new.get(key) == DEFAULT_SMOOTHING


def _show(value: Any, present: bool = True) -> str:
    if not present:
        return "unset"
    if isinstance(value, str):
        hexdigest = len(value) == 64 and all(c in "0123456789abcdef" for c in value)
        return f"sha256 {value[:12]}" if hexdigest else value
    if isinstance(value, float):
        return repr(value)
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 48 else text[:45] + "..."


def _show_policy(policy: Any) -> str:
    if not isinstance(policy, dict):
        return "off"
    return " ".join(f"{k}={_show(v)}" for k, v in sorted(policy.items()))
