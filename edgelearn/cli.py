"""Command line: `edgelearn export|info|eval|train|replay|prepare|bake ...` (all take --json).

With --json a command prints exactly one JSON object on stdout. Exit codes: 0 ok, 2 bad
usage or bad input (one line on stderr naming the problem, no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
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


def _runtime(args: argparse.Namespace, bundle: Any = None) -> dict[str, Any]:
    """Backend, threads, providers and memory budget: flags first, then the --device profile,
    else the profile detected for this machine (`edgelearn device`).

    The backend is the first of the profile's preference order whose runtime imports and for
    which the bundle (`bundle`, else `args.bundle`) carries a model. The memory budget of a
    profile applies only when it is named with --device.
    """
    from edgelearn.devices import load_profile, machine_profile, resolve_backend

    named = getattr(args, "device", None)
    prof = load_profile(named) if named else machine_profile()
    if bundle is None and getattr(args, "bundle", None):
        from edgelearn.bundle import load_bundle

        bundle = load_bundle(args.bundle, verify=False)  # the command loads it verified
    backend = resolve_backend(prof, args.backend, bundle)
    budget = getattr(args, "memory_budget_mb", None)
    if budget is None and named and prof:
        budget = prof.memory_budget_mb
    return {
        "backend": backend,
        "profile": prof.name if prof else None,
        "threads": args.threads or (prof.threads if prof else None),
        "providers": _usable_providers(prof.providers)
        if prof and backend in ("onnxruntime", "ort") else None,
        "memory_budget_mb": budget,
    }


def _usable_providers(wanted: Sequence[str]) -> list[str] | None:
    """The profile's ORT providers that this onnxruntime build has (CUDA only on GPU builds)."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    have = set(ort.get_available_providers())
    return [p for p in wanted if p in have] or None


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
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    res = export_bundle(model, example, args.out, trainable=args.trainable, task=args.task,
                        overwrite=args.overwrite, formats=formats)
    _emit(args, res, lambda: f"wrote {res['bundle']}: {res['params']} params "
                             f"({res['trainable_params']} trainable), formats "
                             f"{','.join(res['formats'])}, parity max abs err "
                             f"{res['parity_max_abs_err']:.2e}")


def cmd_info(args: argparse.Namespace) -> None:
    """Describe a bundle: inputs, outputs, parameters, files, parity, what it can train with."""
    from edgelearn.bundle import load_bundle
    from edgelearn.capabilities import bundle_support

    bundle = load_bundle(args.bundle)
    info = bundle.info()
    info["support"] = bundle_support(bundle)
    info["files_mb"] = {p.name: p.stat().st_size / (1 << 20) for p in bundle.files.values()}
    _emit(args, info, lambda: _info_text(info))


def _wrap_items(head: str, items: list[str], width: int = 96) -> list[str]:
    """`head` + comma-separated items, wrapped between items (an item never splits)."""
    lines, line = [], head
    for i, item in enumerate(items):
        piece = item + ("," if i < len(items) - 1 else "")
        if line.strip() and len(line) + len(piece) + 1 > width and line != head:
            lines.append(line.rstrip())
            line = "    "
        line += piece + " "
    return [*lines, line.rstrip()]


