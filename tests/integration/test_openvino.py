"""The OpenVINO engine against ONNX Runtime on the same exported graphs: per graph (f32 tight, bf16 loose), the whole
ADS/SAFF loop on real ELPV cells (adaptive steps and scores), the model cache in the bundle, no torch at run time,
clear errors.

Tolerances (measured on a 2-core AVX-512-BF16 CPU, the tiny random-init bundle, real ELPV cells): f32 graphs within
6e-6 relative (max |difference| / max |reference|) of ONNX Runtime, gate 1e-4 as for the fp32 export; bf16 graphs
within 3e-3 (dino) to 4.8e-2 (vae_decoder), their mean error 2-3e-2 of the mean |value|: gate 1e-1 on the max and
4e-2 on the mean (bf16 keeps 8 mantissa bits to fp16's 11, so the fp16 export gate of 5e-2 is too tight for a
deep conv graph). Whole loop: f32 the same adaptive steps, scores within 1e-4 relative (measured 1.2e-6); bf16 a
decision may flip only for an image whose check score lies within 5% of tau (none flipped here), scores within
3e-2 relative of max |score| (measured 1.3e-2)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import bundle_copy, detect_without_torch

ov = pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")  # the exported_bundle fixture exports

from glad_runtime.core.bundle import Bundle, BundleError  # noqa: E402
from glad_runtime.core.images import preprocess  # noqa: E402
from glad_runtime.engines import EngineError, load_engines  # noqa: E402
from glad_runtime.errors import EngineSpecError  # noqa: E402
from glad_runtime.pipeline.batch import GladPipeline  # noqa: E402

REL = {"f32": 1e-4, "bf16": 1e-1}       # per graph, max |difference| relative to the output's max |value|
MEAN_REL = {"f32": 1e-5, "bf16": 4e-2}  # per graph, mean |difference| relative to the mean |value|
SCORE_REL = {"f32": 1e-4, "bf16": 3e-2}  # whole loop, relative to max |score|
ADS_FLIP = {"f32": 0.0, "bf16": 5e-2}    # a decision may flip only within this relative distance of tau

HAS_BF16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
PRECISIONS = ["f32", pytest.param("bf16", marks=pytest.mark.skipif(not HAS_BF16, reason="no bf16 on this CPU"))]


@pytest.fixture(scope="module")
def bundle(exported_bundle, tmp_path_factory):
    """A copy of the session's exported tiny bundle (the engine writes its model cache into the bundle)."""
    return bundle_copy(exported_bundle[0], tmp_path_factory, "openvino")


@pytest.fixture(scope="module")
def engines(bundle):
    """``{"ort": OrtEngines, "f32": OpenVinoEngines, "bf16": ...}``, the ADS check graph loaded in each, chunks of 4."""
    from glad_runtime.engines.openvino import OpenVinoEngines
    from glad_runtime.engines.ort import OrtEngines

    out = {"ort": OrtEngines(bundle, max_batch=4, fused_check=True),
           "f32": OpenVinoEngines(bundle, "f32", max_batch=4, fused_check=True)}
    if HAS_BF16:
        out["bf16"] = OpenVinoEngines(bundle, "bf16", max_batch=4, fused_check=True)
    return out


@pytest.fixture(scope="module")
def real_batch(elpv_images, bundle):
    good, bad = elpv_images
    imgs = np.concatenate([good[:3], bad[:3]])
    return np.stack([preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), bundle.config.resolution)
                     for i in imgs])


def _rel(a, ref):
    return float(np.abs(a - ref).max() / np.abs(ref).max())


