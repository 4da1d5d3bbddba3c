"""Examples run as users run them (short settings)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


DIGITS = ROOT / "examples" / "personalize_digits.py"


def _digits(out: Path, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(DIGITS), "--out", str(out), *argv],
                          check=check, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    """The example run once (host half + 400 device steps): its --out and --json result."""
    pytest.importorskip("sklearn")
    out = tmp_path_factory.mktemp("digits")
    return out, json.loads(_digits(out, "--steps", "400", "--json").stdout)


def _copy_host_half(src: Path, dst: Path) -> Path:
    """A new --out holding `src`'s host half (reused by the example) and its device run."""
    shutil.copytree(src, dst)
    return dst


@pytest.mark.torch
def test_personalize_digits_example(digits_run) -> None:
    out, res = digits_run
    assert res["torch_loaded_on_device"] is False
    assert res["accuracy_after"] > res["accuracy_before"] + 0.1
    assert Path(res["weights"]).is_file()
    assert (out / "host.json").is_file()


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("personalize_digits")]
    return line


@pytest.mark.torch
def test_personalize_digits_rerun_with_other_settings_says_why(digits_run, tmp_path) -> None:
    """The device half refuses a changed lr / fewer steps in the existing run: its one line
    reaches the user, exit 2, no traceback; --restart starts afresh."""
    out = _copy_host_half(digits_run[0], tmp_path / "d")
    line = _one_error_line(_digits(out, "--steps", "400", "--lr", "0.02", check=False))
    assert line.startswith("personalize_digits: error: ")
    assert "lr" in line or "settings" in line
    line = _one_error_line(_digits(out, "--steps", "100", check=False))
    assert "400" in line
    assert "100" in line
    res = json.loads(_digits(out, "--steps", "30", "--lr", "0.02", "--restart", "--json").stdout)
    assert res["steps"] == 30
    again = _digits(out, "--steps", "30", "--lr", "0.02")  # the same run: nothing to add
    assert "host: reusing" in again.stderr
    assert "after 30 ZO-SGD steps on device" in again.stdout
    assert "no new steps" in again.stdout


@pytest.mark.torch
def test_personalize_digits_ctrl_c_is_one_line_and_stops_the_device_half(
        digits_run, tmp_path, terminal_sigint) -> None:
    out = _copy_host_half(digits_run[0], tmp_path / "d")
    proc = subprocess.Popen([sys.executable, str(DIGITS), "--out", str(out), "--steps",
                             "1000000", "--restart"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        for line in proc.stderr:  # wait until the device half is running
            if line.startswith("device:"):
                break
        deadline = time.monotonic() + 60
        while not (out / "run" / "journal.bin").is_file() and time.monotonic() < deadline:
            time.sleep(0.1)
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal: the whole process group
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == "personalize_digits: interrupted"
    with pytest.raises(ProcessLookupError):  # the device half is gone too
        os.killpg(proc.pid, 0)


@pytest.mark.torch
def test_har_loso_example(tmp_path: Path) -> None:
    # only seglearn's data file is used; importing seglearn itself would need pandas
    if importlib.util.find_spec("seglearn") is None:
        pytest.skip("seglearn (the watch dataset) is not installed")
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "har_loso.py"), "--quick", "--subjects", "1",
         "--budget", "1800", "--device-budget", "1500", "--out", str(tmp_path), "--json"],
        check=True, capture_output=True, text=True, timeout=600,
    )
    res = json.loads(out.stdout)
    assert res == json.loads((tmp_path / "results.json").read_text())
    # progress: a line per subject on the host, per subject and method on the device
    assert "host   subject  1:" in out.stderr
    for method in res["per_subject"][0]:
        if isinstance(res["per_subject"][0][method], dict) and method != "backprop":
            assert f"device subject  1 {method:10s}:" in out.stderr
    assert res["torch_loaded_on_device"] is False
    (row,) = res["per_subject"]
    # the device's "before" is the exported model: it must score what torch scored (parity is
    # ~1e-6 on logits, so at most a near-tie window or two may flip)
    assert row["before"] == pytest.approx(row["before_torch"], abs=2 / row["n_held_out"])
    # a real learning signal: the ceiling and the best forward-only variant both improve on
    # held-out windows of a subject the model never saw, at the same forward budget
    assert row["backprop"]["accuracy"] > row["before"] + 0.03
    best_zo = max(row[m]["accuracy"] for m in ("zo-head", "zo-last", "zo-full"))
    assert best_zo > row["before"] + 0.03
    # the device half's methods get --device-budget, backprop keeps --budget
    assert (res["budget_forwards"], res["device_budget_forwards"]) == (1800, 1500)
    assert 1500 < row["backprop"]["forwards"] <= 1800
    assert all(row[m]["forwards"] <= 1500 for m in ("zo-head", "zo-last", "zo-full"))
    # the watch data was converted once into a pickle-free .npz
    assert (tmp_path / "watch.npz").is_file()


