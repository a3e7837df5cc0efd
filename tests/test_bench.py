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
