"""Command line: `edgelearn export|info|eval|train|replay|prepare|bake ...` (all take --json).

With --json a command prints exactly one JSON object on stdout. Exit codes: 0 ok, 2 bad
usage or bad input (one line on stderr naming the problem, no traceback).

The CLI is a client of the public surface: it reaches the library only through `import
edgelearn as el` (plus `edgelearn.export` for the host-side export, which needs torch); the
modules it imports directly are its own command-line helpers, `edgelearn.paths` (output-path
checks), `edgelearn.figures` (number formatting) and `edgelearn.demo` (the demo command, itself
an `el` client), as tests/test_layout.py checks.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import edgelearn as el
from edgelearn.argtypes import positive_int as _positive


class UsageError(SystemExit):
    """A command line argparse refused (exit code 2); `message` is the one-line reason."""

    def __init__(self, message: str) -> None:
        super().__init__(2)
        self.message = message


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" for flags with a real default; help that states it is left as is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """argparse with the README's error contract: one `edgelearn: error:` line, exit 2."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        """Print one line (no usage dump) and raise UsageError (a SystemExit with code 2)."""
        message = f"{message} (see '{self.prog} --help')"
        print(f"edgelearn: error: {message}", file=sys.stderr)
        raise UsageError(message)


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



def _runtime_config(args: argparse.Namespace) -> el.RuntimeConfig:
    """The RuntimeConfig of a command's flags: explicit flags first, then the --device
    profile, else the profile detected for this machine (`edgelearn device`)."""
    return el.RuntimeConfig(backend=args.backend, threads=args.threads,
                            memory_budget_mb=getattr(args, "memory_budget_mb", None),
                            device=getattr(args, "device", None) or "auto",
                            prefix_cache=not getattr(args, "no_cache", False))


# -- commands --------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> None:
    """Host side: import a factory `module.py:name` (or `pkg.module:name`) and export it."""
    import importlib
    import importlib.util

    try:
        from edgelearn.export.quiet import quiet_third_party

        with quiet_third_party(args.verbose):
            import torch

            from edgelearn.export import export_bundle
    except ImportError as e:
        raise el.EdgelearnError(f"export needs torch and onnx on this host ({e}); "
                             "pip install torch==2.13.0 'edgelearn[export]'") from None
    spec, _, attr = args.spec.partition(":")
    if not attr:
        raise el.InputError(f"model spec {args.spec!r} must look like module.py:factory")
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise el.InputError(f"{spec}: no such file")
        ms = importlib.util.spec_from_file_location(path.stem, path)
        assert ms is not None
        assert ms.loader is not None
        module = importlib.util.module_from_spec(ms)
        ms.loader.exec_module(module)
    else:
        module = importlib.import_module(spec)
    factory = getattr(module, attr, None)
    if factory is None:
        raise el.InputError(f"{spec} has no attribute {attr!r}")
    try:
        kwargs = json.loads(args.kwargs) if args.kwargs else {}
    except json.JSONDecodeError as e:
        raise el.InputError(f"--kwargs is not valid JSON ({e})") from None
    if not isinstance(kwargs, dict):
        raise el.InputError("--kwargs must be a JSON object")
    torch.manual_seed(args.seed)
    try:
        model = factory(**kwargs)
    except TypeError as e:
        raise el.InputError(f"{args.spec}: {e}") from None
    example = torch.randn(*args.example_shape)
    formats = tuple(f.strip() for f in args.formats.split(",") if f.strip())
    with quiet_third_party(args.verbose):
        if args.quantize:
            res = _export_int8(args, model, example, formats)
        else:
            res = export_bundle(model, example, args.out, trainable=args.trainable,
                                task=args.task, overwrite=args.overwrite,
                                formats=formats, atol=args.atol, rtol=args.rtol)
    _emit(args, res, lambda: f"wrote {res['bundle']}: {res['params']} params "
                             f"({res['trainable_params']} trainable), formats "
                             f"{','.join(res['formats'])}, parity max abs err "
                             f"{res['parity_max_abs_err']:.2e}" + _int8_note(res))


def _export_int8(args: argparse.Namespace, model: Any, example: Any,
                 formats: tuple[str, ...]) -> dict[str, Any]:
    """`export --quantize int8`: QDQ bundle (weights int8 per channel, activations float32),
    then the int8 model against the float one on the calibration inputs: --data's x, else
    random inputs of the example's shape (64 rows)."""
    import torch

    from edgelearn.export.quantize import export_int8_bundle

    if args.data:
        x = el.load_data(args.data).x
        if tuple(x.shape[1:]) != tuple(args.example_shape[1:]):
            raise el.InputError(f"--data x has rows of shape {list(x.shape[1:])}, the example "
                                f"shape says {list(args.example_shape[1:])}")
        source = f"{args.data} (x, {len(x)} rows)"
    else:
        gen = torch.Generator().manual_seed(args.seed)
        x = torch.randn(64, *args.example_shape[1:], generator=gen).numpy()
        source = "64 random N(0, 1) inputs of the example shape"
    res = export_int8_bundle(model, example, args.out, trainable=args.trainable,
                             task=args.task, overwrite=args.overwrite, formats=formats,
                             atol=args.atol, rtol=args.rtol)
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(x)).numpy()
    got = el.tools.Model(el.load_bundle(args.out)).predict(x)
    res["int8_vs_float"] = _quant_error(got, ref, source)
    return res


def _quant_error(got: Any, ref: Any, source: str) -> dict[str, Any]:
    """How far the int8 model is from the float one, relative to the outputs' magnitude."""
    import numpy as np

    err = float(np.max(np.abs(got.astype(np.float64) - ref)))
    scale = float(np.max(np.abs(ref)))
    out = {"max_abs_err": err, "scale": scale, "relative_err": err / scale if scale else err,
           "inputs": source}
    if ref.ndim == 2 and ref.shape[1] > 1:
        out["argmax_agreement"] = float(np.mean(got.argmax(1) == ref.argmax(1)))
    return out


