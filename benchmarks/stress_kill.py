"""Kill/resume stress: SIGKILL `edgelearn train` at random moments, resume, compare sha256.

Usage:
    python benchmarks/stress_kill.py                 # 60 kills (a few minutes on 2 cores)
    python benchmarks/stress_kill.py --kills 20 --steps 400

A torch-free tiny MLP bundle is built by hand (onnx.helper), plus a synthetic data file. One
uninterrupted `edgelearn train` run gives the reference sha256. A second run into another
directory is started again and again and SIGKILLed at random moments drawn from a seeded RNG:
mostly when its journal reaches a random length (so kills land between steps, inside
checkpoint writes, right after a checkpoint ...), sometimes after a random delay (during start-up
or resume). After some kills the journal's last record is also torn (a random number of its
bytes cut off), as a power loss would leave an unsynced tail. Each restart resumes; the final
weights must equal the reference bit for bit, and so must `edgelearn replay` of the final
journal. Prints ONE JSON object; never asserts (tests/test_reliability.py asserts on the same
code with fewer kills).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

D_IN, D_HID, N_CLS = 16, 32, 4
_REC = struct.Struct("<II")


def make_bundle(out: Path, *, seed: int = 0) -> Path:
    """A valid classification bundle: logits = relu(x @ W1 + b1) @ W2 + b2, all trainable."""
    import onnx
    from onnx import TensorProto, helper

    from edgelearn.bundle import FORMAT, FORMAT_VERSION, MANIFEST, sha256_file
    from edgelearn.params import ParamSpec, ParamStore

    out.mkdir(parents=True, exist_ok=True)
    shapes = {"W1": (D_IN, D_HID), "b1": (D_HID,), "W2": (D_HID, N_CLS), "b2": (N_CLS,)}
    rng = np.random.default_rng(seed)
    values = {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in shapes.items()}
    ParamStore([ParamSpec(k, s) for k, s in shapes.items()], values=values).save(
        out / "weights.safetensors")
    f = TensorProto.FLOAT
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W1"], ["h0"]), helper.make_node("Add", ["h0", "b1"],
                                                                            ["h1"]),
         helper.make_node("Relu", ["h1"], ["h"]), helper.make_node("MatMul", ["h", "W2"], ["o0"]),
         helper.make_node("Add", ["o0", "b2"], ["logits"])],
        "tiny_mlp",
        [helper.make_tensor_value_info("x", f, ["batch", D_IN]),
         *[helper.make_tensor_value_info(k, f, list(s)) for k, s in shapes.items()]],
        [helper.make_tensor_value_info("logits", f, ["batch", N_CLS])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(out / "model.onnx"))

    def entry(p: Path) -> dict[str, Any]:
        return {"path": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}

    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "task": "classification",
        "inputs": [{"name": "x", "shape": ["batch", D_IN], "dtype": "float32"}],
        "outputs": [{"name": "logits", "shape": ["batch", N_CLS], "dtype": "float32"}],
        "params": [{"name": k, "shape": list(s), "dtype": "float32", "trainable": True}
                   for k, s in shapes.items()],
        "files": {"weights": entry(out / "weights.safetensors"),
                  "onnx": entry(out / "model.onnx")},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return out


def make_data(path: Path, *, n: int = 512, seed: int = 1) -> Path:
    """Gaussian blobs: x float32 [n, D_IN], y int64 [n] in [0, N_CLS)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((N_CLS, D_IN)) * 2.0
    y = rng.integers(0, N_CLS, n)
    x = (centers[y] + rng.standard_normal((n, D_IN))).astype(np.float32)
    np.savez(path, x=x, y=y.astype(np.int64))
    return path


