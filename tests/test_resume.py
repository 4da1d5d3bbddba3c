"""Resume, restart and Ctrl-C of `edgelearn train`; long runs keep constant memory.

Torch-free (the stress script's tiny MLP bundle) except the tpSGD memory test.
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import load_stress_module
from sessions import replay_journal, train

from edgelearn.budget import run_memory_bytes
from edgelearn.bundle import load_bundle
from edgelearn.data import load_npz
from edgelearn.errors import InputError
from edgelearn.journal import read_journal
from edgelearn.params import ParamStore
from edgelearn.training import DivergencePolicy
from edgelearn.training.header import header_changes
from edgelearn.training.rundir import CKPT_META, JOURNAL, LOCK, METRICS, SESSION, WEIGHTS

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
stress = load_stress_module()




def _cli(bundle: Path, data: Path, run: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "edgelearn.cli", "train", str(bundle), "--data", str(data),
            "--out", str(run), "--threads", "1", *flags]


def _run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- changed settings, --restart, --steps ------------------------------------------------------
def test_changed_settings_named_one_line_exit_2(tiny, tmp_path) -> None:
    bundle, data = tiny
    run = tmp_path / "u1"
    first = _run(_cli(bundle, data, run, "--steps", "20", "--lr", "0.01", "--json"))
    assert first.returncode == 0, first.stderr
    before = _sha(run / JOURNAL)
    bad = _run(_cli(bundle, data, run, "--steps", "40", "--lr", "0.02", "--batch-size", "16",
                    "--seed", "3"))
    assert bad.returncode == 2
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1, bad.stderr
    msg = lines[0]
    assert msg.startswith(f"edgelearn: error: run dir {run} holds a run with different settings")
    for change in ("lr 0.01 -> 0.02", "batch_size 32 -> 16", "seed 0 -> 3", "--restart"):
        assert change in msg, msg
    assert msg.count("seed 0 -> 3") == 1  # the optimizer's seed and the data seed, said once
    assert _sha(run / JOURNAL) == before  # refused before anything was written
    js = _run(_cli(bundle, data, run, "--steps", "40", "--lr", "0.02", "--json"))
    assert js.returncode == 2
    assert "lr 0.01 -> 0.02" in json.loads(js.stdout)["error"]


def test_header_changes_names_settings() -> None:
    old = {"kind": "header", "optimizer": "zo-sgd", "config": {"lr": 0.01, "seed": 0},
           "data_seed": 0, "batch_size": 32, "base_sha256": "a" * 64}
    new = {**old, "config": {"lr": 0.02, "seed": 1}, "data_seed": 1,
           "divergence": {"factor": 3.0, "patience": 20, "lr_scale": 0.5, "every": 100}}
    assert header_changes(old, new) == [
        "lr 0.01 -> 0.02", "seed 0 -> 1",
        "divergence off -> every=100 factor=3.0 lr_scale=0.5 patience=20"]
    other = {**old, "optimizer": "tpsgd", "config": {"lr": 0.1, "local_loss": "mse"},
             "base_sha256": "b" * 64}
    # another optimizer: its option set differs as a whole; the bundle shows as a digest
    assert header_changes(old, other) == ["bundle weights sha256 aaaaaaaaaaaa -> sha256 "
                                          "bbbbbbbbbbbb", "optimizer zo-sgd -> tpsgd"]
    assert header_changes(old, dict(old)) == []


def test_restart_starts_over_and_keeps_other_files(tiny, tmp_path) -> None:
    bundle, data = tiny
    run = tmp_path / "u1"
    every = ("--checkpoint-every", "10")
    assert _run(_cli(bundle, data, run, "--steps", "30", "--lr", "0.01", *every)).returncode == 0
    assert json.loads((run / CKPT_META).read_text())["step"] == 30
    (run / "notes.txt").write_text("mine")
    (run / f".{CKPT_META}.tmp-99999").write_text("{")  # a killed writer's leftover
    res = _run(_cli(bundle, data, run, "--steps", "25", "--lr", "0.02", "--restart", "--json",
                    *every))
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["resumed_from"] == 0
    fresh = json.loads(_run(_cli(bundle, data, tmp_path / "fresh", "--steps", "25", "--lr",
                                 "0.02", "--json")).stdout)
    assert out["sha256"] == fresh["sha256"]
    assert len(read_journal(run / JOURNAL)[0]) == 26
    assert (run / "notes.txt").read_text() == "mine"
    assert json.loads((run / CKPT_META).read_text())["step"] == 20  # the new run's
    assert sorted(p.name for p in run.iterdir()) == sorted(
        ["notes.txt", LOCK, JOURNAL, WEIGHTS, CKPT_META, "checkpoint.safetensors", SESSION,
         METRICS])


def test_restart_refuses_a_directory_that_is_not_a_run(tiny, tmp_path) -> None:
    bundle, data = tiny
    for name, content in (("notes.txt", b"mine"), (JOURNAL, b"not a journal at all")):
        run = tmp_path / name.replace(".", "_")
        run.mkdir()
        (run / name).write_bytes(content)
        res = _run(_cli(bundle, data, run, "--steps", "5", "--restart"))
        assert res.returncode == 2
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
        assert "not an edgelearn" in res.stderr
        assert (run / name).read_bytes() == content
        assert not (run / WEIGHTS).exists()
    # nothing there yet: --restart simply starts the run
    res = _run(_cli(bundle, data, tmp_path / "new", "--steps", "5", "--restart"))
    assert res.returncode == 0, res.stderr


def test_more_steps_resume_fewer_refused(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), load_npz(data)
    run = tmp_path / "run"
    train(bundle, ds, run, steps=30, seed=1, options={"lr": 0.05})
    more = train(bundle, ds, run, steps=45, seed=1, options={"lr": 0.05})
    assert more["resumed_from"] == 30
    ref = train(bundle, ds, tmp_path / "ref", steps=45, seed=1, options={"lr": 0.05})
    assert more["sha256"] == ref["sha256"]
    same = train(bundle, ds, run, steps=45, seed=1, options={"lr": 0.05})
    assert (same["resumed_from"], same["sha256"]) == (45, ref["sha256"])
    with pytest.raises(InputError, match="already has 45 steps"):
        train(bundle, ds, run, steps=44, seed=1, options={"lr": 0.05})
    res = _run(_cli(bundle_dir, data, run, "--steps", "10", "--seed", "1", "--lr", "0.05"))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines() == [
        f"edgelearn: error: run dir {run} already has 45 steps; --steps 10 is fewer (pass "
        "--steps 45 or more to continue it, or --restart)"]


# -- Ctrl-C ---------------------------------------------------------------------------------------
def _interrupt(cmd: list[str], journal: Path, records: int) -> subprocess.CompletedProcess[str]:
    """Start `cmd`, send SIGINT once its journal holds `records` records, wait for it."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    counter = stress.RecordCounter(journal)
    deadline = time.monotonic() + 120
    while proc.poll() is None and counter.poll() < records and time.monotonic() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.mark.parametrize("flags", [[], ["--diverge-factor", "1.5", "--diverge-patience", "3",
                                        "--checkpoint-every", "9", "--json"]],
                         ids=["plain", "divergence-json"])