def _int8_note(res: dict[str, Any]) -> str:
    q = res.get("int8_vs_float")
    if not q:
        return ""
    agree = f", argmax agreement {q['argmax_agreement']:.3f}" if "argmax_agreement" in q else ""
    return (f"; int8 vs float on {q['inputs']}: max abs err {q['max_abs_err']:.3g} "
            f"({q['relative_err']:.2%} of max|output| {q['scale']:.3g}){agree}")


def cmd_info(args: argparse.Namespace) -> None:
    """Describe a bundle: inputs, outputs, parameters, files, parity, what it can train with."""
    bundle = el.load_bundle(args.bundle)
    info = el.describe(bundle)
    info["cache"] = el.tools.cache_plan(bundle)  # the frozen prefix a train run caches
    if "tflite" in bundle.formats:  # a LiteRT run splits the TFLite model on its own
        info["cache_litert"] = el.tools.cache_plan(bundle, backend="litert")
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
        if o.get("layers_why"):
            extra.append(f"no layer taps: {o['layers_why']}")
        if o.get("why_no_fast_path"):
            extra.append(o["why_no_fast_path"])
        lines += textwrap.wrap(f"{name:10s} yes: {'; '.join(extra)}", 96, initial_indent="    ",
                               subsequent_indent=" " * 15)
    lines.append("  backends:")
    for name, b in info["support"]["backends"].items():
        lines.append(f"    {name:11s} " + (f"yes: {b['model']}" if b["supported"] else
                                            f"no: {b['why']}"))
    cache = info.get("cache") or {}
    text = (f"yes: {cache['prefix_nodes']} frozen prefix nodes run once per example, cut at "
            f"{', '.join(cache['cut'])} ({cache['row_bytes']} bytes/example); onnxruntime"
            if cache.get("enabled") else f"no: {cache.get('reason')}")
    lines += textwrap.wrap(f"  prefix cache: {text}", 96, subsequent_indent=" " * 16)
    taps = cache.get("taps")
    if taps is not None:  # the taps graph's cut (tpsgd, hybrid)
        text = (f"yes: cut at {', '.join(taps['cut'])}" if taps.get("enabled") else
                f"no: {taps.get('reason')}")
        lines += textwrap.wrap(f"  prefix cache (tpsgd, hybrid): {text}", 96,
                                 subsequent_indent=" " * 16)
    lite = info.get("cache_litert")
    if lite is not None:
        text = (f"yes: {lite['prefix_nodes']} frozen prefix ops run once per example, cut at "
                f"{len(lite['cut'])} tensor(s) ({lite['row_bytes']} bytes/example), "
                f"strategy {lite['strategy']}" if lite.get("enabled")
                else f"no: {lite.get('reason')}")
        lines += textwrap.wrap(f"  prefix cache (litert): {text}", 96,
                               subsequent_indent=" " * 16)
        ltaps = lite.get("taps")
        if ltaps is not None:  # model_taps.tflite's cut (tpsgd, hybrid on litert)
            text = (f"yes: cut at {', '.join(ltaps['cut'])}" if ltaps.get("enabled") else
                    f"no: {ltaps.get('reason')}")
            lines += textwrap.wrap(f"  prefix cache (litert tpsgd, hybrid): {text}", 96,
                                   subsequent_indent=" " * 16)
    return "\n".join(lines)


def cmd_eval(args: argparse.Namespace) -> None:
    """Accuracy / loss of a bundle (optionally with personalized weights) on a data file."""
    bundle = el.load_bundle(args.bundle)
    data = el.load_data(args.data, task=bundle.task, inputs=bundle.inputs)
    res = el.evaluate(bundle, data, weights=args.weights, runtime=_runtime_config(args),
                      batch_size=args.batch_size, objective=args.objective).to_json()

    def human() -> str:
        acc = "" if res["accuracy"] is None else f"accuracy {res['accuracy']:.4f}, "
        return f"{acc}loss {res['loss']:.4f} on {res['n']} examples " \
               f"(peak RSS {res['peak_rss_mb']:.0f} MB)"

    _emit(args, res, human)


def _flag_options(args: argparse.Namespace) -> dict[str, Any]:
    """The chosen optimizer's options set by train flags: its Options fields that name a flag
    ("cli" metadata), where the flag was given (the others keep their Options defaults), and
    `total_steps` = --steps where the optimizer schedules over the run."""
    options_cls = el.optimizers()[args.optimizer]
    options = {key: getattr(args, flag[2:].replace("-", "_"))
               for flag, key in options_cls.cli_flags().items()}
    options = {k: ";".join(v) if isinstance(v, list) else v  # repeatable --group
               for k, v in options.items() if v is not None}
    defaults = {f.name: f.default for f in dataclasses.fields(options_cls)}
    # polystep's radii and temperature always follow a cosine over the run; zo-sgd and
    # zo-scale only under a --schedule other than constant
    if "total_steps" in defaults and \
            options.get("schedule", defaults.get("schedule", "cosine")) != "constant":
        options["total_steps"] = args.steps
    if args.optimizer in ("tpsgd", "hybrid") and args.objective == "mse":  # head loss follows
        options["head_loss"] = "mse"
    return options


def _opt_pairs(args: argparse.Namespace) -> dict[str, Any]:
    """`--opt KEY=VALUE` flags (JSON values, else strings); they override the other flags."""
    options: dict[str, Any] = {}
    for item in args.opt or []:
        key, sep, text = item.partition("=")
        if not sep or not key.isidentifier():
            raise el.InputError(f"--opt expects KEY=VALUE, got {item!r}")
        try:
            options[key] = json.loads(text)
        except json.JSONDecodeError:
            options[key] = text
    return options


def _auto_optimizer(args: argparse.Namespace, bundle: Any) -> el.TrainConfig:
    """--optimizer auto: the config (optimizer, its default options, why) the bundle's rule
    picks, or the run's in --out when resuming; then the flag checks for that optimizer."""
    base = el.TrainConfig(trainable=args.trainable, objective=args.objective).resolve(
        bundle, _runtime_config(args).resolve(bundle).backend,
        run_dir=None if args.restart else args.out)
    args.optimizer = base.optimizer
    check_optimizer_flags(args, base.optimizer, chosen_by=base.chosen_by)
    return base


