"""End to end: pretrain on a workstation, export, personalize on device, compare.

Host (torch): an MLP is trained by backprop on the UCI/sklearn 8x8 digits written by one group
of people, then exported to a bundle. Device (numpy + onnxruntime only, no torch): a "new user"
whose digits are drawn one pixel to the right and with heavier strokes (a real shift: the
pretrained model loses accuracy on them) personalizes the model's head with ZO-SGD on part of
their own data, and is evaluated on the rest. The device half runs in a separate process that
never imports torch, exactly as on a Raspberry Pi.

    python examples/personalize_digits.py [--steps 1500] [--lr 0.01] [--out runs/digits]

Progress goes to stderr, the result to stdout (`--json`: one JSON object). A second run with
the same --out and --seed reuses the host half's bundle and data, and resumes the device run
(more --steps continue it); a run with other settings is refused by the device half with the
reason, unless `--restart` clears it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np
from runner import run_cli, run_device_half

PROG = "personalize_digits"


def user_shift(x: np.ndarray) -> np.ndarray:
    """The new user's handwriting: one pixel to the right and heavier strokes (x in [0, 1])."""
    img = x.reshape(-1, 8, 8)
    img = np.roll(img, 1, axis=2)
    img[:, :, 0] = 0.0
    return np.clip(1.6 * img, 0.0, 1.0).reshape(-1, 64).astype(np.float32)


def host(out: Path, seed: int) -> None:
    """Pretrain on writers 1..N (backprop, torch) and export the bundle (skipped when `out`
    already holds the host half of this seed)."""
    stamp = out / "host.json"
    if (out / "bundle" / "manifest.json").is_file() and stamp.is_file() \
            and json.loads(stamp.read_text()) == {"seed": seed}:
        print(f"host: reusing {out / 'bundle'} and the user's data (seed {seed})",
              file=sys.stderr)
        return
    print("host: pretraining an MLP on 1000 digits (torch), exporting the bundle",
          file=sys.stderr)
    if (out / "run" / "journal.bin").is_file():  # a run of the bundle about to be replaced
        shutil.rmtree(out / "run")
    stamp.unlink(missing_ok=True)
    import torch
    from edgelearn.export import export_bundle
    from edgelearn.export.zoo import MLP
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(x))
    base, user = order[:1000], order[1000:]
    torch.manual_seed(seed)
    model = MLP(64, (64,), 10)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    xb, yb = torch.from_numpy(x[base]), torch.from_numpy(y[base])
    for _ in range(150):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xb), yb).backward()
        opt.step()
    export_bundle(model, xb[:2], out / "bundle", trainable="head.*", overwrite=True)
    ux, uy = user_shift(x[user]), y[user]
    half = len(ux) // 2
    np.savez(out / "user_train.npz", x=ux[:half], y=uy[:half])
    np.savez(out / "user_test.npz", x=ux[half:], y=uy[half:])
    np.savez(out / "base_test.npz", x=x[user[half:]], y=y[user[half:]])
    stamp.write_text(json.dumps({"seed": seed}))


def device(out: Path, steps: int, seed: int, lr: float) -> dict:
    """On device: evaluate, personalize the head with ZO-SGD, evaluate again (no torch)."""
    import edgelearn as el

    bundle = el.load_bundle(out / "bundle")
    user_train = el.load_data(out / "user_train.npz")
    user_test = el.load_data(out / "user_test.npz")
    runtime = el.RuntimeConfig(backend="onnxruntime", device=None)
    before = el.evaluate(bundle, user_test, runtime=runtime)
    config = el.TrainConfig(optimizer="zo-sgd", options={"lr": lr, "eps": 1e-3, "probes": 4},
                            trainable="head.*", batch_size=32, seed=seed)
    with el.Session(bundle, out / "run", config, runtime) as session:
        res = session.run(user_train, steps,
                          callbacks=[el.ProgressBar()] if sys.stderr.isatty() else [])
        after = session.evaluate(user_test)
    return {
        "accuracy_before": before.accuracy,
        "accuracy_after": after.accuracy,
        "loss_before": before.loss,
        "loss_after": after.loss,
        "steps": res.steps,
        "step_ms_median": res.step_ms_median,
        "forward_ms_median": res.forward_ms_median,
        "peak_rss_mb": res.peak_rss_mb,
        "weights": res.weights,
        "journal": res.journal,
        "torch_loaded_on_device": "torch" in sys.modules,
    }


def report(res: dict) -> str:
    """The result in words."""
    if res["step_ms_median"] is None:  # resumed a run that already had its steps
        timing = "no new steps (the run under --out already had them)"
    else:
        timing = (f"step {res['step_ms_median']:.3g} ms (forward "
                  f"{res['forward_ms_median']:.3g} ms)")
    return (f"new user, before personalization: accuracy {res['accuracy_before']:.3f}\n"
            f"after {res['steps']} ZO-SGD steps on device: accuracy "
            f"{res['accuracy_after']:.3f}\n"
            f"{timing}, peak RSS {res['peak_rss_mb']:.0f} MB, torch loaded on device: "
            f"{res['torch_loaded_on_device']}\n"
            f"weights: {res['weights']}\njournal: {res['journal']}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits", help="working directory")
    p.add_argument("--steps", type=int, default=1500, help="ZO-SGD steps on device")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--restart", action="store_true",
                   help="clear the device run under --out and start it again")
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    p.add_argument("--device-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    if args.device_only:
        print(json.dumps(device(out, args.steps, args.seed, args.lr)))
        return
    out.mkdir(parents=True, exist_ok=True)
    host(out, args.seed)
    if args.restart and (out / "run" / "journal.bin").is_file():
        shutil.rmtree(out / "run")
    print(f"device: personalizing the head with ZO-SGD, {args.steps} steps, in a torch-free "
          "process", file=sys.stderr)
    # The device half in a fresh interpreter: only numpy + onnxruntime are imported there.
    res = run_device_half([sys.executable, __file__, "--device-only", "--out", str(out),
                           "--steps", str(args.steps), "--seed", str(args.seed),
                           "--lr", str(args.lr)])
    print(json.dumps(res) if args.json else report(res))


if __name__ == "__main__":
    run_cli(PROG, main, child="--device-only" in sys.argv)