def test_har_loso_oracle_share_takes_each_subjects_best_grid_lr(monkeypatch) -> None:
    """--outer-sweep's upper bound: per subject the best outer-sweep accuracy, then the
    share of backprop's mean gain; methods without a sweep on every subject are left out."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("har_loso_t", ROOT / "examples" / "har_loso.py")
    har = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(har)
    rows = [{"a": {"outer_sweep": {"0.1": {"accuracy": 0.7}, "0.3": {"accuracy": 0.9}}},
             "b": {"accuracy": 0.8}},
            {"a": {"outer_sweep": {"0.1": {"accuracy": 0.8}, "0.3": {"accuracy": 0.6}}},
             "b": {"accuracy": 0.8, "outer_sweep": {"0.1": {"accuracy": 1.0}}}}]
    got = har.oracle_shares(rows, ["a", "b"], before=0.6, backprop=1.0)
    assert list(got) == ["a"]
    assert got["a"] == pytest.approx((0.85 - 0.6) / 0.4)
    assert har.oracle_shares(rows, ["a"], before=1.0, backprop=1.0) == {"a": None}



def test_har_loso_table_names_the_device_budget(monkeypatch) -> None:
    """With --device-budget the table's first line gives both budgets; without, one."""
    monkeypatch.syspath_prepend(str(ROOT / "examples"))
    spec = importlib.util.spec_from_file_location("har_loso_t", ROOT / "examples" / "har_loso.py")
    har = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(har)
    res = {"budget_forwards": 3000, "device_budget_forwards": 6000, "batch_size": 32,
           "split": "time", "recovered_fraction_of_mean_gain": {"fzoo-full": 0.83},
           "per_subject": [{"subject": 2, "before": 0.6, "backprop": {"accuracy": 0.97},
                            "fzoo-full": {"accuracy": 0.88}}],
           "mean_accuracy": {"before": 0.6, "backprop": 0.97, "fzoo-full": 0.88},
           "tpsgd_available": True}
    first = har.table(res).splitlines()[0]
    assert first.startswith("held-out accuracy, 6000 (backprop 3000) forwards of 32 per method")
    res["device_budget_forwards"] = 3000
    assert har.table(res).splitlines()[0].startswith("held-out accuracy, 3000 forwards of 32")

APP = ROOT / "examples" / "app_loop.py"


def _app(out: Path, optimizer: str, *argv: str) -> list[str]:
    return [sys.executable, str(APP), "--out", str(out), "--optimizer", optimizer,
            "--samples", "200", "--json", *argv]


def _file_sha(path: str | Path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@pytest.mark.parametrize("optimizer", ["zo-sgd", "tpsgd"])
def test_app_loop_sigkilled_resumes_bit_identical(tmp_path: Path, optimizer: str) -> None:
    """Samples arrive one at a time; the app is SIGKILLed mid-run and started again: its
    weights equal an uninterrupted app's and `edgelearn replay` of its journal (tpSGD from
    the samples it recorded)."""
    from edgelearn.journal import read_journal

    def run(cmd: list[str]) -> dict:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    ref = run(_app(tmp_path / "ref", optimizer))
    assert ref["steps"] == 200
    assert ref["resumed_at"] == 0
    app = tmp_path / "app"
    proc = subprocess.Popen(_app(app, optimizer, "--delay-ms", "10"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if (app / "journal.bin").is_file() and \
                    len(read_journal(app / "journal.bin")[0]) > 40:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the app finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    killed_at = len(read_journal(app / "journal.bin")[0]) - 1
    assert 40 <= killed_at < 200
    res = run(_app(app, optimizer))  # the same app, started again
    assert res["resumed_at"] == killed_at
    assert res["steps"] == 200
    assert res["sha256"] == ref["sha256"]
    assert _file_sha(res["weights"]) == _file_sha(ref["weights"])
    replayed = subprocess.run(
        [sys.executable, "-m", "edgelearn.cli", "replay", str(ROOT / "edgelearn" / "data" /
                                                              "demo"),
         res["journal"], "--out", str(tmp_path / "replayed.safetensors"), "--json"],
        capture_output=True, text=True, timeout=300)
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["sha256"] == ref["sha256"]
    assert (app / "samples.bin").is_file() == (optimizer == "tpsgd")