def cmd_train(args: argparse.Namespace) -> None:
    """Personalize a bundle on a data file; resumes when --out already holds the run."""
    bundle = el.load_bundle(args.bundle)
    auto = _auto_optimizer(args, bundle) if args.optimizer == "auto" else None
    data = el.load_data(args.data, task=bundle.task, inputs=bundle.inputs)
    given = {**_flag_options(args), **_opt_pairs(args)}
    options = {**(auto.options if auto else {}), **given}
    divergence = None
    if args.diverge_factor is not None:
        divergence = el.DivergencePolicy(factor=args.diverge_factor,
                                         patience=args.diverge_patience,
                                         lr_scale=args.diverge_lr_scale,
                                         smoothing=args.diverge_smoothing)
    config = el.TrainConfig(optimizer=args.optimizer, options=options, trainable=args.trainable,
                            objective=args.objective, batch_size=args.batch_size,
                            seed=args.seed, checkpoint_every=args.checkpoint_every,
                            fsync_every=args.fsync_every, fsync_seconds=args.fsync_seconds,
                            divergence=divergence, chosen_by=auto.chosen_by if auto else None)
    callbacks = _train_callbacks(args, bundle)
    if auto and "lr" in given:
        callbacks.append(AutoLrNote(args.optimizer, given["lr"]))
    try:
        with el.Session(bundle, args.out, config, _runtime_config(args),
                        restart=args.restart) as session:
            res = session.run(data, args.steps, callbacks=callbacks).to_json()
    except el.TrainingInterrupted as stop:  # Ctrl-C: weights so far are written; resumable
        if args.json:
            print(json.dumps({"error": str(stop), "interrupted_at_step": stop.step}))
        print(str(stop), file=sys.stderr)
        raise SystemExit(130) from None

    def human() -> str:
        first = "n/a" if res["loss_first"] is None else f"{res['loss_first']:.4f}"
        last = "n/a" if res["loss_last"] is None else f"{res['loss_last']:.4f}"
        step_ms = res["step_ms_median"]
        timing = "" if step_ms is None else f", step {step_ms:.2f} ms"
        for key, label in (("forward_ms_median", "forward"),
                           ("population_call_ms_median", "population call")):
            if res.get(key) is not None:
                timing += f", {label} {res[key]:.2f} ms"
        cache = res.get("cache") or {}
        if cache.get("enabled"):
            timing += (f", cached prefix features of {cache['cached_examples']} examples "
                       f"({cache['prefix_nodes']} nodes)")
        return (f"{res['steps']} steps ({res['resumed_from']} already done), loss {first} -> "
                f"{last}{timing}, peak RSS {res['peak_rss_mb']:.0f} MB\n"
                f"weights: {res['weights']}\njournal: {res['journal']}")

    _emit(args, res, human)


def _train_callbacks(args: argparse.Namespace, bundle: Any) -> list[Any]:
    """metrics.jsonl (held-out scores with --eval-data) and, unless --json, progress on
    stderr (a bar on a terminal, plain periodic lines otherwise)."""
    import edgelearn as el

    held_out = None if args.eval_data is None else el.load_data(
        args.eval_data, task=bundle.task, inputs=bundle.inputs)
    metrics = el.RunMetrics(held_out, eval_every=args.eval_every or 100)
    if args.json:
        return [metrics]
    return [metrics, el.ProgressBar(label=args.optimizer, metrics=metrics)]


def cmd_replay(args: argparse.Namespace) -> None:
    """Rebuild trained weights from the bundle's base weights and a journal (no data)."""
    bundle = el.load_bundle(args.bundle)
    data = None if args.data is None else el.load_data(args.data, task=bundle.task,
                                                       inputs=bundle.inputs)
    res = el.replay(bundle, args.journal, data=data, out=args.out).to_json()
    _emit(args, res, lambda: f"replayed {res['steps']} steps -> {res['weights']} "
                             f"(sha256 {res['sha256']})")


def cmd_device(args: argparse.Namespace) -> None:
    """Detect this machine, show its profile, and (with a bundle) what fits its memory budget."""
    if args.list:
        res: dict[str, Any] = {"profiles": [p.to_json() for p in el.device_profiles()]}
        _emit(args, res, lambda: "\n".join(f"{p['name']:20s} {p['description']}"
                                           for p in res["profiles"]))
        return
    res = el.device(args.bundle, profile=args.device, backend=args.backend,
                    trainable=args.trainable, batch_size=args.batch_size,
                    memory_budget_mb=args.memory_budget_mb, dims=_dims(args.dim)).to_json()
    _emit(args, res, lambda: _device_text(res))


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
        unsized = next((v["unsized_dims"] for v in b["plans"].values() if "unsized_dims" in v),
                       [])
        if unsized:  # a transformer's sequence: train sizes it from its data
            lines.append(f"  (symbolic dims counted as 1 here: {', '.join(unsized)}; "
                         "activations grow with them: --dim NAME=SIZE sizes them, as `train` "
                         "does from its data)")
    return "\n".join(lines)


def _dims(items: list[str] | None) -> dict[str, int]:
    """`--dim NAME=SIZE` flags as {name: size} (InputError on a malformed one)."""
    dims: dict[str, int] = {}
    for item in items or []:
        name, sep, size = item.partition("=")
        if not (sep and name and size.isdigit() and int(size) > 0):
            raise el.InputError(f"--dim expects NAME=SIZE with a positive integer size, got "
                                f"{item!r}")
        dims[name] = int(size)
    return dims


def _mb_or_unknown(value: float | None) -> str:
    from edgelearn.figures import mb

    return "unknown" if value is None else mb(value)


