"""End-to-end pipeline on the tiny torch reference engine, bundles, the `glad detect` CLI, the torch-free import."""

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.core.config import GladConfig, get_preset, preset_names
from glad_runtime.core.images import preprocess
from glad_runtime.pipeline.batch import GladPipeline, InvalidInputError


def test_import_runtime_without_torch():
    code = ("import sys, glad_runtime, glad_runtime.pipeline.batch, glad_runtime.detector, glad_runtime.core.images; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_presets_appendix_a():
    assert len(preset_names()) == 2 + 15 + 6 + 12 + 7 + 4 + (15 + 6 + 12 + 7)  # multi-class: dataset + per class
    c = get_preset("mvtec-capsule")
    assert (c.t_max, c.tau, c.min_step, c.num_inference_steps, c.foreground_mode) == (600, 0.40, 350, 25, 1)
    c = get_preset("visa-pcb4")
    assert (c.t_max, c.tau, c.pixel_weight, c.min_step, c.bidirectional, c.dino_resolution, c.noise_offset) == \
        (450, 0.30, 2.0, 200, "sum", 256, -1)
    assert get_preset("mpdd-bracket_white").min_step == 200
    assert GladConfig.from_dict(json.loads(c.to_json())) == c
    with pytest.raises(KeyError, match="visa-pcb1"):
        get_preset("visa-pcb")
    with pytest.raises(ValueError):
        get_preset("tiny", bidirectional="both")


def _real_batch(elpv_images, res):
    good, bad = elpv_images
    rgb = [np.repeat((g / 255.0)[..., None], 3, 2).astype(np.float32) for g in (good[0], bad[0], bad[1], bad[2])]
    return np.stack([preprocess(x, res) for x in rgb])


def test_same_image_alone_and_in_batch(tiny_modules, elpv_images):
    from glad_runtime.engines.pytorch import TorchEngines

    cfg = get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150)
    pipe = GladPipeline(TorchEngines(tiny_modules), cfg)
    batch = _real_batch(elpv_images, cfg.resolution)
    together = pipe(batch)
    alone = pipe(batch[:1])
    assert alone.adaptive_steps[0] == together.adaptive_steps[0]
    np.testing.assert_allclose(alone.scores[0], together.scores[0], atol=1e-5)
    np.testing.assert_allclose(alone.anomaly_maps[0], together.anomaly_maps[0], atol=1e-5)
    assert np.isfinite(together.scores).all() and together.anomaly_maps.shape == (4, 224, 224)
    # seeded: the same call twice gives the same result
    np.testing.assert_array_equal(pipe(batch[:1]).scores, alone.scores)


@pytest.mark.parametrize("ads_resolution", [56, 112])
def test_fused_ads_check_equals_host_composite(tiny_modules, elpv_images, ads_resolution):
    """TorchEngines.ads_distance (decode, resize, raw mapping, ADS tokens, distance on the device) against the
    pipeline's host path on real cells, with tau splitting the decisions: same steps, same scores."""
    from conftest import HostComposite

    from glad_runtime.engines.pytorch import TorchEngines

    eng = TorchEngines(tiny_modules)
    cfg = get_preset("tiny", ads_enabled=True, min_step=0, ads_resolution=ads_resolution)
    batch = _real_batch(elpv_images, cfg.resolution)
    host = GladPipeline(HostComposite(eng), cfg)
    probe = host.__class__(HostComposite(eng), cfg.replace(min_step=1000, tau=1e9))(batch).ads_scores
    cfg = cfg.replace(tau=float(np.median(probe)))
    ref, got = GladPipeline(HostComposite(eng), cfg)(batch), GladPipeline(eng, cfg)(batch)
    assert len(set(ref.adaptive_steps.tolist())) > 1
    np.testing.assert_array_equal(got.adaptive_steps, ref.adaptive_steps)
    np.testing.assert_allclose(got.ads_scores, ref.ads_scores, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-4, atol=1e-6)
    assert "ads_fused" in got.timings and "ads_decode" not in got.timings