@pytest.mark.parametrize("precision", PRECISIONS)
def test_per_graph_parity_with_onnxruntime(engines, real_batch, precision):
    """Every graph at batch 1 and 5 (one chunk of 4 + one of 1: the dynamic batch), real cells through the encoder,
    latents noised at the bundle's timesteps, against ONNX Runtime on the same files."""
    from export.onnx_export import _resize

    ort_e, e = engines["ort"], engines[precision]
    cfg = e.config
    errs, means = {}, {}

    def gap(key, a, ref):
        errs[key], means[key] = _rel(a, ref), float(np.abs(a - ref).mean() / np.abs(ref).mean())

    for n in (1, 5):
        x = real_batch[:n]
        z = ort_e.encode(x)
        gap(("vae_encoder", n), e.encode(x), z)
        ts = np.linspace(1, cfg.t_max, n).astype(np.int64)
        noisy = (0.8 * z + 0.6 * np.random.default_rng(n).standard_normal(z.shape)).astype(np.float32)
        gap(("unet", n), e.unet(noisy, ts), ort_e.unet(noisy, ts))
        gap(("vae_decoder", n), e.decode(z), ort_e.decode(z))
        for size in (cfg.dino_resolution, cfg.ads_size):
            xs = _resize(x, size)
            for name, a, r in zip(e._token_names, e.features(xs), ort_e.features(xs)):
                assert a.dtype == np.float32 and a.shape == r.shape
                gap((f"{e._feature_graphs[size]}:{name}", n), a, r)
        d = ort_e.ads_distance(noisy, z, cfg)
        gap(("ads_check", n), e.ads_distance(noisy, z, cfg), d)
    print(precision, {f"{g}@{n}": f"{v:.1e}/{means[g, n]:.1e}" for (g, n), v in errs.items()})
    assert max(errs.values()) < REL[precision], errs
    assert max(means.values()) < MEAN_REL[precision], means


@pytest.mark.parametrize("precision", PRECISIONS)
def test_pipeline_parity_on_real_images(engines, real_batch, precision):
    """The whole ADS/SAFF loop, ONNX Runtime fp32 the reference; tau the median first-check score, so decisions
    differ across images and a step mismatch would show."""
    ref_e, e = engines["ort"], engines[precision]
    cfg0 = ref_e.config
    probe = GladPipeline(ref_e, cfg0.replace(min_step=0))(real_batch)
    tau = float(np.median(probe.ads_scores))
    cfg = cfg0.replace(tau=tau)
    ref = GladPipeline(ref_e, cfg)(real_batch)
    assert len(set(ref.adaptive_steps.tolist())) > 1, "tau should split the batch"
    out = GladPipeline(e, cfg)(real_batch)
    flipped = out.adaptive_steps != ref.adaptive_steps
    assert np.all(np.abs(ref.ads_scores[flipped] - tau) <= ADS_FLIP[precision] * tau), (ref.ads_scores, tau)
    assert flipped.sum() <= (0 if precision == "f32" else 1)
    same = ~flipped
    rel = np.abs(out.scores[same] - ref.scores[same]).max() / np.abs(ref.scores).max()
    print(precision, "steps", ref.adaptive_steps.tolist(), out.adaptive_steps.tolist(), f"score rel {rel:.1e}",
          f"ads rel {_rel(out.ads_scores[same], ref.ads_scores[same]):.1e}")
    assert rel < SCORE_REL[precision], rel
    assert np.all(np.isfinite(out.anomaly_maps))


def test_static_batch_models_equal_the_dynamic_one(bundle, engines, real_batch):
    from glad_runtime.engines.openvino import OpenVinoEngines

    e = OpenVinoEngines(bundle, "f32", static_batches=(1,))
    assert ("unet", 1) in e._static
    for n in (1, 3):
        z = engines["f32"].encode(real_batch[:n])
        np.testing.assert_allclose(e.encode(real_batch[:n]), z, rtol=0, atol=1e-5 * np.abs(z).max())


def test_model_cache_in_the_bundle(exported_bundle, tmp_path):
    """First load compiles and writes ``engines/openvino/<version>-<cpu key>/``; a second load reads it. The cache
    is not in the manifest and the bundle still verifies."""
    from glad_runtime.engines.openvino import OpenVinoEngines, cache_key

    shutil.copytree(exported_bundle[0].path, tmp_path / "b")
    b = Bundle(tmp_path / "b")
    first = OpenVinoEngines(b)
    key = cache_key(first.core)
    assert first.cache_dir == b.file(f"engines/openvino/{key}") and key.startswith(ov.__version__.split("-")[0])
    blobs = sorted(p.name for p in first.cache_dir.iterdir())
    assert len(blobs) >= len(first.graphs) and not any(first.loaded_from_cache.values())
    second = load_engines(b, "openvino", precision="fp32")
    assert all(second.loaded_from_cache.values()), second.loaded_from_cache
    assert sorted(p.name for p in second.cache_dir.iterdir()) == blobs  # nothing compiled again
    x = np.zeros((2, 3, b.config.resolution, b.config.resolution), np.float32)
    np.testing.assert_array_equal(first.encode(x), second.encode(x))
    if HAS_BF16:  # OpenVINO's CPU blobs hold the graph before the precision is applied: bf16 uses them too
        assert all(OpenVinoEngines(b, "bf16").loaded_from_cache.values())
    assert not any(k.startswith("engines/openvino") for k in b.manifest()["files"])
    b.verify()
    assert OpenVinoEngines(b, cache_dir=False).cache_dir is None