def cmd_demo(args: argparse.Namespace) -> None:
    """The main job on shipped data: personalize for a new user, accuracy before/after."""
    from edgelearn.demo import DATA, run_demo
    from edgelearn.figures import ms

    # the backend the shipped bundle runs on here (the profile's first that imports)
    rt = _runtime_config(args).resolve(el.load_bundle(DATA / "demo", verify=False))
    res = run_demo(args.out, backend=rt.backend, threads=rt.threads,
                   providers=rt.providers, steps=args.steps, batch_size=args.batch_size,
                   seed=args.seed, progress=not args.json)

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
        lines.append(f"  train's default here (no --optimizer): {res['default_optimizer']}")
        lines.append(f"  peak RSS {res['peak_rss_mb']:.0f} MB; torch was not used")
        if res.get("report"):
            lines.append(f"  report: {res['report']}")
        return "\n".join(lines)

    _emit(args, res, human)


def cmd_report(args: argparse.Namespace) -> None:
    """One self-contained HTML page comparing runs (curves, settings, timing, memory)."""

    res = el.tools.report(args.runs, args.out)
    _emit(args, res, lambda: f"report of {len(res['runs'])} run(s): {res['html']}")


def _shapes(items: Sequence[str] | None) -> dict[str, list[int]]:
    """`--shape NAME=D1,D2,...` flags -> {name: dims}."""
    shapes: dict[str, list[int]] = {}
    for item in items or []:
        name, sep, text = item.partition("=")
        try:
            dims = [int(d) for d in text.replace("x", ",").split(",") if d.strip()]
        except ValueError:
            dims = []
        if not sep or not name or not dims or min(dims) < 1:
            raise el.InputError(f"--shape expects NAME=D1,D2,... (positive ints), got {item!r}")
        shapes[name] = dims
    return shapes


def cmd_bench(args: argparse.Namespace) -> None:
    """Forward / step timing and memory of a bundle on this device."""
    from edgelearn.figures import mb, ms

    bundle = el.load_bundle(args.bundle)
    data = None if args.data is None else el.load_data(args.data, task=bundle.task,
                                                       inputs=bundle.inputs)
    res = el.tools.bench(bundle, _runtime_config(args), batch_size=args.batch_size,
                         trainable=args.trainable, runs=args.runs, steps=args.steps,
                         data=data, shapes=_shapes(args.shape))

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


def _quant_note(p: dict[str, Any]) -> str:
    """`prepare --list`'s note on a quantized weight or a quantization scale."""
    q = p["quant"]
    if q.get("role") == "scale":
        return f"  [scale of {', '.join(q.get('of', []))}]"
    frozen = "" if p["dtype"] == "int8" else ", frozen"
    return f"  [{p['dtype']} {q.get('op', '')}{frozen}]"


def cmd_prepare(args: argparse.Namespace) -> None:
    """Turn an inference ONNX model into a bundle (or --list its weight tensors)."""
    if args.list:
        res = el.tools.list_params(args.model)

        def human_list() -> str:
            lines = [f"model {res['model']}"]
            lines += [f"  input  {t['name']} {t['dtype']}{t['shape']}" for t in res["inputs"]]
            lines += [f"  output {t['name']} {t['dtype']}{t['shape']}" for t in res["outputs"]]
            for p in res["params"]:
                note = f"  [kept in graph: {p['kept_in_graph']}]" if "kept_in_graph" in p else (
                    _quant_note(p) if "quant" in p else "")
                lines.append(f"  {p['name']:48s} {p['dtype']}{p['shape']} {p['bytes']} B{note}")
            lines.append(f"  {res['total_params']} params ({res['total_bytes']} bytes)")
            return "\n".join(lines)

        _emit(args, res, human_list)
        return
    if not args.out:
        raise el.InputError("prepare needs --out DIR (or --list)")
    res = el.tools.prepare(args.model, args.out, trainable=args.trainable,
                           new_head=args.new_head, task=args.task, seed=args.seed,
                           example=args.example, atol=args.atol, rtol=args.rtol,
                           overwrite=args.overwrite, pool=args.pool, mask=args.mask)
    _emit(args, res, lambda: f"wrote {res['bundle']}: {res['params']} params "
                             f"({res['trainable_params']} trainable), parity max abs err "
                             f"{res['parity_max_abs_err']:.2e}"
                             + (f"; batch {res['batch']}" if res.get("batch") else ""))


def cmd_bake(args: argparse.Namespace) -> None:
    """Write personalized weights back into a plain inference model (inference.onnx)."""
    res = el.tools.bake(args.bundle, args.weights, args.out, example=args.example,
                        atol=args.atol, rtol=args.rtol, overwrite=args.overwrite)
    for name, why in res["skipped"].items():  # stderr in every mode: --json owns stdout only
        print(f"edgelearn: warning: {name} left out of {res['bundle']}: {why}", file=sys.stderr)
    _emit(args, res, lambda: f"wrote {res['bundle']} ({', '.join(res['inference'].values())}),"
                             f" parity max abs err {res['parity_max_abs_err']:.2e}")


def cmd_fleet(args: argparse.Namespace) -> None:
    """`edgelearn fleet ...`: federated personalization on Flower (el.fleet.cli)."""
    result, text = el.fleet.cli.run(args)
    _emit(args, result, lambda: text)


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
    "report": cmd_report,
    "fleet": cmd_fleet,
}


#: train flags of no optimizer stored as None when not given (so one given without
#: --diverge-factor can be refused) -> the value used when it is not given. Optimizer flags
#: need no entry: left None, they keep their Options defaults (`_flag_options`).
TRAIN_DEFAULTS: dict[str, Any] = {"diverge_patience": 20, "diverge_lr_scale": 0.5,
                                  "diverge_smoothing": 0.9}

def flag_users() -> dict[str, tuple[str, ...]]:
    """train flag (argparse dest) -> the optimizers that read it: those whose Options field
    names the flag (metadata "cli"; cmd_train passes it on). Any other optimizer refuses the
    flag instead of dropping it silently."""
    users: dict[str, list[str]] = {}
    for name, options in el.optimizers().items():
        for flag in options.cli_flags():
            users.setdefault(flag.removeprefix("--").replace("-", "_"), []).append(name)
    return {dest: tuple(names) for dest, names in sorted(users.items())}