def _info_text(info: dict[str, Any]) -> str:
    """Human form of `info --json` (sizes in MB to 1 decimal, errors to 3 digits)."""
    from edgelearn.figures import err, mb

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
    lines += _wrap_items(f"  files ({mb(sum(info['files_mb'].values()))}): ",
                         [f"{n} {mb(v)}" for n, v in info["files_mb"].items()])
    parity = [f"{k} {err(v['max_abs_err'])}" for k, v in info["parity"].items()
              if isinstance(v, dict) and isinstance(v.get("max_abs_err"), float)]
    if parity:
        lines += _wrap_items("  parity vs torch (max abs err): ", parity)
    lines.append("  optimizers:")
    for name, o in info["support"]["optimizers"].items():
        if not o["supported"]:
            lines += textwrap.wrap(f"{name:10s} no: {o.get('why')}", 96, initial_indent="    ",
                                   subsequent_indent=" " * 15)
            continue
        extra = [o["how"]] if o.get("how") else []
        if o.get("backends"):
            extra.append("on " + " and ".join(o["backends"]))
        if o.get("litert_why"):
            extra.append(f"not on litert: {o['litert_why']}")
        if o.get("why_no_fast_path"):
            extra.append(o["why_no_fast_path"])
        lines += textwrap.wrap(f"{name:10s} yes: {'; '.join(extra)}", 96, initial_indent="    ",
                               subsequent_indent=" " * 15)
    lines.append("  backends:")
    for name, b in info["support"]["backends"].items():
        lines.append(f"    {name:11s} " + (f"yes: {b['model']}" if b["supported"] else
                                            f"no: {b['why']}"))
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy / loss of a bundle (optionally with personalized weights) on a data file."""
    from edgelearn.bundle import load_bundle
    from edgelearn.data import load_npz
    from edgelearn.model import Model, peak_rss_mb

    bundle = load_bundle(args.bundle)
    data = load_npz(args.data, task=bundle.task)
    rt = _runtime(args)
    model = Model(bundle, backend=rt["backend"], trainable=(), weights=args.weights,
                  threads=rt["threads"], providers=rt["providers"])
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


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _other_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options of polystep / zo-scale from the shared flags they take."""
    options: dict[str, Any] = {"restore": args.restore}
    if args.optimizer == "zo-scale":
        options.update({k: v for k, v in (("lr", args.lr), ("eps", args.eps),
                                          ("noise", args.noise), ("clip", args.clip))
                        if v is not None})
        options.update(probes=args.probes, schedule=args.schedule)
        if args.schedule != "constant":
            options["total_steps"] = args.steps
    elif args.optimizer == "polystep":
        options["total_steps"] = args.steps  # cosine schedules of eps and radii
    return options


