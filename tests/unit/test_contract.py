"""The production-line contract without a server: input validation, defect regions against a hand-built reference,
explicit ADS / calibration states, no NaN in any served tensor, and the encoded-file payload rule (fast: stubs)."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import StubEngines, stub_config
from glad_runtime.core.calibration import Calibration
from glad_runtime.core.detection import ADS_STATES, Detection, ads_state
from glad_runtime.core.regions import Region, defect_mask, find_regions
from glad_runtime.detector import Detector
from glad_runtime.errors import InvalidInputError
from glad_runtime.pipeline.batch import GladPipeline
from glad_runtime.serving import protocol


def _strict(text: str):
    """json.loads that refuses NaN / Infinity (what JSON.parse and jq accept)."""
    def bad(c):
        raise ValueError(f"non-standard JSON constant {c}")
    return json.loads(text, parse_constant=bad)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("make, match", [
    (lambda r: np.full((1, 3, r, r), 127.0, np.float32), r"\[-1, 1\].*\[127, 127\]"),   # 0..255 floats
    (lambda r: np.full((2, 3, r, r), 5.0, np.float32), r"\[-1, 1\]"),                   # all 5.0
    (lambda r: np.full((1, 3, r, r), np.nan, np.float32), "NaN"),
    (lambda r: np.zeros((1, 3, r, r), np.uint8), "dtype uint8"),
    (lambda r: np.zeros((1, 1, r, r), np.float32), r"\[B, 3,"),
    (lambda r: np.zeros((3, r, r), np.float32), r"\[B, 3,"),
])
def test_out_of_range_input_is_refused(make, match):
    cfg = stub_config()
    pipe = GladPipeline(StubEngines(), cfg)
    with pytest.raises(InvalidInputError, match=match):
        pipe(make(cfg.resolution))
    # in-process, the refusal is the image's error; its batch mates are unaffected
    det = Detector(StubEngines(), cfg)
    ok = np.zeros((1, 3, cfg.resolution, cfg.resolution), np.float32)
    assert det.detect_arrays(ok)[0].ok


def test_range_tolerance_edges():
    cfg = stub_config()
    pipe = GladPipeline(StubEngines(), cfg)
    r = cfg.resolution
    pipe.validate_batch(np.full((1, 3, r, r), 1.0009, np.float32))   # float rounding of another client: accepted
    with pytest.raises(InvalidInputError):
        pipe.validate_batch(np.full((1, 3, r, r), -1.002, np.float32))


# ---------------------------------------------------------------------------------------------- regions
def test_regions_against_a_hand_built_map():
    """Two blobs (one touching only diagonally, so 8-connected), values known: boxes, areas, peaks, means."""
    amap = np.zeros((20, 30), np.float32)
    amap[2:5, 3:7] = 0.6          # blob A: 3 x 4 = 12 px at 0.6 ...
    amap[3, 4] = 0.9              # ... peak 0.9
    amap[5, 7] = 0.7              # diagonal neighbour of (4, 6): joins A under 8-connectivity
    amap[10:18, 20:22] = 0.55     # blob B: 8 x 2 = 16 px
    amap[0, 29] = 0.5             # exactly the threshold: not defective (strictly greater)
    mask, regions = find_regions(amap, 0.5)
    assert mask.dtype == bool and mask.sum() == 12 + 1 + 16
    np.testing.assert_array_equal(mask, amap > 0.5)
    a, b = regions
    assert (a.x, a.y, a.width, a.height, a.area) == (3, 2, 5, 4, 13)
    assert a.peak == pytest.approx(0.9) and a.mean == pytest.approx((11 * 0.6 + 0.9 + 0.7) / 13)
    assert (b.x, b.y, b.width, b.height, b.area) == (20, 10, 2, 8, 16)
    assert b.peak == pytest.approx(0.55) and b.mean == pytest.approx(0.55)
    assert Region.from_dict(_strict(json.dumps(a.to_dict()))) == a
    assert find_regions(amap, 1.0)[1] == []
    assert not find_regions(amap, 1.0)[0].any()
    with pytest.raises(InvalidInputError):
        defect_mask(np.full((2, 2), np.nan), 0.5)


def test_detector_regions_at_original_size(tmp_path):
    """Regions are found on the map at the file's original size, with the calibration's pixel threshold."""
    cfg = stub_config()
    rng = np.random.default_rng(3)
    path = tmp_path / "cell.png"
    Image.fromarray(rng.integers(0, 255, (37, 53), dtype=np.uint8)).save(path)
    plain = Detector(StubEngines(), cfg)
    (d0, _), = plain.detect([path])
    assert d0.regions is None and d0.pixel_threshold is None and d0.original_size == (37, 53)
    big = d0.map_at_original_size()
    t = float(np.quantile(big, 0.9))
    cal = Calibration(rule="normal_quantile", image_threshold=d0.score, image_min=0.0, image_max=1.0, n_images=10,
                      n_normal=10, pixel_threshold=t, pixel_rule="normal_quantile", pixel_min=0.0,
                      pixel_max=float(big.max()) + 1.0)
    (d1, _), = Detector(StubEngines(), cfg, cal).detect([path])
    ref_mask, ref_regions = find_regions(big, t)
    assert d1.pixel_threshold == t and d1.regions == ref_regions and len(ref_regions) >= 1
    np.testing.assert_array_equal(d1.defect_mask(), ref_mask)
    assert sum(r.area for r in d1.regions) == int(ref_mask.sum()) or len(d1.regions) == 100
    assert _strict(json.dumps(d1.to_dict(), allow_nan=False))["regions"][0] == ref_regions[0].to_dict()


# ---------------------------------------------------------------------------------------------- explicit states
def test_ads_states():
    assert ADS_STATES == ("off", "triggered", "forced", "undecided")
    assert ads_state(False, -1, False) == "off"
    assert ads_state(True, 301, True) == "triggered" and ads_state(True, 101, False) == "forced"
    assert ads_state(True, -1, False) == "undecided"


@pytest.mark.parametrize("ads_enabled", [False, True])
@pytest.mark.parametrize("calibrated", [False, True])
def test_served_tensors_have_no_nan_and_parse_as_strict_json(ads_enabled, calibrated):
    cfg = stub_config(ads_enabled=ads_enabled)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (3, 3, cfg.resolution, cfg.resolution)).astype(np.float32)
    cal = None
    if calibrated:
        cal = Calibration(rule="normal_quantile", image_threshold=0.1, image_min=0.0, image_max=1.0, n_images=10,
                          n_normal=10)
    det = Detector(StubEngines(), cfg, cal)
    dets = [det.locate(d) for d in det.detect_arrays(images)]
    arrays = protocol.glad_output_arrays(dets, "original")
    body = {k: (v.tolist() if v.dtype != np.object_ else [x.decode() for x in v]) for k, v in arrays.items()}
    parsed = _strict(json.dumps(body, allow_nan=False))
    assert parsed["calibrated"] == [calibrated] * 3
    if not calibrated:
        assert parsed["labels"] == [-1] * 3 and parsed["normalized_scores"] == [-1.0] * 3
        assert parsed["thresholds"] == [-1.0] * 3
    assert parsed["pixel_thresholds"] == [-1.0] * 3 and parsed["regions"] == ["null"] * 3
    assert np.asarray(parsed["defect_masks"]).sum() == 0
    if not ads_enabled:
        assert parsed["ads_states"] == [0] * 3 and parsed["adaptive_steps"] == [-1] * 3
        assert parsed["ads_scores"] == [-1.0] * 3
    else:
        assert set(parsed["ads_states"]) <= {1, 2} and min(parsed["ads_scores"]) >= 0
    r = cfg.resolution
    assert parsed["image_sizes"] == [[r, r]] * 3 and np.asarray(parsed["anomaly_maps"]).shape == (3, r, r)
    back = protocol.detections_from_arrays({k: protocol.to_wire(v) for k, v in arrays.items()}, ["a", "b", "c"],
                                           cal, map_size="original")
    for a, b in zip(dets, back):
        assert (a.score, a.label, a.ads_state, a.adaptive_step, a.regions) == \
            (pytest.approx(b.score), b.label, b.ads_state, b.adaptive_step, b.regions)
        assert b.ads_score is None if a.ads_score is None else b.ads_score == pytest.approx(a.ads_score)


def test_maps_of_different_sizes_are_padded():
    cfg = stub_config()
    d = [Detection(source=str(k), score=0.1, ads_state="off", adaptive_step=-1, original_size=s,
                   anomaly_map=np.ones((cfg.dino_resolution,) * 2, np.float32)) for k, s in enumerate([(5, 9), (7, 4)])]
    arrays = protocol.glad_output_arrays(d, "original")
    assert arrays["anomaly_maps"].shape == (2, 7, 9) and arrays["image_sizes"].tolist() == [[5, 9], [7, 4]]
    assert arrays["anomaly_maps"][0, 5:].sum() == 0 and arrays["anomaly_maps"][1, :, 4:].sum() == 0
    back = protocol.detections_from_arrays(arrays, ["0", "1"], map_size="original")
    assert back[0].anomaly_map.shape == (5, 9) and back[1].anomaly_map.shape == (7, 4)
    with pytest.raises(ValueError, match="map_size"):
        protocol.glad_output_arrays(d, "huge")


# ---------------------------------------------------------------------------------------------- payloads
def test_file_payload_raw_or_base64():
    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    png = buf.getvalue()
    assert protocol.file_bytes(png) == png
    assert protocol.file_bytes(base64.b64encode(png)) == png
    assert protocol.file_bytes(base64.b64encode(png).decode()) == png
    assert protocol.file_bytes(b"not an image!") == b"not an image!"  # left for the decoder to refuse


def test_contract_table_lists_every_output():
    table = protocol.contract_table()
    for name in protocol.GLAD_OUTPUT_NAMES:
        assert f"| `{name}` |" in table
    assert "| `anomaly_maps` | FP32 | [B, H, W] |" in table and "| `regions` | BYTES | [B, 1] |" in table


def test_readme_documents_the_contract_table_exactly():
    """The README's served-contract table is the one generated from protocol.GLAD_OUTPUTS (one source of truth)."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("<!-- contract-table")
    block = readme[readme.index("\n", start) + 1:readme.index("<!-- /contract-table -->")].strip()
    assert block == protocol.contract_table()
    for name in (protocol.GLAD_FILE_INPUT, protocol.GLAD_INPUT, protocol.MAP_SIZE_PARAMETER):
        assert f"`{name}`" in readme