class RecordCounter:
    """Counts complete journal records by walking length headers, incrementally."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.count, self.ends = path, 8, 0, [8]

    def poll(self) -> int:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                buf = f.read()
        except FileNotFoundError:
            return 0
        pos = 0
        while pos + 8 <= len(buf):
            (length, _) = _REC.unpack_from(buf, pos)
            if pos + 8 + length > len(buf):
                break
            pos += 8 + length
            self.count += 1
            self.ends.append(self.offset + pos)
        self.offset += pos
        return self.count


def train_cmd(bundle: Path, data: Path, out: Path, steps: int, extra: list[str]) -> list[str]:
    """The `edgelearn train` command line used by every run of the stress."""
    return [sys.executable, "-m", "edgelearn.cli", "train", str(bundle), "--data", str(data),
            "--out", str(out), "--steps", str(steps), "--lr", "0.05", "--eps", "0.01",
            "--probes", "2", "--restore", "drift", "--seed", "7", "--batch-size", "32",
            "--checkpoint-every", "7", "--threads", "1", "--json", *extra]


def _sha_of(stdout: str) -> str:
    return json.loads(stdout)["sha256"]


def kill_resume_loop(bundle: Path, data: Path, work: Path, *, steps: int, kills: int,
                     seed: int = 0, extra: list[str] | None = None,
                     max_gap: int = 25) -> dict[str, Any]:
    """Reference run, then `kills` SIGKILLs + resumes, then the final resume and a replay.

    Returns the figures (kills done, torn tails, mismatches, shas, timings).
    """
    extra = list(extra or [])
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    ref = subprocess.run(train_cmd(bundle, data, work / "ref", steps, extra), check=True,
                         capture_output=True, text=True)
    ref_sha = _sha_of(ref.stdout)
    ref_s = time.perf_counter() - t0
    run = work / "killed"
    journal = run / "journal.bin"
    done_kills = torn = finished_early = 0
    lengths: list[int] = []
    t1 = time.perf_counter()
    while done_kills < kills:
        counter = RecordCounter(journal)
        start = counter.poll()
        proc = subprocess.Popen(train_cmd(bundle, data, run, steps, extra),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if rng.random() < 0.15:  # a random moment in time: start-up, resume, or training
            time.sleep(float(rng.uniform(0.0, 0.6)))
        else:  # a random journal length
            target = start + int(rng.integers(1, max_gap))
            while proc.poll() is None and counter.poll() < target:
                time.sleep(0.0005)
        if proc.poll() is not None:
            finished_early += 1
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_kills += 1
        n = RecordCounter(journal).poll()
        lengths.append(n)
        if n > 1 and rng.random() < 0.3:  # power-loss style torn tail of the last record
            c = RecordCounter(journal)
            c.poll()
            last = c.ends[-1] - c.ends[-2]
            with open(journal, "rb+") as f:
                f.truncate(c.ends[-1] - int(rng.integers(1, last)))
            torn += 1
    final = subprocess.run(train_cmd(bundle, data, run, steps, extra), check=True,
                           capture_output=True, text=True)
    final_sha = _sha_of(final.stdout)
    rep = subprocess.run([sys.executable, "-m", "edgelearn.cli", "replay", str(bundle),
                          str(journal), "--out", str(work / "replayed.safetensors"), "--json"],
                         check=True, capture_output=True, text=True)
    replay_sha = _sha_of(rep.stdout)
    return {
        "steps": steps, "kills": done_kills, "resumes": done_kills + 1,
        "torn_tails_injected": torn, "finished_before_kill": finished_early,
        "journal_records_at_kill_min": min(lengths, default=0),
        "journal_records_at_kill_max": max(lengths, default=0),
        "mismatch_final_vs_reference": int(final_sha != ref_sha),
        "mismatch_replay_vs_reference": int(replay_sha != ref_sha),
        "mismatches": int(final_sha != ref_sha) + int(replay_sha != ref_sha),
        "sha256_reference": ref_sha, "sha256_final": final_sha, "sha256_replay": replay_sha,
        "reference_run_s": ref_s, "kill_loop_s": time.perf_counter() - t1,
    }


def main() -> None:
    """Parse arguments, run the stress, print one JSON object."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kills", type=int, default=60)
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        bundle = make_bundle(work / "bundle")
        data = make_data(work / "data.npz")
        res: dict[str, Any] = {"note": "2 shared vCPUs under load; timings are noisy"}
        res["plain"] = kill_resume_loop(bundle, data, work / "plain", steps=args.steps,
                                        kills=args.kills, seed=args.seed)
        # Same with a time-based fsync policy and the numerical guards on.
        res["guards"] = kill_resume_loop(
            bundle, data, work / "guards", steps=args.steps, kills=args.kills,
            seed=args.seed + 1,
            extra=["--fsync-every", "1000", "--fsync-seconds", "0.05", "--reject-above", "0.5",
                   "--diverge-factor", "1.5", "--diverge-patience", "5"])
        res["total_kills"] = res["plain"]["kills"] + res["guards"]["kills"]
        res["total_mismatches"] = res["plain"]["mismatches"] + res["guards"]["mismatches"]
        res["rollbacks_in_guard_run"] = sum(
            1 for r in _records(work / "guards" / "killed" / "journal.bin")
            if r.get("kind") == "rollback")
        res["rejected_steps_in_guard_run"] = sum(
            1 for r in _records(work / "guards" / "killed" / "journal.bin")
            if r.get("kind") == "step" and not r.get("accepted", True))
    print(json.dumps(res, sort_keys=True))


def _records(path: Path) -> list[dict[str, Any]]:
    from edgelearn.journal import read_journal

    return read_journal(path)[0]


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
