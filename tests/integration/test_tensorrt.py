"""TensorRT path, the parts that run without a GPU: GPU parsing, profiles, engine keys and lookup, graph signatures
and refit plans, and the clear refusal on a machine without a GPU."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.engines.trt import (EngineKey, EngineMismatchError, GpuInfo, TensorRTUnavailable, engines_to_load,
                                     find_engine,
                                     onnx_source, optimization_profile, parse_nvidia_smi)

H200 = GpuInfo("NVIDIA H200", "9.0")
UNET_INPUTS = {"latents": ["batch", 4, 64, 64], "timesteps": ["batch"]}


def test_parse_nvidia_smi():
    text = "NVIDIA H200, 9.0\nNVIDIA A100-SXM4-80GB, 8.0\n"
    assert parse_nvidia_smi(text) == [H200, GpuInfo("NVIDIA A100-SXM4-80GB", "8.0")]
    assert parse_nvidia_smi("") == []
    with pytest.raises(ValueError, match="unexpected"):
        parse_nvidia_smi("NVIDIA H200 9.0")


def test_optimization_profile():
    static = optimization_profile(UNET_INPUTS, (2, 2, 2))
    assert static == {"latents": ((2, 4, 64, 64),) * 3, "timesteps": ((2,),) * 3}
    dyn = optimization_profile(UNET_INPUTS, (1, 4, 16))
    assert dyn["latents"] == ((1, 4, 64, 64), (4, 4, 64, 64), (16, 4, 64, 64))
    assert dyn["timesteps"] == ((1,), (4,), (16,))
    assert optimization_profile({"x": [3, 8]}, (1, 4, 16)) == {"x": ((3, 8),) * 3}  # a graph-fixed batch stays
    with pytest.raises(ValueError, match="min <= opt <= max"):
        optimization_profile(UNET_INPUTS, (4, 2, 8))
    with pytest.raises(ValueError, match="only the batch"):
        optimization_profile({"images": ["batch", 3, "height", 512]}, (1, 1, 1))


def test_parse_batch():
    from export.tensorrt_build import parse_batch

    assert parse_batch("8") == (8, 8, 8) and parse_batch("1:4:16") == (1, 4, 16)
    for bad in ("0", "4:2:8", "1:2", "x"):
        with pytest.raises(ValueError):
            parse_batch(bad)


def _key(**kw) -> EngineKey:
    base = dict(graph="unet", precision="fp16", gpu=H200.name, compute_capability="9.0", trt_version="10.13.0.35",
                profile=tuple((n, *p) for n, p in optimization_profile(UNET_INPUTS, (1, 4, 16)).items()),
                onnx_signature="abc123")
    base.update(kw)
    return EngineKey(**base)


def test_engine_key_slug_roundtrip_and_mismatch():
    k = _key()
    assert k.slug().startswith("unet.fp16.nvidia-h200-sm90.trt10.13.0.35.b1-16.")
    assert _key().slug() == k.slug()  # deterministic
    assert len({k.slug(), _key(precision="fp32").slug(), _key(gpu="NVIDIA A100").slug(),
                _key(trt_version="10.14.1").slug(), _key(onnx_signature="other").slug()}) == 5
    assert EngineKey.from_dict(json.loads(json.dumps(k.to_dict()))) == k
    assert k.max_batch == 16 and not k.static
    assert _key(profile=(("latents", (2, 4, 8, 8), (2, 4, 8, 8), (2, 4, 8, 8)),)).static
    assert k.mismatches(trt_version="10.14.1", gpu=H200.name) == ["trt_version: engine '10.13.0.35' != here '10.14.1'"]
    with pytest.raises(ValueError, match="precision"):
        _key(precision="int4")


def _store(bundle: Bundle, key: EngineKey) -> None:
    edir = bundle.file("engines")
    edir.mkdir(exist_ok=True)
    (edir / f"{key.slug()}.plan").write_bytes(b"plan")
    (edir / f"{key.slug()}.json").write_text(json.dumps({"key": key.to_dict(), "refittable": True}))


def test_find_engine_matches_and_refuses(tmp_path, tiny_bundle):
    b = Bundle(shutil.copytree(tiny_bundle.path, tmp_path / "b"))
    small = _key(profile=tuple((n, *p) for n, p in optimization_profile(UNET_INPUTS, (1, 1, 4)).items()))
    _store(b, small)
    _store(b, _key())
    _store(b, _key(gpu="NVIDIA A100-SXM4-80GB", compute_capability="8.0"))
    path, key = find_engine(b, "unet", "fp16", H200, "10.13.0.35")
    assert key == _key() and path.name == f"{_key().slug()}.plan"  # the largest batch wins
    with pytest.raises(EngineMismatchError, match="trt_version: engine '10.13.0.35' != here '10.14.1'"):
        find_engine(b, "unet", "fp16", H200, "10.14.1")
    with pytest.raises(EngineMismatchError, match="glad build"):
        find_engine(b, "unet", "int8", H200, "10.13.0.35")
    with pytest.raises(EngineMismatchError, match="none built"):
        find_engine(b, "dino", "fp16", H200, "10.13.0.35")


def test_engines_to_load_takes_the_fused_check_when_built(tmp_path, tiny_bundle):
    """The four networks are required; ``ads_check`` is loaded only when an engine of this precision fits."""
    b = Bundle(shutil.copytree(tiny_bundle.path, tmp_path / "b"))
    assert b.config.ads_enabled and b.config.ads_size != b.config.dino_resolution  # dino_ads is required too
    want = ["unet", "vae_encoder", "vae_decoder", "dino", "dino_ads"]
    for g in want:
        _store(b, _key(graph=g))
    assert [g for g, _, _ in engines_to_load(b, "fp16", H200, "10.13.0.35")] == want
    _store(b, _key(graph="ads_check", precision="fp32"))  # another precision: not used at fp16
    assert [g for g, _, _ in engines_to_load(b, "fp16", H200, "10.13.0.35")] == want
    _store(b, _key(graph="ads_check"))
    loaded = engines_to_load(b, "fp16", H200, "10.13.0.35")
    assert [g for g, _, _ in loaded] == want + ["ads_check"] and loaded[-1][2] == _key(graph="ads_check")
    with pytest.raises(EngineMismatchError, match="'unet'"):
        engines_to_load(b, "fp32", H200, "10.13.0.35")  # a required network missing at fp32 still fails


def test_onnx_source_names_the_missing_step(tiny_bundle):
    with pytest.raises(BundleError, match="glad export"):
        onnx_source(tiny_bundle, "unet", "fp16")
    with pytest.raises(BundleError, match="glad calibrate --quantize"):
        onnx_source(tiny_bundle, "unet", "int8")


def _decoder_graph(tmp_path, name: str, seed: int, channels=(16, 32, 64)):
    """A real VAE decoder graph (the tiny preset's architecture) exported with the fast TorchScript exporter."""
    import torch
    from diffusers import AutoencoderKL

    from export.models import TINY_VAE_CONFIG, VaeDecoder
    from export.onnx_export import export_graph

    torch.manual_seed(seed)
    vae = AutoencoderKL(**dict(TINY_VAE_CONFIG, block_out_channels=channels)).eval()
    feeds = {"latents": np.random.default_rng(0).standard_normal((2, 4, 16, 16)).astype(np.float32)}
    path = export_graph(VaeDecoder(vae, 1.0), feeds, ["images"], tmp_path / f"{name}.onnx", exporter="torchscript",
                        opset=17)
    return path, {f"vae.{k}": v for k, v in vae.state_dict().items()}


def test_graph_signature_and_refit_plan(tmp_path):
    """Two categories of one architecture: equal signatures, every weight listed for refit; another architecture
    is refused with a reason."""
    import onnx

    from export.tensorrt_build import RefitError, graph_signature, refit_plan

    (a, sd_a), (b, sd_b) = _decoder_graph(tmp_path, "a", seed=0), _decoder_graph(tmp_path, "b", seed=1)
    assert graph_signature(a) == graph_signature(b)
    changed = set(refit_plan(a, b))
    names = {i.name for i in onnx.load(str(a)).graph.initializer}
    # independent reference: the torch parameters that differ between the two seeds, as named in the graph
    differ = {k for k in sd_a if k in names and not np.array_equal(sd_a[k].numpy(), sd_b[k].numpy())}
    same = {k for k in sd_a if k in names and k not in differ}  # e.g. GroupNorm's ones/zeros initialisation
    assert len(differ) > 10 and differ <= changed and not (same & changed)
    assert refit_plan(a, a) == []
    c, _ = _decoder_graph(tmp_path, "c", seed=0, channels=(16, 32, 32))
    assert graph_signature(c) != graph_signature(a)
    with pytest.raises(RefitError, match="rebuild"):
        refit_plan(a, c)


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="a GPU is present")
def test_build_and_engine_refuse_without_gpu(tiny_bundle):
    from glad_cli.main import cli
    from glad_runtime.engines.trt import TensorRTEngines

    res = CliRunner().invoke(cli, ["build", str(tiny_bundle.path)])
    assert res.exit_code == 1 and "need a CUDA GPU" in res.output and "--engine ort" in res.output
    with pytest.raises(TensorRTUnavailable, match="CUDA GPU"):
        TensorRTEngines(tiny_bundle)
