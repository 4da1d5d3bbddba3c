"""Command line: `edgelearn export|info|eval|train|replay ...` (every command takes --json).

With --json a command prints exactly one JSON object on stdout. Exit codes: 0 ok, 2 bad
usage or bad input (one line on stderr naming the problem, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from edgelearn.errors import EdgelearnError, InputError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        self.exit(2, f"edgelearn: error: {message}\n")


def _emit(args: argparse.Namespace, result: dict[str, Any], human: Callable[[], str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(result, sort_keys=True))
    else:
        print(human())


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; use e.g. 1,64") from None
    if not dims or any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"bad shape {text!r}; dims must be positive")
    return dims


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


# -- commands --------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> None:
    """Host side: import a factory `module.py:name` (or `pkg.module:name`) and export it."""
    import importlib
    import importlib.util

    try:
        import torch

        from export import export_bundle
    except ImportError as e:
        raise EdgelearnError(f"export needs torch and onnx on this host ({e}); "
                             "pip install torch==2.13.0 'edgelearn[export]'") from None
    spec, _, attr = args.spec.partition(":")
    if not attr:
        raise InputError(f"model spec {args.spec!r} must look like module.py:factory")
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"{spec}: no such file")
        ms = importlib.util.spec_from_file_location(path.stem, path)
        assert ms is not None
        assert ms.loader is not None
        module = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    factory = getattr(module, attr, None)
    if factory is None:
        raise InputError(f"{spec} has no attribute {attr!r}")
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as e:
        raise InputError(f"--kwargs is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise InputError("--kwargs must be a JSON object")
    torch.manual_seed(args.seed)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise InputError(f"{args.spec}: {e}") from None
    example = torch.randn(*args.example_shape)
    res = export_bundle(model, example, args.out, trainable=args.trainable, task=args.task,
                        overwrite=args.overwrite)
    _emit(args, res, lambda: f"wrote {res['bundle']}: {res['params']} params "
                             f"({res['trainable_params']} trainable), formats "
                             f"{','.join(res['formats'])}, parity max abs err "
                             f"{res['parity_max_abs_err']:.2e}")


def cmd_info(args: argparse.Namespace) -> None:
    """Describe a bundle."""
    from edgelearn.bundle import load_bundle

    info = load_bundle(args.bundle).info()

    def human() -> str:
        lines = [f"bundle {info['bundle']} (task {info['task']}, formats "
                 f"{', '.join(info['formats'])})"]
        for t in info["inputs"]:
            lines.append(f"  input  {t['name']} {t['dtype']}{t['shape']}")
        for t in info["outputs"]:
            lines.append(f"  output {t['name']} {t['dtype']}{t['shape']}")
        lines.append(f"  {info['params']} params, {info['trainable_params']} trainable")
        for t in info["tensors"]:
            mark = "T" if t["trainable"] else " "
            lines.append(f"   {mark} {t['name']:40s} {t['dtype']}{t['shape']}")
        return "\n".join(lines)

    _emit(args, info, human)


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy / loss of a bundle (optionally with personalized weights) on a data file."""
    from edgelearn.bundle import load_bundle
    from edgelearn.data import load_npz
    from edgelearn.model import Model, peak_rss_mb

    bundle = load_bundle(args.bundle)
    data = load_npz(args.data, task=bundle.task)
    model = Model(bundle, backend=args.backend, trainable=(), weights=args.weights,
                  threads=args.threads)
    t0 = time.perf_counter()
    res = model.evaluate(data, batch_size=args.batch_size, objective=args.objective)
    res["seconds"] = time.perf_counter() - t0
    res["peak_rss_mb"] = peak_rss_mb()
    if "accuracy" not in res:
        res["accuracy"] = None

    def human() -> str:
        acc = "" if res["accuracy"] is None else f"accuracy {res['accuracy']:.4f}, "
        return f"{acc}loss {res['loss']:.4f} on {res['n']} examples " \
               f"(peak RSS {res['peak_rss_mb']:.0f} MB)"

    _emit(args, res, human)


