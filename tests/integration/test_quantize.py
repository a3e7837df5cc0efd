"""Quantisation calibration: recorded inputs equal what the loop feeds, the data reader, excluded nodes and file
names, ORT static INT8 Q/DQ graphs close to fp32 on real inputs, the accuracy gate's rule, int8 OrtEngines running
the loop (per-graph fallback to fp32), rejection removing the files, the CLI exit code."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from calib.quantize import (CalibrationSet, GraphDataReader, QuantizationError, QuantSettings,  # noqa: E402
                            RecordingEngines, accuracy_gate, format_gate_table, graph_errors, is_qdq,
                            nodes_to_exclude, quantize_bundle, quantize_graph, quantize_graph_modelopt,
                            quantized_path, record_calibration)
from glad_runtime.core.bundle import BundleError  # noqa: E402
from glad_runtime.core.images import preprocess  # noqa: E402
from glad_runtime.pipeline.batch import GladPipeline  # noqa: E402
from tests.conftest import StubEngines, bundle_copy, stub_config  # noqa: E402

# Documented tolerances (README "Quantisation"): on the RANDOM-INIT tiny networks of the fixtures (the worst case:
# no trained weight structure), INT8 MinMax per-channel outputs on held-out recorded inputs keep a per-sample cosine
# similarity >= 0.98 with fp32 and a mean relative error below 0.2 (measured about 0.05 for the UNet, 0.10 for the
# decoder).
MIN_COSINE = 0.98
MAX_MEAN_REL = 0.2


# ---------------------------------------------------------------------------------------------- recording (stub)
def test_recorded_inputs_match_pipeline_stub():
    cfg = stub_config()
    stub = StubEngines()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 3, 8, 8)).astype(np.float32)
    cset = record_calibration(stub, cfg, [images[:2], images[2:]], names=["a", "b", "c"])
    pipe = GladPipeline(StubEngines(), cfg)
    steps = list(pipe.schedule.timesteps)
    # unet: one call per batch per DDIM step, every row at the step the loop visits, in order
    assert cset.calls["unet"] == 2 * len(steps)
    ts = cset.feeds["unet"]["timesteps"]
    assert ts.dtype == np.int64 and len(ts) == 3 * len(steps)
    expected = np.concatenate([np.repeat(steps, 2), np.repeat(steps, 1)])
    np.testing.assert_array_equal(ts, expected)
    assert cset.feeds["unet"]["latents"].shape == (3 * len(steps), 3, 8, 8)
    # the first UNet input is the input latents noised at the noise timestep with the seeded eps0
    s = pipe.schedule
    x = s.add_noise(images[:2], pipe.noise(2, cfg.seed), s.noise_timestep)
    np.testing.assert_allclose(cset.feeds["unet"]["latents"][:2], x, rtol=1e-6)
    # decoder: the same batches the stub saw (ADS decodes of x0 + anchored, then the final reconstruction)
    ref = StubEngines()
    for part in (images[:2], images[2:]):
        GladPipeline(ref, cfg)(part)
    assert cset.samples("vae_decoder") == sum(ref.decode_batches)
    assert cset.calls["vae_decoder"] == len(ref.decode_batches)
    # encoder: the images themselves; features: the scoring size (ADS size equal here -> the same graph)
    np.testing.assert_array_equal(cset.feeds["vae_encoder"]["images"], images)
    assert cset.calls["dino"] == ref.calls["features"]
    assert cset.images == ["a", "b", "c"]


def test_calibration_set_split_save_load(tmp_path):
    rec = RecordingEngines(StubEngines(), stub_config())
    GladPipeline(rec, stub_config())(np.zeros((2, 3, 8, 8), np.float32))
    cset = CalibrationSet.from_recording(rec)
    calib, check = cset.split("unet", holdout=0.25)
    n = cset.samples("unet")
    assert len(calib["latents"]) + len(check["latents"]) == n and len(check["latents"]) >= 1
    cset.save(tmp_path / "cs")
    back = CalibrationSet.load(tmp_path / "cs")
    assert set(back.feeds) == set(cset.feeds)
    np.testing.assert_array_equal(back.feeds["unet"]["timesteps"], cset.feeds["unet"]["timesteps"])
    with pytest.raises(QuantizationError):
        cset.split("dino_ads")
    with pytest.raises(FileNotFoundError):
        CalibrationSet.load(tmp_path)


def test_data_reader_equal_batches_and_rewind():
    feeds = {"latents": np.arange(10, dtype=np.float32)[:, None], "timesteps": np.arange(10, dtype=np.int64)}
    r = GraphDataReader(feeds, batch_size=4)
    got = []
    while (b := r.get_next()) is not None:
        got.append(b)
    assert [len(b["latents"]) for b in got] == [4, 4] and len(r) == 2  # ragged tail left out
    assert got[1]["timesteps"].dtype == np.int64 and got[1]["latents"].flags.c_contiguous
    r.rewind()
    np.testing.assert_array_equal(r.get_next()["timesteps"], [0, 1, 2, 3])
    assert len(GraphDataReader(feeds, batch_size=64)) == 1  # fewer rows than a batch: one batch of all
    with pytest.raises(QuantizationError):
        GraphDataReader({"a": np.zeros(3), "b": np.zeros(2)})
    with pytest.raises(QuantizationError):
        GraphDataReader({})


def test_nodes_to_exclude_and_names(tiny_bundle):
    import onnx
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Conv", ["x", "w"], ["a"], name="first"),
             helper.make_node("Relu", ["a"], ["b"], name="act"),
             helper.make_node("Conv", ["b", "w"], ["c"], name="mid"),
             helper.make_node("Softmax", ["c"], ["d"], name="sm"),
             helper.make_node("MatMul", ["d", "m"], ["y"], name="last")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
    m = helper.make_model(g)
    assert nodes_to_exclude(m) == ["first", "last"]
    assert nodes_to_exclude(m, first_last=False, extra=["sm"]) == ["sm"]
    assert nodes_to_exclude(m, op_types=("Conv",)) == ["first", "mid"]
    assert not is_qdq(m)
    assert quantized_path(tiny_bundle, "unet").name == "unet.int8.onnx"
    assert quantized_path(tiny_bundle, "dino", "fp8").name == "dino.fp8.onnx"
    with pytest.raises(ValueError):
        quantized_path(tiny_bundle, "unet", "int4")
    with pytest.raises(ValueError):
        QuantSettings(method="kl")
    assert isinstance(onnx.ModelProto(), onnx.ModelProto)


@pytest.mark.skipif(importlib.util.find_spec("modelopt") is not None, reason="ModelOpt installed")
def test_modelopt_absent_is_a_clear_error(tmp_path):
    with pytest.raises(QuantizationError, match="nvidia-modelopt"):
        quantize_graph_modelopt(tmp_path / "a.onnx", tmp_path / "b.onnx", {"x": np.zeros((1, 1))}, mode="fp8")
    with pytest.raises(QuantizationError, match="int8 or fp8"):
        quantize_graph_modelopt(tmp_path / "a.onnx", tmp_path / "b.onnx", {}, mode="int4")


# ---------------------------------------------------------------------------------------------- gate (synthetic)
def test_gate_rule():
    f = {"I-AUROC": 0.90, "AUPRO": 0.60}
    assert accuracy_gate(f, {"I-AUROC": 0.885, "AUPRO": 0.59}, 0.02).accepted
    assert accuracy_gate(f, {"I-AUROC": 0.88, "AUPRO": 0.58}, 0.02).accepted  # exactly at the limit
    r = accuracy_gate(f, {"I-AUROC": 0.87, "AUPRO": 0.60}, 0.02)
    assert not r.accepted and "I-AUROC" in r.reasons[0] and r.deltas["I-AUROC"] == pytest.approx(-0.03)
    assert not accuracy_gate(f, {"I-AUROC": 0.90, "AUPRO": 0.55}, 0.02).accepted  # AUPRO gated when present
    assert accuracy_gate(f, {"I-AUROC": 0.99, "AUPRO": 0.70}, 0.02).accepted  # improvements pass (one-sided)
    assert accuracy_gate({"I-AUROC": 0.9}, {"I-AUROC": 0.9}, 0.0).accepted  # no masks: AUROC only
    assert not accuracy_gate(f, {"I-AUROC": 0.90}, 0.02).accepted  # AUPRO missing in the quantised result
    assert not accuracy_gate({"I-AUROC": 0.9}, {"I-AUROC": float("nan")}).accepted
    with pytest.raises(ValueError):
        accuracy_gate(f, f, -0.1)
    with pytest.raises(ValueError):
        accuracy_gate({"I-AP": 0.9}, {"I-AP": 0.9})


# ---------------------------------------------------------------------------------------------- real graphs
@pytest.fixture(scope="module")
def exported32(tmp_path_factory, exported_bundle):
    """A private copy of the session's exported tiny bundle (ADS on; quantisation writes into it)."""
    return bundle_copy(exported_bundle[0], tmp_path_factory, "quant")


