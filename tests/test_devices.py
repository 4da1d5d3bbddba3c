"""Device profiles, detection, and the memory budget (shrink the batch or refuse)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edgelearn import rng
from edgelearn.budget import plan_batch
from edgelearn.bundle import load_bundle
from edgelearn.cli import main
from edgelearn.devices import detect, list_profiles, load_profile, resolve_backend
from edgelearn.errors import InputError


def test_shipped_profiles_load_and_say_what_the_issue_needs() -> None:
    names = list_profiles()
    for want in ("raspberry-pi-4", "raspberry-pi-5", "jetson-orin-nano", "generic-x86_64"):
        assert want in names
    for name in names:
        p = load_profile(name)
        assert p.arch in ("aarch64", "x86_64")
        assert p.memory_budget_mb
        assert p.memory_budget_mb > 0
        assert p.backends
        assert p.runtimes
        for constraints in p.runtimes.values():
            assert "python" in constraints
            assert "glibc" in constraints
    assert load_profile("raspberry-pi-4").runtimes["tflite-runtime"]["glibc"] == ">=2.34"
    assert "CUDAExecutionProvider" in load_profile("jetson-orin-nano").providers


def test_bad_profiles_are_refused(tmp_path) -> None:
    with pytest.raises(InputError, match="unknown device"):
        load_profile("toaster")
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\nmemory_budget_mb = -5\n')
    with pytest.raises(InputError, match="positive"):
        load_profile(str(bad))
    bad.write_text("this is = = not toml")
    with pytest.raises(InputError, match="TOML"):
        load_profile(str(bad))
    bad.write_text('colour = "red"\n')
    with pytest.raises(InputError, match="unknown profile keys"):
        load_profile(str(bad))


def test_detect_finds_this_machine() -> None:
    m = detect()
    assert m["cores"] >= 1
    assert m["memory_total_mb"] > 0
    assert "onnxruntime" in m["backends"]
    assert m["profile"] in list_profiles()
    assert resolve_backend(load_profile(m["profile"]), None) == "onnxruntime"


@pytest.mark.torch
def test_budget_shrinks_the_batch_and_the_run_stays_under_it(bundles, tmp_path) -> None:
    """In fresh processes (their own peak RSS): a budget sized for ~300 examples of
    activations on top of the loaded model shrinks a 4096 batch, and the run's real peak stays
    under the budget."""
    bundle = load_bundle(bundles["cnn"].path)
    rng = np.random.default_rng(0)
    data = tmp_path / "d.npz"
    np.savez(data, x=rng.standard_normal((4096, 1, 8, 8)).astype(np.float32),
             y=rng.integers(0, 10, 4096))
    per_ex_mb = plan_batch(bundle, batch_size=1, budget_mb=1e6, base_mb=0.0)[
        "activation_kb_per_example"] / 1024

    def run(out: str, batch: int, budget: float) -> dict:
        cmd = [sys.executable, "-m", "edgelearn.cli", "train", str(bundle.path), "--data",
               str(data), "--steps", "3", "--out", str(tmp_path / out), "--batch-size",
               str(batch), "--memory-budget-mb", str(budget), "--optimizer", "zo-sgd", "--json"]
        return json.loads(subprocess.run(cmd, check=True, capture_output=True,
                                         text=True).stdout)

    small = run("small", 1, 1e6)
    budget = (small["peak_rss_mb"] + 300 * per_ex_mb) * 1.10
    res = run("big", 4096, budget)
    assert 1 <= res["batch_size"] < 4096
    assert res["memory_plan"]["predicted_peak_mb"] <= budget
    assert res["peak_rss_mb"] <= budget


@pytest.mark.torch
def test_budget_too_small_refuses_before_training(bundles, tmp_path, capsys) -> None:
    data = tmp_path / "d.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((64, 64)).astype(np.float32),
             y=rng.integers(0, 10, 64))
    code = main(["train", str(bundles["mlp"].path), "--data", str(data), "--steps", "5",
                 "--out", str(tmp_path / "run"), "--memory-budget-mb", "20"])
    err = capsys.readouterr().err
    assert code == 2
    assert "memory budget" in err
    assert "Traceback" not in err
    assert not (tmp_path / "run" / "journal.bin").exists()


def _fresh_process_json(args: list[str]) -> dict:
    """Run `edgelearn ARGS --json` in a new interpreter: the sizing measures the resident
    memory of the process it runs in, and a device runs it fresh, not inside a test
    session that has grown over hundreds of tests."""
    proc = subprocess.run([str(Path(sys.executable).parent / "edgelearn"), *args, "--json"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.mark.torch
def test_device_command_sizes_a_bundle(bundles, capsys) -> None:
    res = _fresh_process_json(["device", str(bundles["mlp"].path), "--device",
                               "raspberry-pi-4", "--backend", "onnxruntime"])
    assert res["profile"]["name"] == "raspberry-pi-4"
    assert res["bundle"]["budget_mb"] == 1024
    assert res["bundle"]["max_batch"]["zo-sgd"] == 32
    assert main(["device", "--list", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["profiles"]) == len(list_profiles())


def test_el_device_is_typed_and_is_what_the_command_prints(capsys) -> None:
    import edgelearn as el
    from edgelearn.demo import DATA

    # a budget far above this process's resident memory: the typed report is checked here,
    # the sizing against a real budget in fresh processes below
    report = el.device(DATA / "demo", profile="raspberry-pi-4", backend="onnxruntime",
                       batch_size=8, memory_budget_mb=1 << 20)
    assert report.profile is not None
    assert report.profile.name == "raspberry-pi-4"
    assert report.bundle is not None
    assert report.bundle.budget_mb == 1 << 20
    assert report.bundle.max_batch["zo-sgd"] == 8
    assert "error" in report.bundle.plans["zo-scale"]  # no int8 scales in the demo bundle
    assert main(["device", str(DATA / "demo"), "--device", "raspberry-pi-4", "--backend",
                 "onnxruntime", "--batch-size", "8", "--memory-budget-mb", str(1 << 20),
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    want = report.to_json()
    assert res["profile"] == want["profile"]
    assert res["bundle"]["max_batch"] == want["bundle"]["max_batch"]
    assert set(res["bundle"]) == set(want["bundle"])
    assert el.device().bundle is None
    assert [p.name for p in el.device_profiles()] == list_profiles()
    fresh = _fresh_process_json(["device", str(DATA / "demo"), "--device", "raspberry-pi-4",
                                 "--backend", "onnxruntime", "--batch-size", "8"])
    assert fresh["bundle"]["budget_mb"] == 1024
    assert fresh["bundle"]["max_batch"]["zo-sgd"] == 8


def test_registries_name_what_the_configs_accept() -> None:
    import edgelearn as el
    from edgelearn.backends import BACKENDS
    from edgelearn.losses import LOSSES
    from edgelearn.optim import REGISTRY

    assert list(el.optimizers()) == sorted(REGISTRY)
    assert el.optimizers()["polystep"] is REGISTRY["polystep"].Options
    assert el.objectives() == tuple(sorted(LOSSES))
    assert el.backend_names() == tuple(BACKENDS)


# -- the device picks what is installed ------------------------------------------------------
#: run the CLI in a fresh interpreter where onnxruntime and onnx do not import (a device with
#: `pip install 'edgelearn[litert]'` only): `None` in sys.modules makes `import` raise
_LITERT_ONLY = ("import sys\n"
                "sys.modules['onnxruntime'] = sys.modules['onnx'] = None\n"
                "from edgelearn.cli import main\n"
                "code = main(sys.argv[1:])\n"
                "assert sys.modules.get('onnxruntime') is None, 'onnxruntime was loaded'\n"
                "sys.exit(code)\n")


def _litert_only(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _LITERT_ONLY, *argv], capture_output=True,
                          text=True, timeout=300)


def _header(run_dir) -> dict:
    from edgelearn.journal import read_journal

    records, _ = read_journal(run_dir / "journal.bin")
    return records[0]


def test_litert_only_install_runs_demo_train_eval_without_flags(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert")
    from edgelearn.demo import DATA, demo_data

    demo = _litert_only("demo", "--out", str(tmp_path / "demo"), "--steps", "5",
                        "--batch-size", "16", "--json")
    assert demo.returncode == 0, demo.stderr
    res = json.loads(demo.stdout)
    assert res["backend"] == "litert"
    assert set(res["accuracy_after"]) >= {"zo-sgd", "tpsgd", "polystep"}
    assert res["unavailable"] == {}
    for name in res["optimizers"]:
        assert _header(tmp_path / "demo" / name)["batch_size"] == 16

    user_train, user_test, _ = demo_data(0)
    np.savez(tmp_path / "u.npz", x=user_train.x, y=user_train.y)
    np.savez(tmp_path / "t.npz", x=user_test.x, y=user_test.y)
    train = _litert_only("train", str(DATA / "demo"), "--data", str(tmp_path / "u.npz"),
                         "--optimizer", "tpsgd", "--lr", "0.1", "--steps", "5", "--out",
                         str(tmp_path / "run"), "--json")
    assert train.returncode == 0, train.stderr
    assert _header(tmp_path / "run")["taps_backend"] == "litert"  # replay re-runs it there
    ev = _litert_only("eval", str(DATA / "demo"), "--data", str(tmp_path / "t.npz"),
                      "--weights", json.loads(train.stdout)["weights"], "--json")
    assert ev.returncode == 0, ev.stderr
    assert 0.0 <= json.loads(ev.stdout)["accuracy"] <= 1.0


def test_litert_only_install_and_a_bundle_without_tflite_say_exactly_that(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert")
    from bundle_edit import TFLITE_ROLES, demo_bundle_without

    bundle = demo_bundle_without(tmp_path / "b", TFLITE_ROLES,
                                 tflite_skipped="litert-torch cannot convert aten.foo")
    np.savez(tmp_path / "u.npz", x=np.zeros((4, 64), np.float32), y=np.zeros(4, np.int64))
    for argv in (["train", str(bundle), "--data", str(tmp_path / "u.npz"), "--steps", "2",
                  "--out", str(tmp_path / "run")],
                 ["eval", str(bundle), "--data", str(tmp_path / "u.npz")],
                 ["bench", str(bundle), "--runs", "1", "--steps", "1"]):
        proc = _litert_only(*argv)
        assert proc.returncode == 2, (argv, proc.stderr)
        (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgelearn")]
        assert "no TFLite model (model.tflite: litert-torch cannot convert aten.foo)" in line
        assert "only litert is installed" in line
        assert "--formats onnx,tflite" in line
        assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run" / "journal.bin").exists()


def test_profile_preference_skips_backends_the_bundle_has_no_model_for(tmp_path) -> None:
    pytest.importorskip("ai_edge_litert")
    from bundle_edit import TFLITE_ROLES, demo_bundle_without

    from edgelearn.demo import DATA

    pi = load_profile("raspberry-pi-4")
    assert pi.backends[0] == "litert"
    assert resolve_backend(pi, None, load_bundle(DATA / "demo")) == "litert"
    onnx_only = load_bundle(demo_bundle_without(tmp_path / "b", TFLITE_ROLES))
    assert resolve_backend(pi, None, onnx_only) == "onnxruntime"
    assert resolve_backend(pi, "litert", onnx_only) == "litert"  # an explicit flag wins


def test_device_human_output_is_rounded_and_json_is_not(capsys) -> None:
    import re

    from edgelearn.demo import DATA

    assert main(["device", str(DATA / "demo")]) == 0
    text = capsys.readouterr().out
    assert "predicted peak" in text
    sizes = re.findall(r"([\d.]+) [kM]B\b", text)
    assert len(sizes) >= 4
    assert all(re.fullmatch(r"\d+(\.\d)?", s) for s in sizes), sizes
    assert main(["device", str(DATA / "demo"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    peaks = [p["predicted_peak_mb"] for p in res["bundle"]["plans"].values()
             if "predicted_peak_mb" in p]
    assert peaks
    assert any(p != round(p, 1) for p in peaks)  # full values, not the printed ones
    assert "not for this bundle" in res["bundle"]["plans"]["zo-scale"]["error"]


def test_a_population_graphs_candidates_count_in_the_memory_plan(tmp_path) -> None:
    """One population-graph call runs an optimizer's candidates together: the plan counts
    the activations that depend on them once per candidate (the frozen body's once), and the
    candidate rows a run writes (not the scorer's 64)."""
    import edgelearn as el
    from edgelearn.budget import activation_bytes_per_example, population_activation_bytes
    from edgelearn.demo import DATA, demo_data

    demo = DATA / "demo"
    # x and the frozen layer's Gemm and Relu [batch, 64] once; the head's MatMul and the
    # logits [K, batch, 10] per candidate
    assert population_activation_bytes(demo / "model_pop.onnx") == (3 * 64 * 4, 2 * 10 * 4)
    single = activation_bytes_per_example(demo / "model.onnx")
    train = demo_data()[0]
    for name, options, cands in (("zo-gn", {}, 17), ("fzoo", {"probes": 4}, 5),
                                 ("zo-sgd", {"restore": "drift"}, 1)):
        cfg = el.TrainConfig(optimizer=name, options=options, trainable="head.*",
                             batch_size=32)
        with el.Session(demo, tmp_path / name, cfg,
                        el.RuntimeConfig(memory_budget_mb=1 << 20)) as s:
            plan = s.run(train, 1).memory_plan
        assert plan["candidates_per_call"] == cands
        per_ex = single if cands == 1 else max(single, 3 * 64 * 4 + cands * 2 * 10 * 4)
        assert plan["activation_kb_per_example"] == round(per_ex / 1024, 1)
        # zo-gn keeps its candidates' logits (10 per example) and its float64 system
        assert plan["optimizer_kb_per_example"] == round(
            s.optimizer.example_bytes(10) / 1024, 1)
        assert (plan["optimizer_kb_per_example"] > 0) is (name == "zo-gn")
        rows = 0 if cands == 1 else 2 * 4 * cands * 650  # the rows written, fed as inputs
        assert plan["extra_bytes"] >= rows
        # not 64 rows (the noise caches, `edgelearn.rng.cache_bytes`, are in every plan)
        assert plan["extra_bytes"] < rows + (1 << 20) + 2 * 4 * 650 * 4 + rng.cache_bytes()


def test_a_large_slice_is_scored_a_few_candidates_per_call(tmp_path, monkeypatch) -> None:
    """Candidate rows per population call stay under ROWS_MAX_BYTES (at least one candidate),
    and the memory plan counts the candidates a call then runs, not the population's."""
    import edgelearn as el
    from edgelearn.backends import ort_population
    from edgelearn.demo import DATA, demo_data

    n = 650  # the demo head's weights
    monkeypatch.setattr(ort_population, "ROWS_MAX_BYTES", 3 * 4 * n + 7)
    train = demo_data()[0]
    cfg = el.TrainConfig(optimizer="zo-gn", trainable="head.*", batch_size=32)
    with el.Session(DATA / "demo", tmp_path / "run", cfg,
                    el.RuntimeConfig(memory_budget_mb=1 << 20)) as s:
        assert s.evaluator.pop_eval.max_population == 3
        res = s.run(train, 4)
    assert res.memory_plan["candidates_per_call"] == 3
    assert res.loss_last < res.loss_first
    monkeypatch.setattr(ort_population, "ROWS_MAX_BYTES", 1)
    from edgelearn.model import Model

    model = Model(el.load_bundle(DATA / "demo"), trainable="head.*")
    assert model.backend.population_scorer().max_population == 1


def test_later_plans_of_a_session_do_not_count_its_buffers_twice(tmp_path) -> None:
    """A session plans from the resident memory before its run allocated anything: a second
    `run` (or a larger live batch) does not add the optimizer's buffers, the candidate rows
    and the runtime's arenas, already resident by then, on top of themselves."""
    import edgelearn as el
    from edgelearn.demo import DATA, demo_data

    train = demo_data()[0]
    cfg = el.TrainConfig(optimizer="zo-gn", trainable="head.*", batch_size=32)
    with el.Session(DATA / "demo", tmp_path / "run", cfg,
                    el.RuntimeConfig(memory_budget_mb=1 << 20)) as s:
        first = s.run(train, 2).memory_plan
        _ = np.ones(4 << 20)  # 32 MB more resident in this process
        second = s.run(train, 4).memory_plan
    assert second == first


def test_weights_dequantized_as_the_model_runs_count_once_at_their_peak(tmp_path) -> None:
    """An int8 model dequantizes its weights each forward (Cast, then Mul by the scale):
    tensors without a batch axis that the plan counts at the peak of those alive at once."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    from edgelearn.budget import activation_profile

    w1 = numpy_helper.from_array(np.ones((4, 1000), np.int8), "w1")
    w2 = numpy_helper.from_array(np.ones((1000, 4), np.int8), "w2")
    s = numpy_helper.from_array(np.full((1,), 0.5, np.float32), "s")
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w1"], ["wf1"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["wf1", "s"], ["wd1"]),
         helper.make_node("MatMul", ["x", "wd1"], ["h"]),
         helper.make_node("Cast", ["w2"], ["wf2"], to=TensorProto.FLOAT),
         helper.make_node("Mul", ["wf2", "s"], ["wd2"]),
         helper.make_node("MatMul", ["h", "wd2"], ["y"])], "int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], [w1, w2, s])
    path = tmp_path / "m.onnx"
    onnx.save(helper.make_model(graph), str(path))
    per_example, fixed = activation_profile(path)
    assert per_example == 4 * (4 + 1000 + 4)  # x, h, y
    # wf1 and wd1 alive together while Mul runs, wd1 until the first MatMul; then the same
    # for the second weight: the peak is one weight's pair, not the four tensors' sum
    assert fixed == 2 * 4 * 4000


@pytest.mark.parametrize("optimizer", ["zo-gn", "zo-readout", "zo-sgd", "tpsgd"])
def test_a_small_models_plan_covers_its_peak(tmp_path, optimizer: str) -> None:
    """The plan's promise where the runtime outweighs the activations (the demo's head, a
    fresh CLI process each): predicted peak >= the run's measured peak. The resident memory
    it plans from is measured after its own graph analyses, whose onnx import stays resident
    (measured before them, zo-gn's plan said 90.3 MB for a 92.3 MB peak)."""
    from edgelearn.demo import DATA, demo_data

    train = demo_data()[0]
    data = tmp_path / "user.npz"
    np.savez(data, x=train.x, y=train.y)
    cmd = [sys.executable, "-m", "edgelearn.cli", "train", str(DATA / "demo"), "--data",
           str(data), "--optimizer", optimizer, "--trainable", "head.*", "--steps", "30",
           "--memory-budget-mb", "100000", "--out", str(tmp_path / "run"), "--json"]
    res = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    assert res["memory_plan"]["predicted_peak_mb"] >= res["peak_rss_mb"]


# -- symbolic dimensions besides the batch (a transformer's sequence) ---------------------------
def _text_bundle(tmp_path: Path, dim: int = 16) -> Path:
    """A generated two-input text encoder (input_ids, attention_mask [batch, sequence]) with a
    masked-mean head, through `prepare`."""
    pytest.importorskip("onnx")
    from onnx_models import embedder_onnx

    import edgelearn as el

    src = embedder_onnx(tmp_path / "enc.onnx", int_inputs=True, dim=dim)
    el.tools.prepare(src, tmp_path / "b", new_head="tokens:2", pool="masked-mean",
                     mask="attention_mask")
    return tmp_path / "b"


def _tokens(n: int, seq: int) -> dict[str, np.ndarray]:
    ids = np.random.default_rng(0).integers(1, 12, (n, seq)).astype(np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "y": (np.arange(n) % 2).astype(np.int64)}


def test_data_dims_size_the_inputs_symbols_but_not_the_batch() -> None:
    from edgelearn.budget import data_dims, unsized_dims
    from edgelearn.bundle import TensorSpec

    specs = [TensorSpec("ids", ("batch", "sequence"), "int64"),
             TensorSpec("mask", ("batch", 1, "sequence"), "int64"),
             TensorSpec("x", ("batch", 4), "float32")]
    x = {"ids": np.zeros((3, 7)), "mask": np.zeros((3, 1, 9)), "x": np.zeros((3, 4))}
    assert data_dims(specs, x) == {"sequence": 9}  # inputs that disagree: the larger
    assert data_dims(specs[:1], np.zeros((5, 11))) == {"sequence": 11}  # one array
    assert unsized_dims(specs, {}) == ["sequence"]
    assert unsized_dims(specs, {"sequence": 9}) == []


def test_the_plan_sizes_a_sequence_from_the_data(tmp_path: Path) -> None:
    """A symbolic non-batch dimension counted 1 whatever the data: an int8 MiniLM-L6 at
    sequence length 128 planned 596 MB for a 1046 MB peak. Sized by the data, the plan's
    activations grow with the sequence, and `device` (no data) names what it counted 1."""
    b = load_bundle(_text_bundle(tmp_path))
    kb = {seq: plan_batch(b, batch_size=32, budget_mb=1e9, base_mb=0.0,
                          dims={"sequence": seq})["activation_kb_per_example"]
          for seq in (8, 64)}
    assert kb[64] > 6 * kb[8]
    plan = plan_batch(b, batch_size=32, budget_mb=1e9, base_mb=0.0)
    assert (plan["dims"], plan["unsized_dims"]) == ({}, ["sequence"])
    assert plan["activation_kb_per_example"] < kb[8]
    text = subprocess.run([str(Path(sys.executable).parent / "edgelearn"), "device",
                           str(b.path), "--device", "raspberry-pi-4"], capture_output=True,
                          text=True, timeout=300, check=True).stdout
    assert "symbolic dims counted as 1 here: sequence; activations grow with them" in text
    sized = _fresh_process_json(["device", str(b.path), "--device", "raspberry-pi-4", "--dim",
                                 "sequence=64"])["bundle"]["plans"]["zo-sgd"]
    assert (sized["dims"], sized["unsized_dims"]) == ({"sequence": 64}, [])
    assert sized["activation_kb_per_example"] == kb[64]
    bad = subprocess.run([str(Path(sys.executable).parent / "edgelearn"), "device",
                          str(b.path), "--dim", "sequence=long"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "edgelearn: error: --dim expects NAME=SIZE with a positive integer size, got "
        "'sequence=long'"]
    typo = subprocess.run([str(Path(sys.executable).parent / "edgelearn"), "device",
                           str(b.path), "--dim", "seq=128"], capture_output=True, text=True,
                          timeout=300, check=False)
    assert typo.returncode == 2
    assert typo.stderr.strip().splitlines() == [
        "edgelearn: error: no input dimension named seq (the bundle's symbolic dimensions "
        "besides the batch: sequence)"]


def test_a_long_sequences_plan_covers_its_peak(tmp_path: Path) -> None:
    """The plan's promise where the activations outweigh the runtime (fresh CLI processes):
    [32, 512, 256] float32 token tensors. Counting the sequence as 1 predicted 95 MB for the
    run's 193 MB peak. The plan is the uncached run's (so both take the same batch); a run
    that runs its frozen prefix in sessions of its own (per step: the encoder's rows depend
    on the batch) kept the whole graph's check forward allocated beside them, 244 MB."""
    bundle = _text_bundle(tmp_path, dim=256)
    np.savez(tmp_path / "long.npz", **_tokens(64, 512))
    runs = {cache: _fresh_process_json(
        ["train", str(bundle), "--data", str(tmp_path / "long.npz"), "--optimizer", "zo-sgd",
         "--steps", "4", "--memory-budget-mb", "100000", "--out", str(tmp_path / str(cache)),
         *([] if cache else ["--no-cache"])]) for cache in (False, True)}
    plan, plain = runs[False]["memory_plan"], runs[False]["peak_rss_mb"]
    assert plan["dims"] == {"sequence": 512}
    assert plan["predicted_peak_mb"] >= plain
    assert plan["activation_kb_per_example"] * 32 / 1024 > 0.5 * (plain - plan["base_mb"])
    assert runs[True]["cache"]["prefix"] == "per step"
    cached_plan = runs[True]["memory_plan"]
    for key in ("batch_size", "activation_kb_per_example", "dims"):
        assert cached_plan[key] == plan[key]
    assert runs[True]["peak_rss_mb"] <= plain + 0.1 * (plain - plan["base_mb"])


def test_a_live_batchs_rows_and_sequence_are_checked_against_the_budget(tmp_path: Path) -> None:
    """Session.step under a budget checks a dict batch by its rows (it read the number of
    inputs) and its sequence length."""
    import edgelearn as el

    bundle = load_bundle(_text_bundle(tmp_path, dim=256))
    per_ex = plan_batch(bundle, batch_size=1, budget_mb=1e9, base_mb=0.0,
                        dims={"sequence": 512})["activation_kb_per_example"] / 1024
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=2)
    few = _tokens(2, 512)
    y = few.pop("y")
    with el.Session(bundle, tmp_path / "probe", cfg,
                    el.RuntimeConfig(memory_budget_mb=1e9)) as s:  # what plans start from here
        base = s.run(el.Dataset(few, y), 1).memory_plan["base_mb"]
    budget = 1.1 * (base + 8 + 20 * per_ex)  # ~20 rows of 512 tokens fit, not 40
    rt = el.RuntimeConfig(memory_budget_mb=budget)
    with el.Session(bundle, tmp_path / "live", cfg, rt) as s:
        batch = _tokens(40, 512)
        y = batch.pop("y")
        with pytest.raises(InputError, match=r"a batch of 40 \(sequence 512\) exceeds"):
            s.step((batch, y))
        short = {k: v[:, :16] for k, v in batch.items()}  # 40 rows of 16 tokens fit
        s.step((short, y))
