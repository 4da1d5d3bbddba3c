"""The shared parity check (edgelearn.parity): bound atol + rtol * max|reference| per output, the
worst element named with its values and scale, structural mismatches refused. No torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from edgelearn.errors import InputError
from edgelearn.parity import ATOL, RTOL, Parity, compare, tolerance, worst


def test_measured_cpu_difference_passes_the_scaled_bound_not_a_fixed_one() -> None:
    """The issue's case: logits ~15, off by 1.14e-5 (onnxruntime 1.32, AVX2-only CPU)."""
    want = np.float32([[15.0, -3.0, 0.5]])
    got = want.copy()
    got[0, 0] = np.float32(15.0000114)
    fixed = compare({"logits": got}, {"logits": want}, atol=1e-5, rtol=0)
    assert not fixed.ok
    scaled = compare({"logits": got}, {"logits": want})
    assert scaled.ok
    assert scaled.bound == pytest.approx(ATOL + RTOL * 15.0)
    assert scaled.max_abs_err == pytest.approx(1.14e-5, rel=0.02)


def test_bound_scales_per_output_not_across_outputs() -> None:
    """A big output does not loosen the bound of a small one."""
    big = np.full((2, 3), 1000.0, np.float32)
    small = np.full((2, 3), 0.01, np.float32)
    got = {"big": big + np.float32(5e-3), "small": small + np.float32(5e-4)}
    res = compare(got, {"big": big, "small": small})
    assert res.ok is False
    assert res.output == "small"  # big passes: 5e-3 <= 1e-5 + 1e-5 * 1000
    assert res.scale == pytest.approx(0.01)
    assert res.bound == pytest.approx(ATOL + RTOL * 0.01)
    assert res.max_abs_err == pytest.approx(5e-3, rel=1e-3)  # largest over every output


def test_worst_element_named_with_values_scale_and_bound() -> None:
    want = np.arange(12, dtype=np.float32).reshape(3, 4)
    got = want.copy()
    got[2, 1] += np.float32(0.5)
    res = compare({"y": got}, {"y": want}, where="batch 3")
    assert not res.ok
    assert res.index == (2, 1)
    assert (res.got, res.want) == (9.5, 9.0)
    assert res.scale == 11.0
    text = res.describe()
    for part in ("y[2, 1]", "got 9.5", "want 9", "max|y| 11", "bound", "atol 1e-05",
                 "rtol 1e-05", "[batch 3]", "> bound"):
        assert part in text, (part, text)


def test_within_bound_passes_and_at_bound_edge() -> None:
    want = np.float32([100.0, -200.0])
    bound = tolerance(want)
    assert bound == pytest.approx(ATOL + RTOL * 200.0)
    ok = compare({"o": want + np.float32(bound * 0.9)}, {"o": want})
    assert ok.ok
    assert "<= bound" in ok.describe()
    bad = compare({"o": want + np.float32(bound * 1.5)}, {"o": want})
    assert not bad.ok


def test_exact_tolerance_zero_means_equality() -> None:
    a = np.float32([1.0, 2.0])
    assert compare({"o": a}, {"o": a.copy()}, atol=0, rtol=0).ok
    b = a.copy()
    b[1] = np.nextafter(b[1], np.float32(3))
    res = compare({"o": b}, {"o": a}, atol=0, rtol=0)
    assert not res.ok
    assert res.index == (1,)


def test_nan_and_inf_placement() -> None:
    want = np.float32([np.nan, np.inf, 1.0])
    assert compare({"o": want.copy()}, {"o": want}).ok  # same NaN / inf places match
    moved = np.float32([0.0, np.inf, np.nan])
    res = compare({"o": moved}, {"o": want})
    assert not res.ok
    assert res.max_abs_err == np.inf
    neg = np.float32([np.nan, -np.inf, 1.0])
    assert not compare({"o": neg}, {"o": want}).ok
    assert res.scale == 1.0  # the scale ignores non-finite references


def test_shape_mismatch_and_missing_output_fail_clearly() -> None:
    want = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(2, np.float32)}
    res = compare({"a": np.zeros((2, 4), np.float32), "b": np.zeros(2, np.float32)}, want)
    assert not res.ok
    assert "shape [2, 4]" in res.describe()
    assert "[2, 3]" in res.describe()
    res = compare({"a": np.zeros((2, 3), np.float32)}, want)
    assert not res.ok
    assert "output b is missing" in res.describe()
    # extra outputs of the runtime under test are ignored
    assert compare({**want, "extra": np.ones(1)}, want).ok


def test_integer_and_float64_references() -> None:
    assert compare({"i": np.int64([3, 4])}, {"i": np.int64([3, 4])}, atol=0, rtol=0).ok
    assert not compare({"i": np.int64([3, 5])}, {"i": np.int64([3, 4])}, atol=0, rtol=0).ok
    head = np.float64([[1e3, 2.0]])  # prepare's numpy head reference is float64
    assert compare({"l": head.astype(np.float32)}, {"l": head}).ok


def test_worst_combines_batches() -> None:
    a = compare({"o": np.float32([1.0])}, {"o": np.float32([1.0])}, where="batch 1")
    b = compare({"o": np.float32([10.5])}, {"o": np.float32([10.0])}, where="batch 8")
    c = compare({"o": np.float32([1e4 + 0.05])}, {"o": np.float32([1e4])}, where="batch 3")
    assert c.ok
    both = worst([a, b, c])
    assert not both.ok
    assert both.where == "batch 8"  # the failing one, not the largest absolute error
    assert both.max_abs_err == pytest.approx(0.5)
    passing = worst([a, c])
    assert passing.ok
    assert passing.where == "batch 3"  # the closest to its bound
    assert passing.max_abs_err == pytest.approx(0.05, rel=1e-2)
    assert worst([]).ok


def test_to_json_keeps_recorded_fields() -> None:
    res = compare({"o": np.float32([2.0])}, {"o": np.float32([2.0])})
    js = res.to_json()
    assert {"max_abs_err", "atol", "rtol", "scale", "bound", "worst_output", "worst_err"} <= set(js)
    assert json.loads(json.dumps(js)) == js


@pytest.mark.parametrize(("atol", "rtol"), [(-1e-5, 0.0), (0.0, -1.0), (float("nan"), 0.0)])
def test_bad_tolerances_are_input_errors(atol: float, rtol: float) -> None:
    with pytest.raises(InputError, match="tolerances"):
        compare({"o": np.zeros(1)}, {"o": np.zeros(1)}, atol=atol, rtol=rtol)


def test_module_imports_without_torch() -> None:
    code = ("import sys; sys.modules['torch'] = None; import edgelearn.parity as p; "
            "print(p.compare({'o': [1.0]}, {'o': [1.0]}).ok)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "True"


def test_parity_is_frozen() -> None:
    res = Parity(True, 0.0, ATOL, RTOL)
    with pytest.raises(AttributeError):
        res.ok = False  # type: ignore[misc]


def test_zero_dim_outputs_compare() -> None:
    """A scalar output (a loss, a 0-d graph output) compares like any other."""
    assert compare({"loss": np.float32(2.0)}, {"loss": np.float64(2.0)}).ok
    bad = compare({"loss": np.asarray(2.5)}, {"loss": np.asarray(2.0)})
    assert not bad.ok
    assert bad.max_abs_err == 0.5
    assert bad.index == ()
