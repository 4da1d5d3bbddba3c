"""Float math that gives the same bits on every CPU: no libm, no BLAS, no SIMD dispatch.

Replay promises the weights of a journal bit for bit on any device. IEEE-754 makes +, -, *, /
and sqrt correctly rounded, hence identical everywhere, but libm's exp/cos (glibc picks FMA or
non-FMA code by CPU; numpy dispatches its own SIMD versions) and BLAS reductions (summation
order and FMA use depend on the kernel the CPU selects) are only accurate, not reproducible.
The helpers here use Python floats (IEEE doubles, one rounding per operation: CPython never
fuses a multiply and an add) and numpy elementwise ufuncs in a fixed order, nothing else.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# fdlibm's split of ln 2: _LN2_HI has its low bits zero, so k * _LN2_HI is exact for |k| < 2^11.
_LN2_HI = 6.93147180369123816490e-01
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
# Taylor coefficients 1/n! (n = 0..13): |r| <= ln2 / 2 leaves a truncation error below 1e-17.
_EXP_COEFS = tuple(1.0 / math.factorial(n) for n in range(14))
# sin Taylor coefficients (-1)^n / (2n+1)! (n = 0..12): |y| <= pi/2 leaves < 1e-20.
_SIN_COEFS = tuple((-1.0) ** n / math.factorial(2 * n + 1) for n in range(13))


def exp(x: float) -> float:
    """e**x in plain double operations (relative error ~1e-16; the same bits on every CPU).

    Args:
        x: a finite float (results below ~1e-308 flush towards 0 via ldexp).
    """
    if x < -745.0:
        return 0.0
    k = round(x * _INV_LN2)  # round half to even: exact and portable
    r = (x - k * _LN2_HI) - k * _LN2_LO
    p = _EXP_COEFS[-1]
    for c in reversed(_EXP_COEFS[:-1]):
        p = p * r + c
    return math.ldexp(p, k)


def cos_pi(frac: float) -> float:
    """cos(pi * frac) for frac in [0, 1], in plain double operations (portable bits).

    cos(pi f) = sin(pi (1/2 - f)) with |pi (1/2 - f)| <= pi/2: one odd Taylor series.
    """
    y = math.pi * (0.5 - frac)
    y2 = y * y
    p = _SIN_COEFS[-1]
    for c in reversed(_SIN_COEFS[:-1]):
        p = p * y2 + c
    return y * p


def seq_sum(values: Sequence[float]) -> float:
    """Left-to-right float sum (Python's sum() changed to compensated summation in 3.12)."""
    total = 0.0
    for v in values:
        total = total + float(v)
    return total


def mix(coefs: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """sum_k coefs[k] * rows[k], accumulated row by row in the rows' dtype (never BLAS).

    Args:
        coefs: (K,) weights, cast to rows' dtype.
        rows: (K, m) float32 or float64.
    Returns: (m,) array of rows' dtype; the same bits on every CPU (one rounding per multiply
        and per add, in the order k = 0, 1, ...).
    """
    c = np.asarray(coefs, rows.dtype)
    out = rows[0] * c[0]
    tmp = np.empty_like(out)
    for k in range(1, rows.shape[0]):
        np.multiply(rows[k], c[k], out=tmp)
        out += tmp
    return out