def _version() -> str:
    """The installed distribution's version, else the package's own `__version__`."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("edgelearn")
    except PackageNotFoundError:
        return el.__version__


def optimizer_option_names(name: str) -> list[str]:
    """Keys `--opt KEY=VALUE` takes for optimizer `name`: its Options fields but the run seed
    (--seed), sorted."""
    return el.optimizers()[name].opt_keys()


def _dflt(dest: str, text: str) -> str:
    """Help text of a None-sentinel train flag, with the default it stands for."""
    return f"{text} (default: {TRAIN_DEFAULTS[dest]})"


def _add_runtime(g: Any, *, batch_size: int | None = 256) -> None:
    g.add_argument("--backend", default=None, choices=el.backend_names(),
                   help="runtime (litert needs a bundle exported with tflite; tpsgd runs on "
                   "both); default: the first backend of the --device (else the detected) "
                   "profile that is installed and that the bundle has a model for")
    g.add_argument("--device", default=None,
                   help="device profile name (see `edgelearn device --list`) or .toml path")
    g.add_argument("--threads", type=_positive, default=None,
                   help="runtime intra-op threads (default: the runtime's choice)")
    g.add_argument("--batch-size", type=_positive, default=batch_size,
                   help="examples per forward" if batch_size else
                   "examples per training step (default: each optimizer's recipe, 32)")


def _add_json(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def _add_device(sub: Any) -> None:
    """The `device` subcommand's arguments."""
    sp = sub.add_parser("device", help="detect this machine; what fits its memory budget")
    sp.add_argument("bundle", nargs="?", default=None, help="bundle to size a training run for")
    sp.add_argument("--device", default=None, help="profile to use instead of the detected one")
    sp.add_argument("--list", action="store_true", help="list the shipped device profiles")
    sp.add_argument("--backend", default=None, choices=el.backend_names(),
                    help="runtime (default: the profile's first installed backend)")
    sp.add_argument("--trainable", default=None, help="glob(s) of parameters to train")
    sp.add_argument("--batch-size", type=_positive, default=32, help="batch you want to train")
    sp.add_argument("--memory-budget-mb", type=float, default=None,
                    help="memory budget (default: the profile's, else the free memory)")
    sp.add_argument("--dim", action="append", default=None, metavar="NAME=SIZE",
                    help="size of a symbolic input dimension besides the batch, e.g. "
                    "--dim sequence=128 (repeatable; an unsized one counts 1; train sizes "
                    "them from its data)")
    _add_json(sp)


def _add_train(sub: Any) -> None:
    """`train` and its flag groups; optimizer-specific flags default to None (see
    TRAIN_DEFAULTS) so that a flag the chosen optimizer does not use can be refused."""
    sp = sub.add_parser("train", help="personalize a bundle on device (forward-only)",
                        description="Personalize a bundle with a forward-only optimizer; "
                        "resumes when --out already holds the same run.")
    g = sp.add_argument_group("data")
    g.add_argument("bundle", help="bundle directory to personalize")
    g.add_argument("--data", required=True, help=".npz with x (float32) and y")
    g.add_argument("--out", required=True,
                   help="run directory: new, empty, or a run to resume (never a bundle, a "
                   "data file or another directory)")
    g.add_argument("--restart", action="store_true",
                   help="delete the run held in --out (journal, checkpoint, weights; nothing "
                   "else) and start it over; never done silently")
    g = sp.add_argument_group("optimizer")
    g.add_argument("--optimizer", default="auto", choices=["auto", *el.optimizers()],
                   help="forward-only optimizer; auto picks by bundle, trainable set and "
                   f"loss: {el.auto_rule()[0]}; given flags override these; a resumed run keeps "
                   "its optimizer; the choice and why: --json 'chosen_by', session.json")
    g.add_argument("--steps", type=int, required=True, help="total steps of the run")
    g.add_argument("--lr", type=float, default=None, help=_lr_help())
    g.add_argument("--trainable", default=None,
                   help="glob(s) of parameters to train, e.g. 'head.*' (default: the "
                   "manifest's; zo-scale: '@scale', the quantization scales by role; "
                   "'@int8': int8 weights)")
    g.add_argument("--objective", default=None, choices=list(el.objectives()),
                   help="loss to minimize (default: cross-entropy, mse for regression)")
    g.add_argument("--seed", type=int, default=0, help="run seed (noise and data order)")
    g.add_argument("--opt", action="append", metavar="KEY=VALUE",
                   help="optimizer option (repeatable; JSON values), e.g. --opt radius=0.02; "
                   "an unknown key is refused with the valid ones")
    _add_train_optimizer_options(sp)
    _add_train_reliability(sp)
    g = sp.add_argument_group("device / runtime")
    _add_runtime(g, batch_size=32)
    g.add_argument("--memory-budget-mb", type=float, default=None,
                   help="peak memory allowed; the batch shrinks to fit (default: the "
                   "profile's)")
    g.add_argument("--no-cache", action="store_true",
                   help="run the whole graph every forward instead of caching the frozen "
                   "prefix's features (same results; see 'cache' in --json)")
    _add_json(sp)


def _lr_fields() -> dict[str, Any]:
    """optimizer -> the dataclass field behind its --lr (optimizers that take one)."""
    return {name: f for name, options in el.optimizers().items()
            for f in dataclasses.fields(options) if f.metadata.get("cli") == "--lr"}


def _lr_help() -> str:
    """--lr's help: each optimizer's default, its value under auto where that differs, and
    what the value means where it is not a plain learning rate (zo-gn: a step fraction)."""
    parts, recipes = [], el.auto_rule()[1]
    for name, f in sorted(_lr_fields().items()):
        text = f"{name} {f.default:g}"
        auto = recipes.get(name, {}).get("lr")
        if auto is not None and auto != f.default:
            text += f" ({auto:g} under auto)"
        if not f.metadata["help"].startswith("learning rate"):
            text += f" = the {f.metadata['help']}"
        parts.append(text)
    return f"learning rate, on each optimizer's own scale (default: {', '.join(parts)})"


