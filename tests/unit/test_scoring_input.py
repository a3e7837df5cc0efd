"""Issue 30: multi-class presets score the load-size image, as the official ``main_multi.test`` does.

The official behaviour as a plain Pillow / numpy / scipy / skimage closed form: the dataset tensor at the load size
(Pillow bilinear resize of the 8-bit image, ``/ 255 * 2 - 1``) goes to DINO and to the pixel term, and the
foreground mask is built on it at the load size (Otsu, Gaussian sigma 6, ``> 0``, Gaussian sigma 6); only the
diffusion part sees the upsampled image. Compared with what both pipelines (per batch and the step-level
scheduler) feed their scoring stage, on a multi-visa and a multi-mvtec preset with a foreground mode.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from conftest import StubEngines, stub_config
from glad_runtime.core.config import get_preset
from glad_runtime.core.images import Preprocessor, preprocess
from glad_runtime.core.scoring import invert_upsample, resize_bilinear

R, LOAD = 32, 16  # the stub sizes standing in for 512 / 256


def _config(preset: str):
    p = get_preset(preset)
    assert p.load_resolution == 256 and p.dino_resolution == 256 and p.resolution == 512
    return stub_config(resolution=R, load_resolution=LOAD, dino_resolution=LOAD, ads_resolution=LOAD,
                       foreground_mode=p.foreground_mode, pixel_weight=p.pixel_weight, bidirectional=p.bidirectional,
                       blur_sigma=1.0, ads_enabled=True)


def _grey_object(seed: int) -> np.ndarray:
    """uint8 [40, 36]: a darker blob on a textured bright background (Otsu separates them)."""
    rng = np.random.default_rng(seed)
    img = 170 + 40 * ndimage.gaussian_filter(rng.random((40, 36)), 2)
    img[10:28, 8:24] -= 110
    return img.clip(0, 255).astype(np.uint8)


def _official(gray8: np.ndarray, mode: int) -> tuple[np.ndarray, np.ndarray]:
    """(load-size tensor [3, L, L], foreground mask [L, L]) as the official code builds them."""
    from skimage.filters import threshold_otsu

    small = np.asarray(Image.fromarray(gray8).convert("RGB").resize((LOAD, LOAD), Image.BILINEAR), np.float32)
    x = (small / 255.0 * 2.0 - 1.0).transpose(2, 0, 1).astype(np.float32)
    g = small[..., 0].astype(np.uint8)  # grey source: R = G = B, so any luma formula gives this
    if mode == 3:
        return x, np.ones((LOAD, LOAD), np.float32)
    t = threshold_otsu(g)
    fg = (g <= t) if mode == 1 else (g > t)
    m = ndimage.gaussian_filter(fg.astype(np.float32), sigma=6)
    m = ndimage.gaussian_filter((m > 0).astype(np.float32), sigma=6)
    return x, m


def _captured(config, batch, monkeypatch, module):
    """Run a pipeline on ``batch``; return (first features input, foreground mask) the scoring stage got."""
    import glad_runtime.pipeline.batch as batch_mod
    import glad_runtime.pipeline.stream as stream_mod

    got = {}
    mod = {"batch": batch_mod, "stream": stream_mod}[module]
    real_fg = mod.foreground_mask

    def fg(images, mode, size):
        out = real_fg(images, mode, size)
        got.setdefault("fg", out)
        return out

    monkeypatch.setattr(mod, "foreground_mask", fg)
    eng = StubEngines()
    real_features = eng.features

    def features(images):
        got.setdefault("features_in", images.copy())
        return real_features(images)

    eng.features = features
    if module == "batch":
        from glad_runtime.pipeline.batch import GladPipeline

        GladPipeline(eng, config)(batch)
    else:
        from glad_runtime.pipeline.stream import StepScheduler

        sched = StepScheduler(eng, config, max_active=4)
        for k, image in enumerate(batch):
            sched.submit(image, key=k)
        assert len(list(sched.drain())) == len(batch)
    return got


@pytest.mark.parametrize("module", ["batch", "stream"])
@pytest.mark.parametrize("preset", ["multi-visa-pcb1", "multi-mvtec-bottle"])
def test_scoring_stage_gets_the_load_size_image_and_mask(preset, module, monkeypatch):
    config = _config(preset)
    gray = _grey_object(0)
    x_official, fg_official = _official(gray, config.foreground_mode)
    upsampled = preprocess(np.repeat(gray[..., None], 3, axis=2), R, LOAD)[None]  # what every client sends
    got = _captured(config, upsampled, monkeypatch, module)
    np.testing.assert_allclose(got["features_in"][0], x_official, atol=1e-6)
    if config.foreground_mode != 3:
        np.testing.assert_allclose(got["fg"][0], fg_official, atol=1e-6)
    else:
        assert "fg" not in got
    # the former scoring input (the upsampled image resized back) is measurably different: the test can tell
    assert np.abs(resize_bilinear(upsampled, (LOAD, LOAD))[0] - x_official).max() > 1e-2


def test_invert_upsample_is_exact_and_single_class_unchanged():
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 256, (2, 3, 48, 48)) / 255.0 * 2 - 1).astype(np.float32)
    np.testing.assert_allclose(invert_upsample(resize_bilinear(x, (128, 128)), 48), x, atol=2e-7)
    single = get_preset("tiny")
    assert single.load_resolution is None
    imgs = rng.uniform(-1, 1, (1, 3, 8, 8)).astype(np.float32)
    assert Preprocessor.from_config(single).scoring_images(imgs) is imgs
    multi = dataclasses.replace(single, resolution=16, load_resolution=8)
    assert Preprocessor.from_config(multi).scoring_images(resize_bilinear(imgs, (16, 16))).shape == (1, 3, 8, 8)