def cmd_train(args: argparse.Namespace) -> None:
    """Personalize a bundle on a data file; resumes when --out already holds the run."""
    from edgelearn.bundle import load_bundle
    from edgelearn.data import load_npz
    from edgelearn.train import train

    bundle = load_bundle(args.bundle)
    data = load_npz(args.data, task=bundle.task)
    options: dict[str, Any] = {"lr": args.lr, "eps": args.eps, "probes": args.probes,
                               "noise": args.noise, "restore": args.restore,
                               "weight_decay": args.weight_decay, "sign": args.sign,
                               "clip": args.clip, "conservative": args.conservative,
                               "schedule": args.schedule}
    if args.schedule != "constant":
        options["total_steps"] = args.steps
    if args.reject_above is not None:
        options["reject_above"] = args.reject_above
    divergence = None
    if args.diverge_factor is not None:
        from edgelearn.train import DivergencePolicy

        divergence = DivergencePolicy(factor=args.diverge_factor,
                                      patience=args.diverge_patience,
                                      lr_scale=args.diverge_lr_scale)
    res = train(bundle, data, args.out, optimizer=args.optimizer, options=options,
                steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                trainable=args.trainable, objective=args.objective, backend=args.backend,
                threads=args.threads, checkpoint_every=args.checkpoint_every,
                fsync_every=args.fsync_every, fsync_seconds=args.fsync_seconds,
                divergence=divergence,
                progress=not args.json and sys.stderr.isatty())

    def human() -> str:
        first = "n/a" if res["loss_first"] is None else f"{res['loss_first']:.4f}"
        last = "n/a" if res["loss_last"] is None else f"{res['loss_last']:.4f}"
        step_ms = res["step_ms_median"]
        timing = "" if step_ms is None else (
            f", step {step_ms:.2f} ms, forward {res['forward_ms_median']:.2f} ms")
        return (f"{res['steps']} steps ({res['resumed_from']} already done), loss {first} -> "
                f"{last}{timing}, peak RSS {res['peak_rss_mb']:.0f} MB\n"
                f"weights: {res['weights']}\njournal: {res['journal']}")

    _emit(args, res, human)