class AutoLrNote(el.Callback):
    """One stderr line at the first step of a new run whose optimizer auto picked while --lr
    (or --opt lr=) was given: the value is read on that optimizer's own scale, which the user
    did not choose (after every check of the run, so a refused run still says one line)."""

    def __init__(self, optimizer: str, lr: float) -> None:
        f = _lr_fields()[optimizer]  # train's flag checks refused --lr for one without
        recipe = el.auto_rule()[1].get(optimizer, {})
        default = recipe.get("lr", f.default)
        what = f.metadata["help"].split(" (")[0]
        if recipe.get("relative_lr"):
            what += " relative to each tensor's RMS"
        self.line = (f"edgelearn: the default optimizer {optimizer} takes --lr {lr:g} as its "
                     f"{what} (its default {default:g}); --optimizer NAME picks another")

    def on_step(self, session: Any, result: Any) -> None:
        if result.step == 0:
            print(self.line, file=sys.stderr)


def _option_flag_specs() -> dict[str, dict[str, Any]]:
    """train flag -> what every optimizer's Options field behind it declares: the users,
    help text, type, choices and each user's default (flags come from the Options, once)."""
    import dataclasses
    import typing

    specs: dict[str, dict[str, Any]] = {}
    # zo-sgd first: where optimizers share a flag, its help text is the flag's
    for name, options in sorted(el.optimizers().items(), key=lambda kv: (kv[0] != "zo-sgd",
                                                                          kv[0])):
        hints = typing.get_type_hints(options)
        for f in dataclasses.fields(options):
            flag = f.metadata.get("cli")
            if not flag or flag == "--lr":  # --lr is every optimizer's (the optimizer group)
                continue
            kind = typing.get_args(hints[f.name]) or (hints[f.name],)
            spec = specs.setdefault(flag, {"users": [], "help": f.metadata["help"],
                                           "type": next(k for k in kind if k is not type(None)),
                                           "choices": f.metadata.get("choices"),
                                           "defaults": {}})
            spec["users"].append(name)
            spec["defaults"][name] = f.default
    return specs


def _option_help(spec: dict[str, Any]) -> str:
    """An option flag's help: its Options text and each user's default."""
    values = {"none" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
              for v in spec["defaults"].values()}
    if len(values) == 1:
        default = values.pop()
    else:
        default = ", ".join(f"{k} {'none' if v is None else v}"
                            for k, v in sorted(spec["defaults"].items()))
    return f"{spec['help']} (default: {default})"


def _add_train_optimizer_options(sp: argparse.ArgumentParser) -> None:
    """`train`'s per-optimizer flags, generated from the optimizers' Options dataclasses and
    grouped by the optimizers that read them (polystep's go through --opt KEY=VALUE)."""
    groups: dict[str, Any] = {}
    for flag, spec in _option_flag_specs().items():
        label = " / ".join(sorted(spec["users"])) + " options"
        g = groups.get(label) or groups.setdefault(label, sp.add_argument_group(label))
        if spec["type"] is bool:
            g.add_argument(flag, action="store_true", default=None, help=_option_help(spec))
        elif flag == "--group":  # repeatable: one rule per flag
            g.add_argument(flag, action="append", default=None, metavar="PATTERN:lr=X,eps=Y",
                           help=_option_help(spec) + "; repeatable")
        else:
            g.add_argument(flag, type=spec["type"], default=None, choices=spec["choices"],
                           help=_option_help(spec))
    keys = optimizer_option_names("polystep") if "polystep" in el.optimizers() else None
    sp.add_argument_group("polystep options", "given as --opt KEY=VALUE, keys: "
                          f"{', '.join(keys or [])}")


def _add_train_reliability(sp: argparse.ArgumentParser) -> None:
    """`train`'s checkpoint, fsync and numerical-guard flags."""
    g = sp.add_argument_group("metrics")
    g.add_argument("--eval-data", default=None,
                   help="held-out .npz scored every --eval-every steps into the run's "
                   "metrics.jsonl (does not change the training)")
    g.add_argument("--eval-every", type=_positive, default=None,
                   help="with --eval-data: steps between held-out scores (also scored before "
                   "the first and at the last step; default 100)")
    g = sp.add_argument_group("reliability")
    g.add_argument("--checkpoint-every", type=_positive, default=100,
                   help="steps between checkpoints")
    g.add_argument("--fsync-every", type=_positive, default=64,
                   help="journal records per fsync (1: every step durable against power loss; "
                   "a killed process loses no appended step either way)")
    g.add_argument("--fsync-seconds", type=float, default=1.0,
                   help="also fsync the journal at a step this many seconds after the last "
                   "fsync (default: %(default)s)")
    g.add_argument("--diverge-factor", type=float, default=None,
                   help="roll back to the last good checkpoint when the loss level (a moving "
                   "average of step losses) stays above this many times its running minimum "
                   "(off by default)")
    g.add_argument("--diverge-patience", type=_positive, default=None,
                   help=_dflt("diverge_patience", "with --diverge-factor: steps above the "
                             "threshold before a rollback"))
    g.add_argument("--diverge-lr-scale", type=float, default=None,
                   help=_dflt("diverge_lr_scale", "with --diverge-factor: learning-rate "
                             "multiplier at each rollback"))
    g.add_argument("--diverge-smoothing", type=float, default=None,
                   help=_dflt("diverge_smoothing", "with --diverge-factor: weight of the "
                             "previous loss level in its moving average (0: raw step losses)"))


