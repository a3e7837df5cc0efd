"""Issue 27, in process: the pixel limit read from the header, the compact decoded forms (equal to the RGB path),
regions over defect pixels only (equal to the whole-map statistics), capped overlays, the per-image error text of
the served contract. Pure numpy / Pillow / scipy references, no server."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from glad_runtime.core.images import (ImageLoadError, ImageTooLargeError, LoadedImage, load_image, preprocess,
                                      to_rgb_pixels)
from glad_runtime.core.regions import find_regions
from glad_runtime.serving import protocol


def _png_header_only(width: int, height: int, bits: int = 8, idat: bytes = b"\x78\x9c") -> bytes:
    """A PNG declaring ``width x height`` with (by default) a truncated data stream: only the header is real."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, bits, 0, 0, 0, 0))
            + chunk(b"IDAT", idat) + chunk(b"IEND", b""))


def _encode(arr: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_limit_is_checked_from_the_header_before_decoding():
    # 30000 x 30000 declared, no real data: refused as too large (not as truncated), so nothing was decoded
    bomb = _png_header_only(30000, 30000)
    with pytest.raises(ImageTooLargeError) as info:
        load_image(bomb, 100_000_000, label="image_files[3]")
    e = info.value
    assert e.pixels == 900_000_000 and e.limit == 100_000_000 and isinstance(e, ImageLoadError)
    assert str(e).startswith("image_files[3]: 30000x30000 = 900,000,000 pixels exceeds the limit of 100,000,000")
    # at the limit: allowed (width x height <= limit); one pixel over: refused
    img = np.zeros((20, 50), np.uint8)
    assert load_image(_encode(img), 1000).original_size == (20, 50)
    with pytest.raises(ImageTooLargeError):
        load_image(_encode(img), 999)


def test_pillows_own_bomb_check_is_replaced():
    """Pillow raises an untyped DecompressionBombError from 179 MP whatever the bundle allows; the toolkit's limit
    replaces it: with a larger limit (or none) the same header goes on to decoding (here: truncated data)."""
    declared = _png_header_only(15000, 13000)  # 195 MP
    for limit in (None, 400_000_000):
        with pytest.raises(ImageLoadError) as info:
            load_image(declared, limit)
        assert not isinstance(info.value, ImageTooLargeError) and "Decompression" not in str(info.value)


def test_unreadable_bytes_are_one_typed_error_without_addresses():
    for data in (b"", b"garbage", _encode(np.zeros((8, 8), np.uint8))[:40]):
        with pytest.raises(ImageLoadError) as info:
            load_image(data, 10**8, label="image_files[0]")
        assert str(info.value).startswith("image_files[0]: not a readable image")
        assert "0x" not in str(info.value)


@pytest.mark.parametrize("kind", ["L", "I;16", "RGB"])
def test_compact_pixels_preprocess_exactly_as_the_rgb_form(kind):
    rng = np.random.default_rng(1)
    if kind == "L":
        arr = rng.integers(0, 256, (211, 173), dtype=np.uint8)
    elif kind == "I;16":
        arr = rng.integers(0, 65536, (97, 143), dtype=np.uint16)
    else:
        arr = rng.integers(0, 256, (64, 80, 3), dtype=np.uint8)
    data = _encode(arr)
    img = load_image(data)
    with Image.open(io.BytesIO(data)) as p:
        p.load()
        full = to_rgb_pixels(p)  # the 3-channel form
    assert img.pixels.ndim == (3 if kind == "RGB" else 2)  # grey kept as one channel
    assert img.pixels.dtype == (np.float32 if kind == "I;16" else np.uint8)
    for res, load in ((128, None), (512, 256), (48, None)):
        np.testing.assert_array_equal(preprocess(img.pixels, res, load), preprocess(full, res, load))
    ref = full.astype(np.float32) / np.float32(255) if full.dtype == np.uint8 else full
    np.testing.assert_array_equal(img.rgb, ref)
    released = img.released()
    assert released.pixels is None and released.original_size == img.original_size and released.mode == img.mode


def _regions_whole_map(amap, t):
    """The former implementation: statistics over the whole map (labels 0 outside the mask)."""
    from scipy import ndimage

    mask = amap > t
    a = amap.astype(np.float64)
    labels, n = ndimage.label(mask, structure=np.ones((3, 3), bool))
    index = np.arange(1, n + 1)
    return (ndimage.sum_labels(np.ones_like(a), labels, index), ndimage.maximum(a, labels, index),
            ndimage.mean(a, labels, index), ndimage.find_objects(labels))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regions_over_defect_pixels_equal_whole_map_statistics(seed):
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    amap = ndimage.gaussian_filter(rng.random((180, 230)), 3).astype(np.float32)
    t = float(np.quantile(amap, 0.9))
    _, regions = find_regions(amap, t, max_regions=10**6)
    areas, peaks, means, slices = _regions_whole_map(amap, t)
    assert len(regions) == len(areas) > 1
    want = sorted(((float(p), int(a), sl[0].start, sl[1].start, float(m)) for a, p, m, sl in
                   zip(areas, peaks, means, slices)), key=lambda r: (-r[0], -r[1], r[2], r[3]))
    got = [(r.peak, r.area, r.y, r.x, r.mean) for r in regions]
    for g, w in zip(got, want):
        assert g[:4] == w[:4] and g[4] == pytest.approx(w[4], rel=1e-12)


def test_overlay_of_a_large_image_is_capped_and_maps_stay_full_size(tmp_path):
    from glad_runtime.core.calibration import Calibration
    from glad_runtime.core.detection import Detection
    from glad_runtime.output import OVERLAY_MAX_SIDE, write_outputs
    from glad_runtime.render import MapScale

    h, w = 3000, 2400
    rng = np.random.default_rng(0)
    img = LoadedImage(rng.integers(0, 256, (h, w), dtype=np.uint8), (h, w), "L", "big")
    amap = np.zeros((h, w), np.float32)
    amap[1000:1300, 600:900] = 1.0
    cal = Calibration.from_normals(rng.gamma(4, 0.004, 20), pixel_maps=[rng.gamma(4, 0.004, (16, 16))] * 20,
                                   target_fpr=0.05, pixel_target_fpr=0.01)
    t = cal.pixel_threshold
    _, regions = find_regions(amap, t)
    d = Detection(source="big", score=1.0, label="anomalous", threshold=cal.image_threshold,
                  threshold_source="calibration", ads_state="off", adaptive_step=-1, original_size=(h, w),
                  pixel_threshold=t, regions=regions)
    write_outputs(d, amap, img, tmp_path, "big", "png16", MapScale.for_bundle(cal))
    assert Image.open(tmp_path / d.map_file).size == (w, h) and Image.open(tmp_path / d.mask_file).size == (w, h)
    ov = Image.open(tmp_path / d.overlay_file)
    assert max(ov.size) < OVERLAY_MAX_SIDE * 1.5  # the picture at 2048 px plus its caption and colour bar
    assert d.regions[0].x == 600 and d.regions[0].width == 300  # the record keeps original-image pixels


def test_image_error_text_round_trip_and_failed_outputs():
    from glad_runtime.core.detection import Detection
    from glad_runtime.errors import EngineError, InvalidInputError

    e = ImageTooLargeError("image_files[1]: 30000x30000 = 900,000,000 pixels exceeds the limit", 9e8, 1e8)
    text = protocol.image_error_text(e)
    assert text.startswith("[INVALID_ARGUMENT] ImageTooLargeError: image_files[1]: 30000x30000")
    assert protocol.parse_image_error(text.encode()) == ("INVALID_ARGUMENT", "ImageTooLargeError", str(e))
    assert protocol.parse_image_error(b"") is None
    assert protocol.error_status(EngineError("x")) == "INTERNAL"
    assert protocol.error_status(InvalidInputError("x")) == "INVALID_ARGUMENT"
    ok = Detection(source="a", score=0.5, ads_state="off", adaptive_step=-1, anomaly_map=np.ones((4, 4), np.float32),
                   original_size=(8, 8))
    bad = Detection(source="b", error=e)
    arrays = protocol.glad_output_arrays([ok, bad], "working")
    assert list(arrays["scores"]) == [0.5, -1.0] and arrays["image_sizes"].tolist() == [[8, 8], [0, 0]]
    assert arrays["errors"][0] == b"" and arrays["errors"][1].startswith(b"[INVALID_ARGUMENT] ImageTooLargeError")
    assert arrays["regions"][1] == b"null" and not arrays["anomaly_maps"][1].any()
    assert all(np.isfinite(v).all() for v in arrays.values() if v.dtype != np.object_)