def test_ctrl_c_saves_weights_and_resumes_bit_identical(tiny, tmp_path, flags,
                                                       terminal_sigint) -> None:
    bundle_dir, data = tiny
    steps = ["--steps", "6000", "--lr", "0.05", "--eps", "0.01", "--fsync-every", "50"]
    ref = _run(_cli(bundle_dir, data, tmp_path / "ref", *steps, *flags))
    assert ref.returncode == 0, ref.stderr
    run = tmp_path / "run"
    cmd = _cli(bundle_dir, data, run, *steps, *flags)
    got = _interrupt(cmd, run / JOURNAL, 60)
    assert got.returncode == 130, got.stderr
    done = sum(r.get("kind") == "step" for r in read_journal(run / JOURNAL)[0])
    assert 0 < done < 6000, "the run was not interrupted"
    line = f"interrupted at step {done}; run the same command again to resume"
    assert line in got.stderr.splitlines(), got.stderr
    assert "Traceback" not in got.stderr
    if "--json" in flags:
        assert json.loads(got.stdout) == {"error": line, "interrupted_at_step": done}
    # the weights reached so far are on disk and are what the journal says
    store, n = replay_journal(load_bundle(bundle_dir), run / JOURNAL)
    assert n == done
    saved = ParamStore(list(store.specs.values()))
    saved.load(run / WEIGHTS)
    assert saved.digest() == store.digest()
    if "--diverge-factor" not in flags:  # (with a policy the checkpoint stays a good point)
        assert json.loads((run / CKPT_META).read_text())["step"] == done
    again = _run(cmd)
    assert again.returncode == 0, again.stderr
    assert _sha(run / WEIGHTS) == _sha(tmp_path / "ref" / WEIGHTS)