def _add_export(sub: Any) -> None:
    """`export` (host side, needs torch)."""
    sp = sub.add_parser("export", help="host: export a torch model to a bundle")
    sp.add_argument("spec", help="model factory, module.py:factory or package.module:factory")
    sp.add_argument("--example-shape", type=_shape, required=True,
                    help="example input shape with batch first, e.g. 1,64")
    sp.add_argument("--out", required=True, help="bundle directory to create")
    sp.add_argument("--trainable", default="*", help="glob(s) of trainable params, e.g. 'head.*'")
    sp.add_argument("--task", default="classification", choices=["classification", "regression"],
                    help="what the model's output is")
    sp.add_argument("--kwargs", default=None, help="JSON object of factory keyword arguments")
    sp.add_argument("--seed", type=int, default=0, help="torch seed for the factory's init")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    sp.add_argument("--formats", default="onnx",
                    help="comma-separated model formats: onnx, or onnx,tflite")
    sp.add_argument("--quantize", default=None, choices=["int8"],
                    help="int8: weights int8 per output channel (QDQ), activations float32; "
                    "reports the int8 vs float error on --data")
    sp.add_argument("--data", default=None,
                    help="with --quantize: .npz whose x is compared float vs int8 (default: "
                    "random inputs of the example shape)")
    sp.add_argument("--atol", type=float, default=el.tools.ATOL,
                    help="parity: |runtime - reference| <= atol + rtol * max|reference| "
                    "per output")
    sp.add_argument("--rtol", type=float, default=el.tools.RTOL,
                    help="parity tolerance relative to each output's largest magnitude")
    sp.add_argument("-v", "--verbose", action="store_true",
                    help="show the converters' own logs and warnings (hidden by default)")
    _add_json(sp)


