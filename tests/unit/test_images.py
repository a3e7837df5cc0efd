"""Images as production lines send them (issue: 8/16-bit gray, RGB, RGBA, palette, EXIF, any size, corrupt)."""

import io

import numpy as np
import pytest
from PIL import Image

from glad_runtime.core.images import ImageLoadError, Preprocessor, UnsupportedImageError, load_image, preprocess


def _gradient(h=30, w=50):
    yy, xx = np.mgrid[0:h, 0:w]
    return (xx * 5 + yy * 2).astype(np.uint8)


def _save(img, path, **kw):
    img.save(path, **kw)
    return path


def test_gray8(tmp_path):
    g = _gradient()
    im = load_image(_save(Image.fromarray(g, "L"), tmp_path / "g.png"))
    assert im.rgb.shape == (30, 50, 3) and im.original_size == (30, 50) and im.mode == "L"
    np.testing.assert_allclose(im.rgb[..., 1], g / 255.0, atol=1e-7)
    np.testing.assert_array_equal(im.rgb[..., 0], im.rgb[..., 2])


def test_gray16_keeps_precision(tmp_path):
    g16 = (np.arange(40 * 60).reshape(40, 60) * 27).astype(np.uint16)
    p = _save(Image.fromarray(g16), tmp_path / "g16.png")
    im = load_image(p)
    assert im.mode.startswith("I")
    np.testing.assert_allclose(im.rgb[..., 0], g16 / 65535.0, atol=1e-6)
    # more distinct levels survive than an 8-bit round trip would keep
    assert len(np.unique(im.rgb[..., 0])) > 256


def test_rgb_rgba_palette(tmp_path):
    rgb = np.stack([_gradient(), _gradient()[::-1], np.full((30, 50), 200, np.uint8)], axis=2)
    im = load_image(_save(Image.fromarray(rgb), tmp_path / "c.png"))
    np.testing.assert_allclose(im.rgb, rgb / 255.0, atol=1e-7)
    alpha = np.zeros((30, 50), np.uint8)
    alpha[:, 25:] = 255
    rgba = np.dstack([rgb, alpha])
    im = load_image(_save(Image.fromarray(rgba, "RGBA"), tmp_path / "a.png"))
    assert np.all(im.rgb[:, :25] == 0)  # transparent -> composited onto black
    np.testing.assert_allclose(im.rgb[:, 25:], rgb[:, 25:] / 255.0, atol=1e-6)
    pal = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=16)
    im = load_image(_save(pal, tmp_path / "p.png"))
    np.testing.assert_allclose(im.rgb, np.asarray(pal.convert("RGB")) / 255.0, atol=1e-7)


def test_exif_rotation(tmp_path):
    g = _gradient(20, 40)
    img = Image.fromarray(g, "L")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    p = tmp_path / "r.jpg"
    img.save(p, exif=exif.tobytes(), quality=100)
    im = load_image(p)
    assert im.original_size == (40, 20)  # upright size
    upright = np.rot90(g, k=-1) / 255.0
    assert np.abs(im.rgb[..., 0] - upright).mean() < 0.02


def test_corrupt_and_unsupported(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(ImageLoadError, match="bad.png"):
        load_image(bad)
    buf = io.BytesIO()
    Image.fromarray(_gradient()).save(buf, format="PNG")
    truncated = tmp_path / "trunc.png"
    truncated.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError):
        load_image(truncated)
    with pytest.raises(ImageLoadError):
        load_image(tmp_path / "missing.png")
    f = tmp_path / "f.tif"
    Image.fromarray(np.ones((4, 4), np.float32)).save(f)
    with pytest.raises(UnsupportedImageError):
        load_image(f)


def test_preprocess_and_map_back():
    rgb = np.random.default_rng(0).random((37, 91, 3)).astype(np.float32)
    x = preprocess(rgb, 64)
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
    flat = preprocess(np.full((37, 91, 3), 0.25, np.float32), 64)
    np.testing.assert_allclose(flat, -0.5, atol=1e-6)
    m = Preprocessor.map_to_original(np.ones((64, 64), np.float32), (37, 91))
    assert m.shape == (37, 91)
    np.testing.assert_allclose(m, 1.0, atol=1e-6)


def test_preprocessor_is_the_config_rule_and_training_sees_the_same_tensors():
    from glad_runtime.core.config import get_preset

    multi = get_preset("multi-visa-candle")
    pre = Preprocessor.from_config(multi)
    assert (pre.resolution, pre.load_size, pre.resample) == (512, 256, "bilinear")
    rng = np.random.default_rng(4)
    for px in (rng.integers(0, 256, (90, 70, 3), dtype=np.uint8), rng.integers(0, 256, (90, 70), dtype=np.uint8)):
        x = pre(px)
        assert x.shape == (3, 512, 512) and x.dtype == np.float32
        np.testing.assert_array_equal(x, preprocess(px, 512, 256))
        # training: the 8-bit load-size image it synthesises on, then the same tensor
        rgb8 = pre.resize_rgb8(px)
        assert rgb8.shape == (256, 256, 3) and rgb8.dtype == np.uint8
        np.testing.assert_array_equal(pre.to_tensor(rgb8), x)
        # the inverse: the load-size image back from the upsampled one
        np.testing.assert_allclose(pre.scoring_images(x[None])[0], pre.with_resolution(256)(px), atol=2e-7)
    with pytest.raises(ValueError, match="resample"):
        Preprocessor(64, resample="sinc")
    with pytest.raises(ValueError, match="load_resolution"):
        Preprocessor(64, 128)