def test_pipeline_rejects_bad_batches(tiny_modules):
    from glad_runtime.engines.pytorch import TorchEngines

    pipe = GladPipeline(TorchEngines(tiny_modules), get_preset("tiny"))
    with pytest.raises(InvalidInputError):
        pipe(np.zeros((1, 3, 64, 64), np.float32))
    x = np.zeros((1, 3, 128, 128), np.float32)
    x[0, 0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        pipe(x)


def test_bundle_roundtrip_and_tamper(tiny_bundle, tiny_modules, tmp_path):
    import shutil

    from export.models import load_bundle_modules
    from glad_runtime.engines.pytorch import TorchEngines

    m = load_bundle_modules(tiny_bundle)
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)
    np.testing.assert_array_equal(TorchEngines(m).encode(x), TorchEngines(tiny_modules).encode(x))
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle.path, copy)
    with open(copy / "weights" / "vae.safetensors", "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(BundleError, match="vae.safetensors"):
        load_bundle_modules(Bundle(copy))
    with pytest.raises(BundleError, match="no config.json"):
        Bundle(tmp_path)


def test_cli_detect_real_images(tiny_bundle, elpv_images, tmp_path):
    from glad_cli.main import cli

    good, bad = elpv_images
    inp = tmp_path / "in"
    inp.mkdir()
    Image.fromarray(good[0]).save(inp / "a_good.png")
    Image.fromarray(bad[0]).resize((210, 150)).save(inp / "b_bad_nonsquare.png")
    rot = Image.fromarray(bad[1]).resize((120, 80))
    exif = Image.Exif()
    exif[0x0112] = 8
    rot.save(inp / "c_rotated.jpg", exif=exif.tobytes())
    (inp / "d_corrupt.png").write_bytes(b"not an image at all")
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["detect", str(tiny_bundle.path), str(inp), "--out", str(out), "--batch-size", "3",
                                   "--quiet"])
    assert res.exit_code == 1, res.output  # one file failed, the rest completed
    recs = {json.loads(line)["source"].split("/")[-1]: json.loads(line) for line in open(out / "results.jsonl")}
    assert recs["d_corrupt.png"]["error_type"] == "ImageLoadError" and recs["d_corrupt.png"]["score"] is None
    sizes = {"a_good.png": (300, 300), "b_bad_nonsquare.png": (150, 210), "c_rotated.jpg": (120, 80)}
    for name, (h, w) in sizes.items():
        r = recs[name]
        assert r["error"] is None and np.isfinite(r["score"]) and r["adaptive_step"] > 0
        amap = np.asarray(Image.open(out / r["map_file"]))
        assert amap.shape == (h, w) and amap.dtype == np.uint16  # original (upright) size
        ow, oh = Image.open(out / r["overlay_file"]).size  # the image (enlarged when small), caption band, colour bar
        assert ow > w and oh > h
        # 16-bit PNG (uncalibrated bundle: the per-image fallback scale): value = png / scale; the peak is stored as 65535 and bounds the top-K mean score
        assert amap.max() == 65535 and r["score"] <= 65535 / r["map_png_scale"] * (1 + 1e-4)


def test_detect_isolates_an_image_that_breaks_the_engine(tmp_path):
    """An engine failure on one image (non-finite output) costs only that image; the rest of the batch completes."""
    from conftest import StubEngines, stub_config
    from glad_runtime.output import detect_files

    class Flaky(StubEngines):
        def unet(self, latents, timesteps):
            out = super().unet(latents, timesteps)
            out[latents.reshape(len(latents), -1).mean(1) > 0.5] = np.nan  # the bright image breaks the network
            return out

    paths = []
    for name, value in (("dark", 40), ("bright", 250), ("mid", 120)):
        p = tmp_path / f"{name}.png"
        Image.fromarray(np.full((10, 12), value, np.uint8)).save(p)
        paths.append(p)
    from glad_runtime.detector import Detector

    recs = detect_files(Detector(Flaky(), stub_config()), paths, tmp_path / "out", batch_size=3, progress=False)
    assert [r.error_type for r in recs] == [None, "EngineError", None]
    assert recs[0].score is not None and recs[2].score is not None and recs[1].score is None