@pytest.fixture(scope="module")
def elpv_batch(elpv_images, exported32):
    good, bad = elpv_images
    r = exported32.config.resolution
    to = lambda i: preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), r)  # noqa: E731
    return np.stack([to(i) for i in good[:4]]), np.stack([to(i) for i in bad[:2]])


@pytest.fixture(scope="module")
def recorded(exported32, elpv_batch):
    from glad_runtime.engines.ort import OrtEngines

    good, _ = elpv_batch
    return record_calibration(OrtEngines(exported32, "fp32"), exported32.config, [good[:2], good[2:]])


def test_recorded_real_shapes_and_timesteps(exported32, recorded):
    cfg = exported32.config
    steps = GladPipeline(StubEngines(), cfg).schedule.timesteps
    n = 4
    assert recorded.samples("vae_encoder") == n
    assert recorded.feeds["vae_encoder"]["images"].shape == (n, 3, cfg.resolution, cfg.resolution)
    assert recorded.samples("unet") == n * len(steps) * cfg.num_seeds
    assert set(np.unique(recorded.feeds["unet"]["timesteps"])) == {int(t) for t in steps}
    assert recorded.feeds["unet"]["latents"].shape[1:] == (cfg.latent_channels, cfg.latent_size, cfg.latent_size)
    assert recorded.feeds["dino"]["images"].shape[1:] == (3, cfg.dino_resolution, cfg.dino_resolution)
    # ADS on at another size: the ADS feature graph sees anchored + x0 decodes of every undecided image
    assert recorded.feeds["dino_ads"]["images"].shape[1:] == (3, cfg.ads_size, cfg.ads_size)
    assert recorded.samples("dino_ads") == recorded.samples("vae_decoder") - 2 * n  # minus roundtrip and final


