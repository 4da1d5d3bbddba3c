"""One parity check for the whole project: do a runtime's outputs match a reference's?

Every comparison of a device runtime against a reference (torch vs onnxruntime at export,
onnxruntime vs LiteRT, an original ONNX model vs its bundle in `prepare`, bundle + weights vs
the baked models in `bake`) goes through `compare`, so the tolerance means one thing:

    output o passes when  max |got_o - want_o|  <=  atol + rtol * max |want_o|

The bound scales with each output's magnitude because float32 rounding does: two correct
runtimes that sum in a different order (blocked GEMM, FMA or not, AVX2 vs AVX-512 kernels)
differ by a few float32 rounding steps (ulps) of the values summed, and one ulp of a value v is
~1.2e-7 * |v|. Measured: onnxruntime 1.32 on an AVX2-only CPU differs from torch by 1.14e-5 on
logits of ~15, about 12 ulps of 15 (ulp(15) = 9.5e-7), which a fixed absolute 1e-5 refused.
The defaults `RTOL = 1e-5` (~84 ulps of the output's largest magnitude: room for reductions of
thousands of terms summed in another order) and `ATOL = 1e-5` (for outputs near zero, whose
errors come from larger intermediate values) hold across CPUs, while a wrong export (a wrong
weight, a wrong op) is off by far more than 1e-5 relative and is still refused.

numpy only: importable on a device without torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from edgelearn.errors import InputError

ATOL = 1e-5
RTOL = 1e-5


@dataclass(frozen=True)
class Parity:
    """The result of one comparison (or the worst of several, see `worst`).

    Attributes:
        ok: every output within its bound.
        max_abs_err: largest |got - want| over every output compared (inf for a shape,
            NaN-placement or missing-output mismatch); the figure manifests record.
        output: the output closest to (or furthest past) its bound, None if nothing compared.
        index: the element of `output` with the largest error (None when shapes differ).
        got / want: the two values at `index`.
        err: |got - want| at `index`.
        scale: max |want| of `output` (finite values), the magnitude the bound scales with.
        bound: atol + rtol * scale, the largest error `output` tolerates.
        atol / rtol: the tolerances used.
        where: what was compared (e.g. "batch 8, weights live"), for messages.
        problem: a structural mismatch (shape, missing output), "" if none.
    """

    ok: bool
    max_abs_err: float
    atol: float
    rtol: float
    output: str | None = None
    index: tuple[int, ...] | None = None
    got: float = 0.0
    want: float = 0.0
    err: float = 0.0
    scale: float = 0.0
    bound: float = 0.0
    where: str = ""
    problem: str = field(default="")

    @property
    def ratio(self) -> float:
        """err / bound of the worst output (> 1 fails; inf for structural mismatches)."""
        if self.problem:
            return float("inf")
        if self.bound > 0:
            return self.err / self.bound
        return 0.0 if self.err == 0 else float("inf")

    def describe(self) -> str:
        """One line naming the worst output element, its values, scale and bound."""
        at = f" [{self.where}]" if self.where else ""
        if self.problem:
            return f"{self.problem}{at}"
        if self.output is None:
            return f"no outputs compared{at}"
        idx = ", ".join(str(i) for i in self.index or ())
        rel = ">" if self.err > self.bound else "<="
        return (f"max abs error {self.max_abs_err:.3g}; worst {self.output}[{idx}]: got "
                f"{self.got:.8g}, want {self.want:.8g}, |diff| {self.err:.3g} {rel} bound "
                f"{self.bound:.3g} = atol {self.atol:g} + rtol {self.rtol:g} * max|"
                f"{self.output}| {self.scale:.4g}{at}")

    def to_json(self) -> dict[str, Any]:
        """The fields a manifest `parity` section records: max_abs_err (over every output)
        and atol as before; rtol; the worst output (by err / bound), its error, scale and
        bound."""
        return {"max_abs_err": self.max_abs_err, "atol": self.atol, "rtol": self.rtol,
                "worst_output": self.output, "worst_err": self.err, "scale": self.scale,
                "bound": self.bound}


def check_tolerances(atol: float, rtol: float) -> None:
    """Raise InputError unless atol and rtol are finite and >= 0."""
    if not (np.isfinite(atol) and np.isfinite(rtol) and atol >= 0 and rtol >= 0):
        raise InputError(f"parity tolerances must be finite and >= 0, got atol={atol:g} "
                         f"rtol={rtol:g}")


def tolerance(want: Any, *, atol: float = ATOL, rtol: float = RTOL) -> float:
    """atol + rtol * max|want| (finite values): the bound `compare` applies to one output.

    Args:
        want: reference array (any shape, numeric).
        atol / rtol: absolute and relative (to the output's largest magnitude) tolerance.
    """
    return atol + rtol * _scale(np.asarray(want, dtype=np.float64))


def _scale(w: np.ndarray) -> float:
    """max |w| over the finite values (0 when there are none)."""
    a = np.abs(w[np.isfinite(w)])
    return float(a.max()) if a.size else 0.0


def _one(name: str, got: Any, want: Any, atol: float, rtol: float, where: str) -> Parity:
    """Compare one output; NaN matches NaN and equal infinities match."""
    g, w = np.asarray(got), np.asarray(want)
    if g.shape != w.shape:
        return Parity(False, float("inf"), atol, rtol, output=name, where=where,
                      problem=f"output {name} has shape {list(g.shape)}, the reference "
                              f"{list(w.shape)}")
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    scale = _scale(w64)
    bound = atol + rtol * scale
    if not g64.size:
        return Parity(True, 0.0, atol, rtol, output=name, scale=scale, bound=bound,
                      where=where)
    with np.errstate(invalid="ignore"):
        d = np.asarray(np.abs(g64 - w64))  # an array also for 0-d outputs (a scalar loss)
    same = (g64 == w64) | (np.isnan(g64) & np.isnan(w64))
    d[same] = 0.0
    d[np.isnan(d)] = np.inf  # NaN on one side only, or opposite infinities
    i = int(np.argmax(d))
    idx = tuple(int(k) for k in np.unravel_index(i, d.shape))
    err = float(d.flat[i])
    return Parity(bool(err <= bound), err, atol, rtol, output=name, index=idx,
                  got=float(g64.flat[i]), want=float(w64.flat[i]), err=err,
                  scale=scale, bound=bound, where=where)


def compare(got: Mapping[str, Any], want: Mapping[str, Any], *, atol: float = ATOL,
            rtol: float = RTOL, where: str = "") -> Parity:
    """Compare every output of `want` with the same-named output of `got`.

    Args:
        got: output name -> array from the runtime under test (extra names are ignored).
        want: output name -> reference array (same shapes; any numeric dtype).
        atol / rtol: output o passes when max|got_o - want_o| <= atol + rtol * max|want_o|.
        where: what was compared, carried into `Parity.describe()`.
    Returns: the `Parity` of the worst output (ok only if every output passes).
    """
    check_tolerances(atol, rtol)
    results = []
    for name, w in want.items():
        if name not in got:
            results.append(Parity(False, float("inf"), atol, rtol, output=name, where=where,
                                  problem=f"output {name} is missing"))
        else:
            results.append(_one(name, got[name], w, atol, rtol, where))
    return worst(results, atol=atol, rtol=rtol)


def worst(results: Iterable[Parity], *, atol: float = ATOL, rtol: float = RTOL) -> Parity:
    """Combine comparisons (outputs, batch sizes, weight modes): ok only if all are ok; the
    element reported is the one with the largest err / bound; max_abs_err is the largest.

    Args:
        results: the comparisons to combine.
        atol / rtol: recorded on the result when `results` is empty.
    """
    results = list(results)
    if not results:
        return Parity(True, 0.0, atol, rtol)
    top = max(results, key=lambda r: (not r.ok, r.ratio))
    return replace(top, ok=all(r.ok for r in results),
                   max_abs_err=max(r.max_abs_err for r in results))
