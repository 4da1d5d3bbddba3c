"""Rounded figures for the commands' human output (--json keeps the full values)."""

from __future__ import annotations


def sig(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits, without an exponent for everyday magnitudes.

    Args:
        value: any finite float: 0.0123456 -> "0.0123", 1234.5 -> "1230"; exponent form only
            below 1e-4 or from 1e6 up ("1.2e-05").
        digits: significant digits.
    """
    if value == 0 or not 1e-4 <= abs(value) < 1e6:
        return f"{value:.{digits}g}"
    text = f"{value:.{digits}g}"
    if "e" in text:  # 1234.5 with 3 digits: "1.23e+03" -> "1230"
        text = f"{float(text):.0f}"
    return text


def ms(value: float) -> str:
    """A time in milliseconds, 3 significant digits: "0.0412 ms", "12.3 ms", "1230 ms"."""
    return f"{sig(value)} ms"


def mb(value: float) -> str:
    """A memory figure given in MiB: one decimal below 100 MB ("97.5 MB"), whole MB above
    ("2048 MB"), kB below 0.1 MB ("19.2 kB")."""
    if abs(value) < 0.1:
        return f"{value * 1024:.1f} kB"
    return f"{value:.1f} MB" if abs(value) < 100 else f"{value:.0f} MB"


def err(value: float) -> str:
    """A small error (parity): 3 significant digits in exponent form, "2.86e-06"."""
    return f"{value:.2e}"