def _add_prepare_bake(sub: Any) -> None:
    """`prepare` and `bake`: bundles from third-party ONNX models, and back."""
    sp = sub.add_parser("prepare", help="turn an inference ONNX model into a bundle")
    sp.add_argument("model", help="the .onnx file (external data must sit beside it)")
    sp.add_argument("--out", default=None, help="bundle directory to create")
    sp.add_argument("--list", action="store_true", help="show the weight tensors and stop")
    sp.add_argument("--trainable", default=None,
                    help="glob(s) of trainable params (default '*', or 'head.*' with a new head)"
                    "; '@scale' / '@int8' select quantization scales / int8 weights by role")
    sp.add_argument("--new-head", default=None, metavar="OUTPUT:NUM_CLASSES",
                    help="append a linear classifier on a model output")
    sp.add_argument("--pool", default="mean", choices=["mean", "masked-mean"],
                    help="how the new head pools a sequence output [batch, tokens, dim]: "
                    "mean over every position, or masked-mean over the --mask input's non-zero "
                    "positions (padding excluded)")
    sp.add_argument("--mask", default=None, metavar="INPUT",
                    help="the attention-mask input read by --pool masked-mean")
    sp.add_argument("--task", default=None, choices=["classification", "regression"],
                    help="what the model's output is (default: classification with "
                    "--new-head, else from the output)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the new head's weights")
    sp.add_argument("--example", default=None, help=".npz of model inputs for the parity check")
    sp.add_argument("--atol", type=float, default=el.tools.ATOL,
                    help="parity: |runtime - reference| <= atol + rtol * max|reference| per output")
    sp.add_argument("--rtol", type=float, default=el.tools.RTOL,
                    help="parity tolerance relative to each output's largest magnitude")
    sp.add_argument("--overwrite", action="store_true", help="replace an existing bundle")
    _add_json(sp)

    sp = sub.add_parser("bake", help="personalized weights -> plain inference model + bundle")
    sp.add_argument("bundle", help="bundle the weights were trained on")
    sp.add_argument("--weights", required=True, help="personalized weights (.safetensors)")
    sp.add_argument("--out", required=True, help="directory to create")
    sp.add_argument("--example", default=None, help=".npz of model inputs for the parity check")
    sp.add_argument("--atol", type=float, default=el.tools.ATOL,
                    help="parity: |runtime - reference| <= atol + rtol * max|reference| "
                    "per output")
    sp.add_argument("--rtol", type=float, default=el.tools.RTOL,
                    help="parity tolerance relative to each output's largest magnitude")
    sp.add_argument("--overwrite", action="store_true",
                    help="replace an existing bundle directory")
    _add_json(sp)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used to check README/--help drift in tests)."""
    p = _Parser(prog="edgelearn", description="On-device learning with forward-only "
                "optimizers on inference runtimes.")
    p.add_argument("--version", action="version", version=f"edgelearn {_version()}",
                   help="print the installed version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser,
                           metavar="COMMAND", help="one of:")
    _add_export(sub)

    sp = sub.add_parser("info", help="what a bundle holds")
    sp.add_argument("bundle", help="bundle directory")
    _add_json(sp)

    sp = sub.add_parser("eval", help="accuracy / loss of a bundle on a data file")
    sp.add_argument("bundle", help="bundle directory")
    sp.add_argument("--data", required=True, help=".npz with x (float32) and y")
    sp.add_argument("--weights", default=None,
                    help="personalized weights (.safetensors; default: the bundle's)")
    sp.add_argument("--objective", default=None, choices=list(el.objectives()),
                    help="loss to report (default: cross-entropy, mse for regression)")
    _add_runtime(sp)
    _add_json(sp)

    _add_train(sub)

    _add_device(sub)

    sp = sub.add_parser("demo", help="the main job end to end on shipped data")
    sp.add_argument("--out", default="edgelearn-demo",
                    help="directory for the runs (one run directory per optimizer) and "
                    "their report.html")
    sp.add_argument("--steps", type=_positive, default=None,
                    help="override every optimizer's step count")
    sp.add_argument("--seed", type=int, default=0, help="run seed")
    _add_runtime(sp, batch_size=None)
    _add_json(sp)

    sp = sub.add_parser("bench", help="forward / step timing and memory on this device")
    sp.add_argument("bundle", help="bundle directory")
    sp.add_argument("--trainable", default=None, help="glob(s) of parameters to train")
    sp.add_argument("--runs", type=_positive, default=30, help="timed forwards per variant")
    sp.add_argument("--steps", type=_positive, default=20, help="timed steps per optimizer")
    sp.add_argument("--data", default=None,
                    help=".npz whose first batch is the example input (default: random)")
    sp.add_argument("--shape", action="append", default=None, metavar="NAME=DIMS",
                    help="dims of an input with symbolic dims (e.g. a sequence length), with "
                    "or without the batch: --shape input_ids=128 (repeatable)")
    _add_runtime(sp, batch_size=32)
    _add_json(sp)

    sp = sub.add_parser("report", help="HTML page of runs' curves, settings, time, memory")
    sp.add_argument("runs", nargs="+", metavar="RUN", help="run directory (with metrics.jsonl)")
    sp.add_argument("--out", required=True, help="the .html file to write (self-contained)")
    _add_json(sp)

    sp = sub.add_parser("replay", help="rebuild weights from base weights + journal")
    sp.add_argument("bundle", help="bundle the run trained")
    sp.add_argument("journal", help="the run's journal.bin")
    sp.add_argument("--out", required=True,
                    help="weights file to write (.safetensors; its directory must exist)")
    sp.add_argument("--data", default=None,
                    help="the run's data, for optimizers whose replay re-runs forwards (tpsgd)")
    _add_json(sp)

    _add_prepare_bake(sub)
    el.fleet.cli.add_parser(sub)
    return p


# -- checks before a command runs ----------------------------------------------------------
def check_train_flags(args: argparse.Namespace) -> None:
    """Refuse flags the optimizer would ignore and unknown --opt keys; fill the defaults.
    Under --optimizer auto the optimizer's checks wait for the bundle's choice."""
    if args.optimizer != "auto":
        check_optimizer_flags(args, args.optimizer)
    if args.diverge_factor is None:
        lone = [f for f, v in (("--diverge-patience", args.diverge_patience),
                               ("--diverge-lr-scale", args.diverge_lr_scale),
                               ("--diverge-smoothing", args.diverge_smoothing))
                if v is not None]
        if lone:
            raise el.InputError(f"{', '.join(lone)} {'applies' if len(lone) == 1 else 'apply'} "
                             "only with --diverge-factor")
    if args.eval_every is not None and args.eval_data is None:
        raise el.InputError("--eval-every applies only with --eval-data (the held-out .npz)")
    for dest, value in TRAIN_DEFAULTS.items():
        if getattr(args, dest) is None:
            setattr(args, dest, value)


def check_optimizer_flags(args: argparse.Namespace, opt: str, *,
                          chosen_by: str | None = None) -> None:
    """Refuse flags optimizer `opt` would ignore and --opt keys it does not have.

    Args:
        chosen_by: why --optimizer auto picked `opt` (named in the message).
    """
    unused = [f"--{dest.replace('_', '-')} ({', '.join(users)})"
              for dest, users in flag_users().items()
              if getattr(args, dest) is not None and opt not in users]
    if unused:
        hint = "; polystep options go through --opt KEY=VALUE" if opt == "polystep" else ""
        named = f"--optimizer {opt}" if chosen_by is None else \
            f"the default optimizer, {chosen_by}, which --optimizer NAME overrides,"
        raise el.InputError(f"{named} does not use {', '.join(unused)}; remove "
                         f"{'it' if len(unused) == 1 else 'them'}{hint}")
    valid = optimizer_option_names(opt)
    for item in args.opt or []:
        key, sep, _ = item.partition("=")
        if sep and key.isidentifier() and key not in valid:
            why = "the run seed is --seed" if key == "seed" else f"valid keys: {', '.join(valid)}"
            raise el.InputError(f"--opt {key}: {opt} has no option {key!r} ({why})")


def check_paths(args: argparse.Namespace) -> None:
    """Refuse outputs that would overwrite an input, a bundle, a data file or a directory
    that belongs to something else, before the command writes anything."""
    from edgelearn import paths

    cmd = args.command
    if cmd == "train":
        paths.check_run_out(args.out, inputs=[args.bundle, args.data, args.eval_data])
    elif cmd == "demo":
        from edgelearn.demo import RECIPES

        paths.check_demo_out(args.out, RECIPES)
    elif cmd == "report":
        paths.check_file_out(args.out, inputs=args.runs, suffix=".html")
    elif cmd == "replay":
        paths.check_file_out(args.out, inputs=[args.bundle, args.journal, args.data])
    elif cmd == "bake":
        paths.check_dir_out(args.out, overwrite=args.overwrite,
                            inputs=[args.bundle, args.weights, args.example])
    elif cmd == "prepare" and args.out and not args.list:
        paths.check_dir_out(args.out, overwrite=args.overwrite,
                            inputs=[args.model, args.example])
    elif cmd == "export":
        spec = args.spec.partition(":")[0]
        paths.check_dir_out(args.out, overwrite=args.overwrite,
                            inputs=[spec] if spec.endswith(".py") else [])


def _fail(args: argparse.Namespace, msg: str) -> int:
    """Report a refused command: one stderr line (+ one JSON object with --json); exit 2."""
    msg = msg.replace("\n", " ")
    if getattr(args, "json", False):
        print(json.dumps({"error": msg}))
    print(f"edgelearn: error: {msg}", file=sys.stderr)
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `edgelearn` console script; returns the exit code.

    Usage errors raise UsageError (SystemExit 2) after printing one line, as argparse does;
    with --json in argv they also print {"error": ...} on stdout.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = build_parser().parse_args(argv)
    except UsageError as e:
        if "--json" in argv:
            print(json.dumps({"error": e.message}))
        raise
    from edgelearn import paths

    try:
        if args.command == "train":
            check_train_flags(args)
        check_paths(args)
        # train/demo: a run directory this call creates goes away again if the command
        # fails before writing any work into it
        out = args.out if args.command in ("train", "demo") else None
        with paths.created_dirs(out):
            COMMANDS[args.command](args)
    except el.EdgelearnError as e:
        return _fail(args, str(e))
    except OSError as e:  # a path problem the checks could not foresee: still one line
        return _fail(args, paths.describe_os_error(e))
    except KeyboardInterrupt:
        print("edgelearn: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