def test_quantize_static_qdq_close_to_fp32(exported32, recorded, tmp_path):
    import onnx

    for g in ("unet", "vae_decoder"):
        calib, check = recorded.split(g)
        dst = tmp_path / f"{g}.int8.onnx"
        info = quantize_graph(exported32.file(f"onnx/{g}.onnx"), dst, calib)
        m = onnx.load(str(dst))
        assert is_qdq(m) and info["qdq_nodes"] > 0
        assert {p.key: p.value for p in m.metadata_props}["glad.precision"] == "int8"
        names = {n.name for n in m.graph.node if n.op_type in ("Conv", "MatMul", "Gemm")}
        assert set(info["excluded"]) <= names and len(info["excluded"]) == 2
        err = graph_errors(exported32.file(f"onnx/{g}.onnx"), dst, check)
        assert err["cosine"] >= MIN_COSINE and err["mean_rel_err"] < MAX_MEAN_REL, (g, err)


def test_int8_engines_run_loop_with_fallback(exported32, recorded, elpv_batch):
    from glad_runtime.engines.ort import OrtEngines
    from glad_runtime.engines.trt import onnx_source

    b = exported32
    with pytest.raises(BundleError, match="--quantize int8"):
        OrtEngines(b, "int8")  # nothing quantised yet: refused, naming the command
    calib, _ = recorded.split("unet")
    quantize_graph(b.file("onnx/unet.onnx"), quantized_path(b, "unet"), calib)
    b.update_manifest(["onnx/unet.int8.onnx"])
    try:
        e = OrtEngines(b, "int8", fused_check=True)
        assert e.graph_precisions == {"unet": "int8", "vae_encoder": "fp32", "vae_decoder": "fp32", "dino": "fp32",
                                      "dino_ads": "fp32", "ads_check": "fp32"}
        # the check graphs at another precision than ads_check: the fused check would bypass them (host path)
        assert "ads_check" not in OrtEngines(b, {"unet": "int8", "vae_decoder": "fp32", "dino_ads": "fp16"},
                                             fused_check=True).graphs
        assert onnx_source(b, "unet", "int8") == quantized_path(b, "unet")  # what `glad build --precision int8` uses
        good, bad = elpv_batch
        batch = np.concatenate([good[:1], bad[:1]])
        o8 = GladPipeline(e, b.config)(batch)
        o32 = GladPipeline(OrtEngines(b, "fp32"), b.config)(batch)
        assert np.isfinite(o8.scores).all() and o8.anomaly_maps.shape == o32.anomaly_maps.shape
        np.testing.assert_allclose(o8.scores, o32.scores, rtol=0.5)  # random-init model: loose, see README
        m = OrtEngines(b, {"unet": "int8"})
        assert m.graph_precisions["unet"] == "int8" and m.graph_precisions["dino"] == "fp32"
        with pytest.raises(ValueError):
            OrtEngines(b, {"unet": "int4"})
    finally:
        quantized_path(b, "unet").unlink()
        b.update_manifest(["onnx/unet.int8.onnx"])