def test_errors(bundle, engines, tiny_bundle, tmp_path, monkeypatch):
    from glad_runtime.engines import openvino as ove

    e = engines["f32"]
    with pytest.raises(EngineError, match="vae_encoder: OpenVINO failed"):
        e.encode(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(EngineError, match="no graph for 64x64"):
        e.features(np.zeros((1, 3, 64, 64), np.float32))
    with pytest.raises(ValueError, match="precision"):
        ove.OpenVinoEngines(bundle, "fp16")
    with pytest.raises(EngineSpecError, match="openvino' accepts provider cpu; got 'cuda'"):
        load_engines(bundle, "openvino", provider="cuda")  # runs on the CPU only
    with pytest.raises(BundleError, match="glad export"):
        ove.OpenVinoEngines(tiny_bundle)  # never exported
    shutil.copytree(bundle.path, tmp_path / "b", ignore=shutil.ignore_patterns("engines"))
    with open(tmp_path / "b" / "onnx" / "dino.onnx", "ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="dino.onnx"):
        ove.OpenVinoEngines(tmp_path / "b")

    class NoBf16Core(ov.Core):
        def get_property(self, device, name):
            got = super().get_property(device, name)
            return [c for c in got if c != "BF16"] if name == "OPTIMIZATION_CAPABILITIES" else got

    monkeypatch.setattr(ov, "Core", NoBf16Core)
    with pytest.raises(EngineError, match="no bf16 support"):
        ove.OpenVinoEngines(bundle, "bf16")


def test_detect_runs_without_torch(bundle, tmp_path, elpv_images):
    """`glad detect --engine openvino --precision bf16` (f32 without bf16) in a fresh interpreter: torch is never
    imported."""
    from PIL import Image

    good, bad = elpv_images
    for i, img in enumerate([good[0], bad[0]]):
        Image.fromarray(img).save(tmp_path / f"cell{i}.png")
    out = tmp_path / "out"
    precision = "bf16" if HAS_BF16 else "fp32"
    records = detect_without_torch(bundle.path, tmp_path, out, ['--engine', 'openvino', '--precision', precision])
    assert len(records) == 2 and all(np.isfinite(r["score"]) for r in records)


def test_mixed_engines_route_each_graph_and_keep_the_results(bundle, engines, real_batch):
    """MixedEngines (issue 19, item 2): graphs routed to OpenVINO f32 or ONNX Runtime per the plan give the ONNX
    Runtime fp32 loop (f32 gates); the plan round-trips through the bundle and `load_engines(..., "mix")`, and a
    plan of another CPU or no plan at all is refused with the command that measures one."""
    from glad_runtime.core.bundle import BundleError
    from glad_runtime.engines import load_engines
    from glad_runtime.engines.mix import PLAN_FILE, MixedEngines, write_plan

    plan = {"unet": "openvino-f32", "dino": "openvino-f32", "vae_encoder": "ort-fp32"}
    mixed = MixedEngines(bundle, plan, max_batch=4)
    assert mixed.choices["unet"] == "openvino-f32" and mixed.choices["vae_decoder"] == "ort-fp32"
    assert set(mixed.engines) == {"ort", "openvino"}
    # each engine loaded only its own graphs
    assert set(mixed.engines["openvino"].graph_precisions) == {"unet", "dino"}
    assert "unet" not in mixed.engines["ort"].sessions and "vae_decoder" in mixed.engines["ort"].sessions
    ref = GladPipeline(engines["ort"], bundle.config)(real_batch)
    out = GladPipeline(mixed, bundle.config)(real_batch)
    assert out.adaptive_steps.tolist() == ref.adaptive_steps.tolist()
    assert np.abs(out.scores - ref.scores).max() / np.abs(ref.scores).max() < SCORE_REL["f32"]
    with pytest.raises(BundleError, match="bench.cpu_mix"):
        load_engines(bundle, "mix")
    write_plan(bundle, {g: {"choice": c} for g, c in plan.items()})
    loaded = load_engines(bundle, "mix")
    assert loaded.choices == mixed.choices
    plan_file = bundle.file(PLAN_FILE)
    plan_file.write_text(plan_file.read_text().replace('"cpu": "', '"cpu": "another CPU '))
    with pytest.raises(BundleError, match="another CPU"):
        load_engines(bundle, "mix")
    with pytest.raises(ValueError, match="choices"):
        MixedEngines(bundle, {"unet": "openvino-fp64"})
