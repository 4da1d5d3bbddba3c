"""argparse value types shared by the command-line modules (`edgelearn` and `edgelearn fleet`)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """An integer > 0 from a command-line value, or argparse's one-line usage error.

    Args:
        text: the value as typed.
    """
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v