def _tiny_category(root, elpv_images):
    from PIL import Image

    good, bad = elpv_images
    for sub, imgs in (("train/good", good[:2]), ("test/good", good[2:4]), ("test/defect", bad[:2])):
        (root / sub).mkdir(parents=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(root / sub / f"{i:03d}.png")
    return root


def test_quantize_bundle_gate_rejects_and_removes(exported32, elpv_batch, elpv_images, tmp_path, monkeypatch):
    import calib.quantize as q

    cat = _tiny_category(tmp_path / "cat", elpv_images)
    fake = iter([{"I-AUROC": 0.9, "seconds_per_image": 1.0, "scores": [1.0, 2.0]},
                 {"I-AUROC": 0.8, "seconds_per_image": 0.5, "scores": [1.1, 2.1]}])
    monkeypatch.setattr(q, "evaluate_engines", lambda *a, **k: next(fake))
    good, _ = elpv_batch
    rep = quantize_bundle(exported32, [good[:2]], graphs=["unet"], eval_data=cat, max_delta=0.02)
    assert rep["gate"]["accepted"] is False and rep["rejected_files"] == ["onnx/unet.int8.onnx"]
    assert not quantized_path(exported32, "unet").exists()
    files = exported32.manifest()["files"]
    assert "onnx/unet.int8.onnx" not in files and "onnx/quantize.json" in files
    exported32.verify()
    saved = json.loads(exported32.file("onnx/quantize.json").read_text())
    assert saved["evaluation"]["fp32"]["I-AUROC"] == 0.9 and saved["graphs"]["unet"]["errors"]["cosine"] > 0.9
    lines = format_gate_table(saved)
    assert any("REJECTED" in ln for ln in lines) and any(ln.startswith("I-AUROC") for ln in lines)
    with pytest.raises(QuantizationError, match="unknown graphs"):
        quantize_bundle(exported32, [good[:1]], graphs=["text_encoder"])
    with pytest.raises(QuantizationError, match="modelopt"):
        quantize_bundle(exported32, [good[:1]], mode="fp8")


def test_cli_quantize_accept_then_reject(exported32, elpv_images, tmp_path, monkeypatch):
    from click.testing import CliRunner

    import calib.quantize as q
    from glad_cli.main import cli

    cat = _tiny_category(tmp_path / "cat", elpv_images)
    metrics = {"I-AUROC": 0.9, "seconds_per_image": 1.0, "scores": [1.0]}
    monkeypatch.setattr(q, "evaluate_engines", lambda *a, **k: dict(metrics))
    args = ["calibrate", str(exported32.path), str(cat / "train/good"), "--quantize", "int8", "--graph", "unet",
            "--calib-images", "2", "--eval-data", str(cat), "--quiet"]
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "ACCEPTED" in res.output and quantized_path(exported32, "unet").is_file()
    exported32.verify()
    fake = iter([dict(metrics), {"I-AUROC": 0.5, "seconds_per_image": 1.0, "scores": [1.0]}])
    monkeypatch.setattr(q, "evaluate_engines", lambda *a, **k: next(fake))
    res = CliRunner().invoke(cli, args)
    assert res.exit_code == 1 and "REJECTED" in res.output and "0.4000 below" in res.output
    assert not quantized_path(exported32, "unet").exists()