# -- memory: nothing grows with the run's length ------------------------------------------------
_RSS_SCRIPT = textwrap.dedent("""
    import json, sys
    import edgelearn as el

    def rss_kb():
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    bundle_dir, data, run, optimizer, steps = sys.argv[1:6]
    marks = {}

    class Marks(el.Callback):
        def on_step(self, session, result):
            if result.step + 1 in (2000, int(steps)):
                marks[result.step + 1] = rss_kb()

    config = el.TrainConfig(optimizer=optimizer, options={"lr": 0.01}, batch_size=8,
                            fsync_every=1_000_000, checkpoint_every=1_000_000)
    runtime = el.RuntimeConfig(backend="onnxruntime", threads=1, device=None)
    with el.Session(el.load_bundle(bundle_dir), run, config, runtime) as s:
        s.run(el.load_data(data), int(steps), callbacks=[Marks()])
    print(json.dumps(marks))
""")


def _rss_growth_mb(bundle: Path, data: Path, run: Path, optimizer: str, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(bundle), str(data), str(run),
                          optimizer, str(steps)], capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    marks = json.loads(out.stdout.strip().splitlines()[-1])
    return (marks[str(steps)] - marks["2000"]) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_50k_steps_rss_stays_flat(tiny, tmp_path) -> None:
    bundle, data = tiny
    growth = _rss_growth_mb(bundle, data, tmp_path / "run", "zo-sgd", 50_000)
    assert growth < 10, f"RSS grew {growth:.1f} MB from step 2k to 50k"
    assert len(read_journal(tmp_path / "run" / JOURNAL)[0]) == 50_001


@pytest.mark.slow
@pytest.mark.torch
@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc (Linux)")
def test_50k_tpsgd_steps_rss_stays_flat(tiny, tmp_path) -> None:
    torch = pytest.importorskip("torch")
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import MLP

    _, data = tiny
    torch.manual_seed(0)
    export_bundle(MLP(stress.D_IN, (16,), stress.N_CLS), torch.randn(1, stress.D_IN),
                  tmp_path / "b")
    growth = _rss_growth_mb(tmp_path / "b", data, tmp_path / "run", "tpsgd", 50_000)
    assert growth < 10, f"RSS grew {growth:.1f} MB from step 2k to 50k"


def test_memory_plan_counts_what_the_run_keeps(tiny, tmp_path) -> None:
    bundle_dir, data = tiny
    bundle, ds = load_bundle(bundle_dir), load_npz(data)
    trainable = 4 * sum(p.numel for p in bundle.params if p.trainable)
    kept = run_memory_bytes(n_examples=len(ds), trainable_bytes=trainable, snapshots=True,
                            timing_samples=4096, timers=3)
    # per example: 4 cached int64 permutations and the batch digests (sha256 + a flag); the
    # noise generator's bounded key and sign-block caches
    assert kept == (4 * 8 + 33) * len(ds) + 2 * trainable + 8 * 4096 * 3 + (3 << 20)
    plain = train(bundle, ds, tmp_path / "a", steps=2, memory_budget_mb=1e5)["memory_plan"]
    guarded = train(bundle, ds, tmp_path / "b", steps=2, memory_budget_mb=1e5,
                    divergence=DivergencePolicy())["memory_plan"]
    assert guarded["extra_bytes"] - plain["extra_bytes"] == 2 * trainable
    assert plain["extra_bytes"] >= 4 * 8 * len(ds) + 8 * 4096 * 3