def cmd_replay(args: argparse.Namespace) -> None:
    """Rebuild trained weights from the bundle's base weights and a journal (no data)."""
    from edgelearn.bundle import load_bundle
    from edgelearn.train import replay_journal

    bundle = load_bundle(args.bundle)
    store, steps = replay_journal(bundle, args.journal)
    out = store.save(args.out, metadata={"sha256": store.digest()})
    res = {"weights": str(out), "sha256": store.digest(), "steps": steps}
    _emit(args, res, lambda: f"replayed {steps} steps -> {out} (sha256 {res['sha256']})")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "export": cmd_export,
    "info": cmd_info,
    "eval": cmd_eval,
    "train": cmd_train,
    "replay": cmd_replay,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to check README/--help drift in tests)."""
    p = _Parser(prog="edgelearn", description="On-device learning with forward-only "
                "optimizers on inference runtimes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    def runtime(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--backend", default="onnxruntime", help="onnxruntime (default)")
        sp.add_argument("--threads", type=_positive, default=None,
                        help="runtime intra-op threads (default: runtime's choice)")
        sp.add_argument("--batch-size", type=_positive, default=256, help="examples per forward")

    sp = sub.add_parser("export", help="host: export a torch model to a bundle")
    sp.add_argument("spec", help="model factory, module.py:factory or package.module:factory")
    sp.add_argument("--example-shape", type=_shape, required=True,
                    help="example input shape with batch first, e.g. 1,64")
    sp.add_argument("--out", required=True, help="bundle directory to create")
    sp.add_argument("--trainable", default="*", help="glob(s) of trainable params, e.g. 'head.*'")
    sp.add_argument("--task", default="classification", choices=["classification", "regression"])
    sp.add_argument("--kwargs", default=None, help="JSON object of factory keyword arguments")
    sp.add_argument("--seed", type=int, default=0, help="torch seed for the factory's init")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    common(sp)

    sp = sub.add_parser("info", help="what a bundle holds")
    sp.add_argument("bundle")
    common(sp)

    sp = sub.add_parser("eval", help="accuracy / loss of a bundle on a data file")
    sp.add_argument("bundle")
    sp.add_argument("--data", required=True, help=".npz with x (float32) and y")
    sp.add_argument("--weights", default=None, help="personalized weights (.safetensors)")
    sp.add_argument("--objective", default=None, help="cross-entropy | mse | error-rate")
    runtime(sp)
    common(sp)

    sp = sub.add_parser("train", help="personalize a bundle on device (forward-only)")
    sp.add_argument("bundle")
    sp.add_argument("--data", required=True, help=".npz with x (float32) and y")
    sp.add_argument("--out", required=True, help="run directory (resumed if it exists)")
    sp.add_argument("--optimizer", default="zo-sgd", help="zo-sgd")
    sp.add_argument("--steps", type=int, required=True, help="total steps of the run")
    sp.add_argument("--trainable", default=None,
                    help="glob(s) of parameters to train, e.g. 'head.*' (default: manifest)")
    sp.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    sp.add_argument("--eps", type=float, default=1e-3, help="perturbation scale")
    sp.add_argument("--probes", type=_positive, default=1, help="perturbations per step")
    sp.add_argument("--noise", default="rademacher", choices=["rademacher", "gaussian", "pool"])
    sp.add_argument("--restore", default="auto", choices=["auto", "copy", "drift"],
                    help="how weights come back after +-eps probes (README: restore policy)")
    sp.add_argument("--schedule", default="constant", choices=["constant", "cosine", "linear"])
    sp.add_argument("--weight-decay", type=float, default=0.0)
    sp.add_argument("--sign", action="store_true", help="ZO-SignSGD update")
    sp.add_argument("--clip", type=float, default=None, help="clip |L+ - L-|")
    sp.add_argument("--conservative", action="store_true",
                    help="undo an update that makes the loss worse (1 extra forward)")
    sp.add_argument("--objective", default=None, help="cross-entropy | mse | error-rate")
    sp.add_argument("--seed", type=int, default=0, help="run seed (noise and data order)")
    sp.add_argument("--checkpoint-every", type=_positive, default=100)
    sp.add_argument("--fsync-every", type=_positive, default=1, help="journal records per fsync")
    sp.add_argument("--fsync-seconds", type=float, default=None,
                    help="also fsync the journal when this many seconds passed since the last "
                         "fsync (use with a large --fsync-every for a time-based policy)")
    sp.add_argument("--reject-above", type=float, default=None,
                    help="reject a step (weights restored, no update) when |L+ - L-| exceeds "
                         "this value")
    sp.add_argument("--diverge-factor", type=float, default=None,
                    help="roll back to the last good checkpoint when the loss stays above "
                         "this many times its running minimum (off by default)")
    sp.add_argument("--diverge-patience", type=_positive, default=20,
                    help="steps above the threshold before a rollback")
    sp.add_argument("--diverge-lr-scale", type=float, default=0.5,
                    help="learning-rate multiplier at each rollback")
    runtime(sp)
    sp.set_defaults(batch_size=32)
    common(sp)

    sp = sub.add_parser("replay", help="rebuild weights from base weights + journal")
    sp.add_argument("bundle")
    sp.add_argument("journal")
    sp.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    common(sp)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgelearn` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        COMMANDS[args.command](args)
    except EdgelearnError as e:
        msg = str(e).replace("\n", " ")
        if getattr(args, "json", False):
            print(json.dumps({"error": msg}))
        print(f"edgelearn: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgelearn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
