"""bench: FLOP counts against closed forms, percentiles against numpy, and one short real run on ONNX Runtime."""

from __future__ import annotations

import json

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")


def _conv_matmul_graph(path):
    """x [1,3,8,8] -> Conv(3->5, 3x3, pad 1) -> Reshape [1,5,64] -> MatMul W [64,7] -> y [1,5,7]."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((5, 3, 3, 3)).astype(np.float32), "w")
    m = numpy_helper.from_array(rng.standard_normal((64, 7)).astype(np.float32), "m")
    shape = numpy_helper.from_array(np.array([1, 5, 64], dtype=np.int64), "shape")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["r"], name="reshape"),
             helper.make_node("MatMul", ["r", "m"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, m, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = onnx.shape_inference.infer_shapes(model)
    onnx.save(model, str(path))


def test_graph_flops_closed_form(tmp_path):
    from bench.flops import graph_flops

    _conv_matmul_graph(tmp_path / "g.onnx")
    conv = 2 * (5 * 8 * 8) * (3 * 3 * 3)  # 2 * outputs * (C_in * kH * kW)
    matmul = 2 * (5 * 7) * 64  # 2 * M * N * K
    assert graph_flops(tmp_path / "g.onnx") == conv + matmul


def test_percentiles_match_numpy():
    from bench.run import percentiles

    v = np.random.default_rng(1).exponential(size=101)
    p = percentiles(v)
    assert p == {"p50": np.percentile(v, 50), "p95": np.percentile(v, 95), "p99": np.percentile(v, 99)}


def test_bench_runs_on_ort_and_writes_outputs(exported_bundle, elpv_images, tmp_path):
    from bench.run import run_bench, write_outputs
    from glad_runtime.core.images import preprocess

    b = exported_bundle[0]
    good, bad = elpv_images
    imgs = np.stack([preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), b.config.resolution)
                     for i in (good[0], bad[0])])
    res = run_bench(b, engines=("ort-fp32", "ort-int4"), images=imgs, names=["good", "bad"], batch_sizes=(1, 2),
                    repeats=1)
    r = res["engines"]["ort-fp32"]
    assert set(r["batch"]) == {"1", "2"} and r["batch"]["1"]["requests"] == 2
    assert sum(r["adaptive_steps"].values()) == 2
    assert "ort-int4" in res["skipped"] and "precision" in res["skipped"]["ort-int4"]
    c = res["ads_cost"]
    assert 0 < c["ads_share_of_loop"] < 1 and c["adaptive_over_fixed"] > 1  # checks cost time
    f = res["flops_per_image"]
    assert f["ads_check"] > 0 and f["total"] > 5 * f["unet_step"]
    paths = write_outputs(res, tmp_path)
    assert json.loads(paths["json"].read_text())["engines"]["ort-fp32"]["batch"]["2"]["images_per_s"] > 0
    assert "| ort-fp32 | 2 |" in paths["md"].read_text()


def _groupnorm_shape_math_graph(path):
    """x [batch,3,8,8] -> Conv(3->4, 1x1) -> GroupNormalization -> Reshape to [Shape(x)[0], 4, 64] (computed from
    the input's shape at run time) -> MatMul W [64,5]: the two patterns plain ONNX shape inference leaves
    symbolic (GroupNormalization's batch in onnx 1.23; Shape -> Gather -> Concat shape arithmetic)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.ones(4, np.float32), "gs"), numpy_helper.from_array(np.zeros(4, np.float32), "gb"),
             numpy_helper.from_array(rng.standard_normal((64, 5)).astype(np.float32), "m"),
             numpy_helper.from_array(np.array([0], np.int64), "i0"),
             numpy_helper.from_array(np.array([4, 64], np.int64), "tail")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"]),
             helper.make_node("GroupNormalization", ["c", "gs", "gb"], ["g"], num_groups=2),
             helper.make_node("Shape", ["x"], ["s"]), helper.make_node("Gather", ["s", "i0"], ["b"]),
             helper.make_node("Add", ["b", "i0"], ["b2"]),
             helper.make_node("Concat", ["b2", "tail"], ["shape"], axis=0),
             helper.make_node("Reshape", ["g", "shape"], ["r"]), helper.make_node("MatMul", ["r", "m"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]), str(path))


def test_graph_flops_from_shape_inference_alone(tmp_path):
    """Counted without running the graph (weights not even loaded): Conv + MatMul in closed form."""
    from bench.flops import graph_flops

    _groupnorm_shape_math_graph(tmp_path / "g.onnx")
    d = graph_flops(tmp_path / "g.onnx", detail=True)
    assert d["flops"] == 2 * (4 * 8 * 8) * 3 + 2 * (4 * 5) * 64
    assert d["by_op"] == {"Conv": 2 * (4 * 8 * 8) * 3, "MatMul": 2 * (4 * 5) * 64}


def test_graph_flops_of_the_exported_graphs_without_running_them(exported_bundle):
    """Every exported graph counts; the ADS check (two decodes and the ADS ViT) costs more than its parts' sum of
    one decode and one ADS feature call."""
    from bench.flops import graph_flops

    b = exported_bundle[0]
    fl = {g: graph_flops(b.file(f"onnx/{g}.onnx")) for g in ("unet", "vae_decoder", "dino_ads", "ads_check")}
    assert all(v > 0 for v in fl.values())
    assert fl["ads_check"] >= 2 * fl["vae_decoder"] + fl["dino_ads"]


def test_cpu_mix_times_dino_ads_and_ads_check_with_ads_on(exported_bundle, elpv_images):
    """A bundle shipped with ADS off (the tiny preset) still gets its ADS graphs timed and planned: the loop is
    recorded with ADS on, ``dino_ads`` and ``ads_check`` are in the table and ``dino_ads`` in the plan."""
    from bench.cpu_mix import ads_config, select_mix
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.images import preprocess

    b = Bundle(exported_bundle[0].path)  # its own object: the shared fixture's config stays as it is
    b.config = b.config.replace(ads_enabled=False, tau=0.0)  # as shipped: ADS off; tau 0: every check triggers
    assert ads_config(b).ads_enabled and not ads_config(b, ads=False).ads_enabled
    good, bad = elpv_images
    imgs = np.stack([preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), b.config.resolution)
                     for i in (good[0], bad[0])])
    res = select_mix(b, imgs, choices=("ort-fp32",), batches=(1, 2), repeats=1, write=False, progress=None)
    assert res["ads_enabled"] and "dino_ads" in res["plan"] and "ads_check" in res["graphs"]
    cell = res["graphs"]["dino_ads"]["configs"]["ort-fp32"]
    assert set(cell["s_per_image"]) == {"1", "2"} and cell["passes"] and cell["spread"]["1"] == 0.0
    assert res["peak_gflops"]["fp32"] > 0 and 0 < cell["of_peak"]["2"]
    off = select_mix(b, imgs, choices=("ort-fp32",), batches=(1,), repeats=1, write=False, ads=False, progress=None)
    assert "dino_ads" not in off["plan"] and "ads_check" not in off["graphs"]