def _opt_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """`--opt KEY=VALUE` flags (JSON values, else strings); they override the other flags."""
    options: dict[str, Any] = {}
    for item in args.opt or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise InputError(f"--opt expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def cmd_train(args: argparse.Namespace) -> None:
    """Personalize a bundle on a data file; resumes when --out already holds the run."""
    from edgelearn.bundle import load_bundle
    from edgelearn.data import load_npz
    from edgelearn.train import train

    bundle = load_bundle(args.bundle)
    data = load_npz(args.data, task=bundle.task)
    rt = _runtime(args)
    options: dict[str, Any] = {"lr": _or(args.lr, 1e-3), "eps": _or(args.eps, 1e-3),
                               "probes": args.probes, "noise": _or(args.noise, "rademacher"),
                               "restore": args.restore, "weight_decay": args.weight_decay,
                               "sign": args.sign, "clip": args.clip,
                               "conservative": args.conservative, "schedule": args.schedule}
    if args.schedule != "constant":
        options["total_steps"] = args.steps
    if args.reject_above is not None:
        options["reject_above"] = args.reject_above
    if args.optimizer == "tpsgd":  # layer-local targets: its own options (README: tpSGD)
        options = {k: v for k, v in (("lr", args.lr), ("local_loss", args.local_loss),
                                     ("target_scale", args.target_scale),
                                     ("hidden_lr", args.hidden_lr),
                                     ("target_on", args.target_on)) if v is not None}
        if args.objective == "mse":
            options["head_loss"] = "mse"
    elif args.optimizer != "zo-sgd":
        options = _other_options(args)
    options.update(_opt_pairs(args))
    divergence = None
    if args.diverge_factor is not None:
        from edgelearn.train import DivergencePolicy

        divergence = DivergencePolicy(factor=args.diverge_factor,
                                      patience=args.diverge_patience,
                                      lr_scale=args.diverge_lr_scale)
    res = train(bundle, data, args.out, optimizer=args.optimizer, options=options,
                steps=args.steps, batch_size=args.batch_size, seed=args.seed,
                trainable=args.trainable, objective=args.objective, backend=rt["backend"],
                threads=rt["threads"], providers=rt["providers"],
                memory_budget_mb=rt["memory_budget_mb"], checkpoint_every=args.checkpoint_every,
                fsync_every=args.fsync_every, fsync_seconds=args.fsync_seconds,
                divergence=divergence,
                progress=not args.json and sys.stderr.isatty())

    def human() -> str:
        first = "n/a" if res["loss_first"] is None else f"{res['loss_first']:.4f}"
        last = "n/a" if res["loss_last"] is None else f"{res['loss_last']:.4f}"
        step_ms = res["step_ms_median"]
        timing = "" if step_ms is None else f", step {step_ms:.2f} ms"
        for key, label in (("forward_ms_median", "forward"),
                           ("population_call_ms_median", "population call")):
            if res.get(key) is not None:
                timing += f", {label} {res[key]:.2f} ms"
        return (f"{res['steps']} steps ({res['resumed_from']} already done), loss {first} -> "
                f"{last}{timing}, peak RSS {res['peak_rss_mb']:.0f} MB\n"
                f"weights: {res['weights']}\njournal: {res['journal']}")

    _emit(args, res, human)


def cmd_replay(args: argparse.Namespace) -> None:
    """Rebuild trained weights from the bundle's base weights and a journal (no data)."""
    from edgelearn.bundle import load_bundle
    from edgelearn.train import replay_journal

    bundle = load_bundle(args.bundle)
    data = None
    if args.data is not None:
        from edgelearn.data import load_npz

        data = load_npz(args.data, task=bundle.task)
    store, steps = replay_journal(bundle, args.journal, data)
    out = store.save(args.out, metadata={"sha256": store.digest()})
    res = {"weights": str(out), "sha256": store.digest(), "steps": steps}
    _emit(args, res, lambda: f"replayed {steps} steps -> {out} (sha256 {res['sha256']})")


def cmd_device(args: argparse.Namespace) -> None:
    """Detect this machine, show its profile, and (with a bundle) what fits its memory budget."""
    from edgelearn.devices import detect, list_profiles, load_profile

    if args.list:
        res: dict[str, Any] = {"profiles": [load_profile(n).to_json() for n in list_profiles()]}
        _emit(args, res, lambda: "\n".join(f"{p['name']:20s} {p['description']}"
                                           for p in res["profiles"]))
        return
    machine = detect()
    name = args.device or machine["profile"]
    prof = load_profile(name) if name else None
    res = {"machine": machine, "profile": prof.to_json() if prof else None}
    if args.bundle:
        res["bundle"] = _device_plans(args, prof, machine)
    _emit(args, res, lambda: _device_text(res))


def _device_plans(args: argparse.Namespace, prof: Any, machine: dict[str, Any]
                  ) -> dict[str, Any]:
    """The `device BUNDLE` section: backend, budget, and the largest batch per optimizer."""
    from edgelearn.budget import plan_batch
    from edgelearn.bundle import load_bundle
    from edgelearn.capabilities import optimizer_support
    from edgelearn.devices import resolve_backend
    from edgelearn.model import Model
    from edgelearn.optim import make_optimizer

    bundle = load_bundle(args.bundle)
    backend = resolve_backend(prof, args.backend, bundle)
    budget = args.memory_budget_mb or (prof.memory_budget_mb if prof else None) or \
        machine["memory_available_mb"]
    model = Model(bundle, backend=backend, trainable=args.trainable,
                  threads=prof.threads if prof else None)
    fits: dict[str, Any] = {}
    for opt_name, support in optimizer_support(bundle).items():
        if support["supported"] is False:
            fits[opt_name] = {"error": f"not for this bundle: {support['why']}"}
            continue
        try:
            opt = make_optimizer(opt_name)
            fits[opt_name] = plan_batch(bundle, batch_size=args.batch_size, budget_mb=budget,
                                        extra_bytes=opt.memory_bytes(model.store))
        except EdgelearnError as e:
            fits[opt_name] = {"error": str(e)}
    return {"path": str(bundle.path), "backend": backend, "budget_mb": budget,
            "trainable_params": model.store.n_trainable("float32"),
            "max_batch": {k: v.get("batch_size") for k, v in fits.items()}, "plans": fits}


def _device_text(res: dict[str, Any]) -> str:
    """Human form of `device --json` (MB to 1 decimal)."""
    from edgelearn.figures import mb

    m, prof = res["machine"], res["profile"]
    lines = [f"machine: {m['arch']}{' ' + m['board'] if m['board'] else ''}, {m['cores']} cores, "
             f"{_mb_or_unknown(m['memory_total_mb'])} RAM "
             f"({_mb_or_unknown(m['memory_available_mb'])} free), Python {m['python']}, "
             f"glibc {m['glibc']}, numpy {m['numpy']}",
             f"backends that import: {', '.join(m['backends']) or 'none'}"]
    lines += [f"  {b}: {why}" for b, why in m.get("backends_missing", {}).items()]
    lines.append(f"profile: {prof['name'] + ' - ' + prof['description'] if prof else 'none'}")
    if prof:
        lines.append(f"  backend preference: {', '.join(prof['backends'])}; memory budget "
                     f"{_mb_or_unknown(prof['memory_budget_mb'])}")
        for rt, c in prof["runtimes"].items():
            numpy_req = f", numpy {c['numpy']}" if "numpy" in c else ""
            lines.append(f"  {rt}: python {c.get('python', '?')}, glibc "
                         f"{c.get('glibc', '?')}{numpy_req}")
    if "bundle" in res:
        b = res["bundle"]
        lines.append(f"bundle {b['path']} on {b['backend']}, budget {mb(b['budget_mb'])}:")
        for k, v in b["plans"].items():
            lines.append(f"  {k}: " + (v["error"] if "error" in v else
                         f"max batch {v['batch_size']} (of {v['requested_batch_size']}), "
                         f"predicted peak {mb(v['predicted_peak_mb'])}"))
    return "\n".join(lines)


def _mb_or_unknown(value: float | None) -> str:
    from edgelearn.figures import mb

    return "unknown" if value is None else mb(value)


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on shipped data: personalize for a new user, accuracy before/after."""
    from edgelearn.bundle import load_bundle
    from edgelearn.demo import DATA, run_demo
    from edgelearn.figures import ms

    rt = _runtime(args, load_bundle(DATA / "demo", verify=False))
    res = run_demo(args.out, backend=rt["backend"], threads=rt["threads"],
                   providers=rt["providers"], steps=args.steps, batch_size=args.batch_size,
                   seed=args.seed, progress=not args.json and sys.stderr.isatty())

    def human() -> str:
        lines = [
            "edgelearn demo: a model pretrained on one population of handwriting, "
            f"personalized on device for a new user (backend {res['backend']})",
            f"  pretrained, population's digits : accuracy {res['accuracy_population']:.3f}",
            f"  pretrained, new user's digits   : accuracy {res['accuracy_before']:.3f}",
        ]
        for name, o in res["optimizers"].items():
            # a population optimizer (polystep) times whole steps only: no per-forward time
            times = [f"{o['seconds']:.1f} s"] + [
                f"{what} {ms(o[key])}" for what, key in (("step", "step_ms_median"),
                                                         ("forward", "forward_ms_median"))
                if o.get(key) is not None]
            lines.append(
                f"  after {name:8s} ({o['steps']} steps of {o['batch_size']}, "
                f"{o['trainable_params']} trainable params): accuracy "
                f"{res['accuracy_after'][name]:.3f}  [{', '.join(times)}]")
            lines.append(f"      weights {o['weights']}  journal {o['journal']}")
        for name, why in res["unavailable"].items():
            lines.append(f"  {name}: not run ({why})")
        lines.append(f"  peak RSS {res['peak_rss_mb']:.0f} MB; torch was not used")
        return "\n".join(lines)

    _emit(args, res, human)


def cmd_bench(args: argparse.Namespace) -> None:
    """Forward / step timing and memory of a bundle on this device."""
    from edgelearn.bench import run_bench
    from edgelearn.bundle import load_bundle
    from edgelearn.figures import mb, ms

    bundle = load_bundle(args.bundle)
    rt = _runtime(args, bundle)
    res = run_bench(bundle, batch_size=args.batch_size, trainable=args.trainable,
                    backend=rt["backend"], threads=rt["threads"], runs=args.runs,
                    steps=args.steps)

    def human() -> str:
        lines = [f"{res['bundle']} on {res['backend']}, batch {res['batch_size']}, "
                 f"{res['trainable_params']} trainable params",
                 f"  forward (baked weights)      {ms(res['forward_ms'])}",
                 f"  forward (live weights)       {ms(res['forward_live_ms'])} "
                 f"({res['live_over_baked']:.2f}x)"]
        for k, v in res["step_ms"].items():
            lines.append(f"  step {k:24s}{ms(v)} ({v / res['forward_live_ms']:.3g} forwards)"
                         if isinstance(v, float) else f"  step {k:24s}{v}")
        lines.append(f"  peak RSS {mb(res['peak_rss_mb'])}")
        return "\n".join(lines)

    _emit(args, res, human)


def cmd_prepare(args: argparse.Namespace) -> None:
    """Turn an inference ONNX model into a bundle (or --list its weight tensors)."""
    from edgelearn.prepare import list_params, prepare_onnx

    if args.list:
        res = list_params(args.model)

        def human_list() -> str:
            lines = [f"model {res['model']}"]
            lines += [f"  input  {t['name']} {t['dtype']}{t['shape']}" for t in res["inputs"]]
            lines += [f"  output {t['name']} {t['dtype']}{t['shape']}" for t in res["outputs"]]
            for p in res["params"]:
                note = f"  [kept in graph: {p['kept_in_graph']}]" if "kept_in_graph" in p else (
                    "  [int8, frozen]" if "quant" in p else "")
                lines.append(f"  {p['name']:48s} {p['dtype']}{p['shape']} {p['bytes']} B{note}")
            lines.append(f"  {res['total_params']} params ({res['total_bytes']} bytes)")
            return "\n".join(lines)

        _emit(args, res, human_list)
        return
    if not args.out:
        raise InputError("prepare needs --out DIR (or --list)")
    res = prepare_onnx(args.model, args.out, trainable=args.trainable, new_head=args.new_head,
                       task=args.task, seed=args.seed, example=args.example, atol=args.atol,
                       overwrite=args.overwrite)
    _emit(args, res, lambda: f"wrote {res['bundle']}: {res['params']} params "
                             f"({res['trainable_params']} trainable), parity max abs err "
                             f"{res['parity_max_abs_err']:.2e}")


def cmd_bake(args: argparse.Namespace) -> None:
    """Write personalized weights back into a plain inference model (inference.onnx)."""
    from edgelearn.prepare import bake_bundle

    res = bake_bundle(args.bundle, args.weights, args.out, example=args.example,
                      atol=args.atol, overwrite=args.overwrite)
    _emit(args, res, lambda: f"wrote {res['bundle']} ({res['inference']['onnx']}), parity max "
                             f"abs err {res['parity_max_abs_err']:.2e}")


COMMANDS: dict[str, Callable[[argparse.Namespace], None]] = {
    "prepare": cmd_prepare,
    "bake": cmd_bake,
    "export": cmd_export,
    "info": cmd_info,
    "eval": cmd_eval,
    "train": cmd_train,
    "replay": cmd_replay,
    "device": cmd_device,
    "demo": cmd_demo,
    "bench": cmd_bench,
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to check README/--help drift in tests)."""
    p = _Parser(prog="edgelearn", description="On-device learning with forward-only "
                "optimizers on inference runtimes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    def runtime(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--backend", default=None,
                        help="onnxruntime | litert (bundle exported with tflite; tpsgd runs "
                        "on both); default: the --device profile's first installed backend")
        sp.add_argument("--device", default=None,
                        help="device profile name (see `edgelearn device --list`) or .toml path")
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
    sp.add_argument("--formats", default="onnx",
                    help="comma-separated model formats: onnx (default), onnx,tflite")
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
    sp.add_argument("--optimizer", default="zo-sgd",
                    help="zo-sgd | tpsgd | polystep | zo-scale")
    sp.add_argument("--opt", action="append", metavar="KEY=VALUE",
                    help="optimizer option (repeatable; JSON values), e.g. --opt radius=0.02")
    sp.add_argument("--steps", type=int, required=True, help="total steps of the run")
    sp.add_argument("--trainable", default=None,
                    help="glob(s) of parameters to train, e.g. 'head.*' (default: manifest)")
    sp.add_argument("--lr", type=float, default=None, help="learning rate (zo-sgd: 1e-3)")
    sp.add_argument("--eps", type=float, default=None, help="perturbation scale (zo-sgd: 1e-3)")
    sp.add_argument("--probes", type=_positive, default=1, help="perturbations per step")
    sp.add_argument("--noise", default=None, choices=["rademacher", "gaussian", "pool"])
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
    sp.add_argument("--local-loss", default="mse", choices=["mse", "l1", "drtp"],
                    help="tpsgd hidden-layer loss against the projected label")
    sp.add_argument("--target-scale", type=float, default=3.0,
                    help="tpsgd: std of the random label projections")
    sp.add_argument("--target-on", default="pooled", choices=["pooled", "activation"],
                    help="tpsgd: put a layer's target after its own pooling (when the "
                         "exporter recorded one) or on its activation output")
    sp.add_argument("--hidden-lr", type=float, default=None,
                    help="tpsgd: learning rate of the hidden layers (default: --lr)")
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
    sp.add_argument("--memory-budget-mb", type=float, default=None,
                    help="peak memory allowed; the batch shrinks to fit (default: profile's)")
    runtime(sp)
    sp.set_defaults(batch_size=32)
    common(sp)

    sp = sub.add_parser("device", help="detect this machine; what fits its memory budget")
    sp.add_argument("bundle", nargs="?", default=None, help="bundle to size a training run for")
    sp.add_argument("--device", default=None, help="profile to use instead of the detected one")
    sp.add_argument("--list", action="store_true", help="list the shipped device profiles")
    sp.add_argument("--backend", default=None, help="backend (default: the profile's)")
    sp.add_argument("--trainable", default=None, help="glob(s) of parameters to train")
    sp.add_argument("--batch-size", type=_positive, default=32, help="batch you want to train")
    sp.add_argument("--memory-budget-mb", type=float, default=None)
    common(sp)

    sp = sub.add_parser("demo", help="the main job end to end on shipped data")
    sp.add_argument("--out", default="edgelearn-demo", help="directory for the runs")
    sp.add_argument("--steps", type=_positive, default=None, help="override the step counts")
    sp.add_argument("--seed", type=int, default=0)
    runtime(sp)
    sp.set_defaults(batch_size=None)  # None: each optimizer's recipe batch (32)
    common(sp)

    sp = sub.add_parser("bench", help="forward / step timing and memory on this device")
    sp.add_argument("bundle")
    sp.add_argument("--trainable", default=None, help="glob(s) of parameters to train")
    sp.add_argument("--runs", type=_positive, default=30, help="timed forwards per variant")
    sp.add_argument("--steps", type=_positive, default=20, help="timed steps per optimizer")
    runtime(sp)
    sp.set_defaults(batch_size=32)
    common(sp)

    sp = sub.add_parser("replay", help="rebuild weights from base weights + journal")
    sp.add_argument("bundle")
    sp.add_argument("journal")
    sp.add_argument("--out", required=True, help="weights file to write (.safetensors)")
    sp.add_argument("--data", default=None,
                    help="the run's data, for optimizers whose replay re-runs forwards (tpsgd)")
    common(sp)

    sp = sub.add_parser("prepare", help="turn an inference ONNX model into a bundle")
    sp.add_argument("model", help="the .onnx file (external data must sit beside it)")
    sp.add_argument("--out", default=None, help="bundle directory to create")
    sp.add_argument("--list", action="store_true", help="show the weight tensors and stop")
    sp.add_argument("--trainable", default=None,
                    help="glob(s) of trainable params (default '*', or 'head.*' with a new head)")
    sp.add_argument("--new-head", default=None, metavar="OUTPUT:NUM_CLASSES",
                    help="append a linear classifier on a model output")
    sp.add_argument("--task", default=None, choices=["classification", "regression"])
    sp.add_argument("--seed", type=int, default=0, help="seed of the new head's weights")
    sp.add_argument("--example", default=None, help=".npz of model inputs for the parity check")
    sp.add_argument("--atol", type=float, default=1e-5, help="parity tolerance")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    common(sp)

    sp = sub.add_parser("bake", help="personalized weights -> plain inference model + bundle")
    sp.add_argument("bundle")
    sp.add_argument("--weights", required=True, help="personalized weights (.safetensors)")
    sp.add_argument("--out", required=True, help="directory to create")
    sp.add_argument("--example", default=None, help=".npz of model inputs for the parity check")
    sp.add_argument("--atol", type=float, default=1e-5, help="parity tolerance")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing directory")
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