def test_region_boxes_hold_the_regions_as_numbers():
    """Issue 32: region_counts / region_boxes carry exactly the regions of the JSON output, in its order, as plain
    numbers (FP64: a 1e8-pixel area exact), -1 rows past the count, K >= 1, -1 counts where regions is null."""
    big = Region(x=0, y=0, width=10000, height=10000, area=99_999_999, peak=0.0712, mean=0.0391)
    small = Region(x=412, y=96, width=37, height=22, area=610, peak=0.05, mean=0.04)
    dets = [Detection(source="a", score=0.2, ads_state="off", adaptive_step=-1, original_size=(8, 8),
                      anomaly_map=np.zeros((8, 8), np.float32), pixel_threshold=0.03, regions=[big, small]),
            Detection(source="b", score=0.1, ads_state="off", adaptive_step=-1, original_size=(8, 8),
                      anomaly_map=np.zeros((8, 8), np.float32), pixel_threshold=0.03, regions=[]),
            Detection(source="c", score=0.1, ads_state="off", adaptive_step=-1, original_size=(8, 8),
                      anomaly_map=np.zeros((8, 8), np.float32)),
            Detection(source="d", error=InvalidInputError("images[3]: bad"))]
    arrays = protocol.glad_output_arrays(dets, "working")
    counts, boxes = arrays["region_counts"], arrays["region_boxes"]
    assert counts.dtype == np.int32 and counts.tolist() == [2, 0, -1, -1]
    assert boxes.dtype == np.float64 and boxes.shape == (4, 2, len(protocol.REGION_COLUMNS))
    assert boxes[0].tolist() == [[0, 0, 10000, 10000, 99_999_999, 0.0712, 0.0391], [412, 96, 37, 22, 610, 0.05, 0.04]]
    assert (boxes[1:] == -1).all()
    # what an HTTP JSON client reads: flat data, row-major; the same numbers as the regions JSON
    data = _strict(json.dumps(protocol.to_wire(boxes).ravel().tolist(), allow_nan=False))
    k = boxes.shape[1]
    regions_json = [json.loads(x) for x in arrays["regions"]]
    for b in range(len(dets)):
        rows = [data[(b * k + j) * 7:(b * k + j) * 7 + 7] for j in range(max(0, int(counts[b])))]
        want = [[r[c] for c in protocol.REGION_COLUMNS] for r in regions_json[b] or []]
        assert rows == want
    assert protocol.regions_from_arrays(protocol.to_wire(counts), boxes) == [[big, small], [], None, None]
    # no region anywhere: one row of -1 (never a zero-size tensor)
    none = protocol.region_arrays(dets[1:3])
    assert none["region_boxes"].shape == (2, 1, 7) and (none["region_boxes"] == -1).all()
    # the declared output and the client's reading: a server without the new outputs is still read
    spec = {s.name: s for s in protocol.glad_outputs()}["region_boxes"]
    assert spec.pbtxt(batched=False) == '{ name: "region_boxes" data_type: TYPE_FP64 dims: [-1, -1, 7] }'
    older = {n: v for n, v in arrays.items() if n not in ("region_counts", "region_boxes")}
    back = protocol.detections_from_arrays(older, ["a", "b", "c", "d"])
    assert back[0].regions == [big, small] and back[1].regions == [] and back[2].regions is None
