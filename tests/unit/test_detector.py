"""The facade, the one labelling rule, the one result type and the served contract (fast: stub networks)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from conftest import StubEngines, stub_config
from glad_runtime.core.calibration import Calibration, label
from glad_runtime.core.detection import Detection
from glad_runtime.detector import Detector
from glad_runtime.errors import CalibrationError, EngineError, GladError
from glad_runtime.serving import protocol


def _cal(threshold=0.5, lo=0.0, hi=2.0):
    return Calibration(rule="normal_quantile", image_threshold=threshold, image_min=lo, image_max=hi, n_images=10,
                       n_normal=10)


# ---------------------------------------------------------------------------------------------- labelling
@pytest.mark.parametrize("score", [0.0, 0.49, 0.5, 0.51, 1.7, 3.0])
@pytest.mark.parametrize("override", [None, 0.2, 1.0])
def test_label_closed_form(score, override):
    cal = _cal()
    v = label(score, cal, override)
    t = 0.5 if override is None else override
    assert v.threshold == t and v.threshold_source == ("calibration" if override is None else "override")
    assert v.label == ("anomalous" if score > t else "normal")  # strictly greater
    assert v.normalized_score == pytest.approx(min(1.0, max(0.0, (score - t) / 2.0 + 0.5)))
    assert (v.normalized_score > 0.5) == (v.label == "anomalous") or v.normalized_score == 0.5


def test_label_without_calibration():
    assert label(0.3) == label(0.3, None, None)
    assert label(0.3).label is None and label(0.3).normalized_score is None
    v = label(0.3, None, 0.1)
    assert v.label == "anomalous" and v.normalized_score is None and v.threshold_source == "override"
    with pytest.raises(CalibrationError, match="finite"):
        label(0.3, _cal(), float("nan"))
    with pytest.raises(CalibrationError, match="non-finite score"):
        label(float("inf"), _cal())


def test_override_behaves_the_same_in_process_and_on_the_client():
    """The client relabels from the served raw score with the served calibration: the same label and
    normalised score as ``Detector`` (glad detect) for the same override."""
    cfg = stub_config()
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    base = Detector(StubEngines(), cfg).detect_arrays(images)
    scores = [d.score for d in base]
    cal = _cal(threshold=float(np.median(scores)), lo=min(scores), hi=max(scores) + 1e-3)
    override = float(np.mean(scores))
    local = Detector(StubEngines(), cfg, cal, threshold=override).detect_arrays(images)
    server = Detector(StubEngines(), cfg, cal)  # what the BLS model runs: the served calibration, no override
    served = [server.locate(d) for d in server.detect_arrays(images)]
    wire = {k: protocol.to_wire(v) for k, v in protocol.glad_output_arrays(served, "working").items()}
    served_cal = protocol.calibration_from_parameter(protocol.calibration_parameter(cal))
    remote = protocol.detections_from_arrays(wire, [f"#{i}" for i in range(4)], served_cal, override)
    for a, b in zip(local, remote):
        assert (a.label, a.threshold, a.threshold_source) == (b.label, b.threshold, b.threshold_source)
        assert a.normalized_score == pytest.approx(b.normalized_score, abs=1e-6)
        assert a.score == pytest.approx(b.score, rel=1e-6)
    assert {d.label for d in local} == {"normal", "anomalous"}


# ---------------------------------------------------------------------------------------------- Detection
def test_detection_to_dict_is_json_without_nan():
    d = Detection(source="a.png", score=0.1, ads_score=float("nan"), anomaly_map=np.zeros((2, 2)),
                  original_size=(3, 4))
    out = d.to_dict()
    assert out["ads_score"] is None and "anomaly_map" not in out and out["original_size"] == [3, 4]
    json.loads(json.dumps(out, allow_nan=False))
    e = Detection(source="b.png", error=EngineError("unet: 3 non-finite values"))
    assert not e.ok and e.to_dict()["error"] == "unet: 3 non-finite values" and e.error_type == "EngineError"


# ---------------------------------------------------------------------------------------------- per-image isolation
def test_torch_engine_failure_costs_only_its_image():
    """A failure inside a torch module (the default engine) becomes an EngineError on that image alone; the
    others are scored exactly as the numpy reference engine scores them."""
    torch = pytest.importorskip("torch")
    from glad_runtime.engines.pytorch import TorchEngines

    ref = StubEngines()

    class Wrap(torch.nn.Module):
        def __init__(self, fn, fail=False):
            super().__init__()
            self.fn, self.fail = fn, fail

        def forward(self, *args):
            if self.fail and float(args[0].mean()) > 0.5:  # the bright image breaks the network
                raise RuntimeError("simulated kernel failure")
            out = self.fn(*[a.numpy() for a in args])
            return tuple(torch.from_numpy(o) for o in out) if isinstance(out, list) else torch.from_numpy(out)

    class Modules:
        unet, encoder, decoder, features = Wrap(ref.unet, fail=True), Wrap(ref.encode), Wrap(ref.decode), \
            Wrap(ref.features)

        def to(self, *a, **k):
            return self

    cfg = stub_config()
    images = np.stack([np.full((3, 8, 8), v, np.float32) for v in (-0.6, 0.9, 0.1)])
    images += np.random.default_rng(1).normal(0, 0.05, images.shape).astype(np.float32)
    images = images.clip(-1, 1)  # inputs must lie in [-1, 1]
    engines = TorchEngines(Modules(), max_batch=1)
    engines.ads_distance = None  # the fused check needs real export.models modules: check on the host
    dets = Detector(engines, cfg).detect_arrays(images, ["dark", "bright", "mid"])
    assert [d.error_type for d in dets] == [None, "EngineError", None]
    assert isinstance(dets[1].error, GladError) and "simulated kernel failure" in str(dets[1].error)
    expect = Detector(StubEngines(), cfg).detect_arrays(images[[0, 2]])
    assert [dets[0].score, dets[2].score] == pytest.approx([expect[0].score, expect[1].score], rel=1e-6)


# ---------------------------------------------------------------------------------------------- served contract
def test_protocol_specs_and_wire_shapes():
    outs = {s.name: s for s in protocol.glad_outputs()}
    assert tuple(outs) == protocol.GLAD_OUTPUT_NAMES
    assert outs["anomaly_maps"].dims == (-1, -1) and not outs["anomaly_maps"].reshape
    assert outs["regions"].dtype == np.object_ and outs["image_sizes"].dims == (2,)
    ins = {s.name: s for s in protocol.glad_inputs(64)}
    assert ins["image_files"].pbtxt() == ('{ name: "image_files" data_type: TYPE_STRING dims: [1] '
                                          'reshape: { shape: [ ] } optional: true }')
    assert outs["scores"].pbtxt() == '{ name: "scores" data_type: TYPE_FP32 dims: [1] reshape: { shape: [ ] } }'
    assert outs["labels"].dtype == np.int8 and outs["saff_triggered"].dtype == np.bool_
    a = np.arange(3, dtype=np.float32)
    assert protocol.to_wire(a).shape == (3, 1)
    assert protocol.from_wire(protocol.to_wire(a), 3, outs["scores"]).shape == (3,)
    assert protocol.to_wire(np.zeros((3, 4))).shape == (3, 4)
    with pytest.raises(ValueError):
        protocol.from_wire(np.zeros((2, 1)), 3, outs["scores"])
    assert protocol.calibration_from_parameter("") is None
    assert protocol.calibration_from_parameter(protocol.calibration_parameter(_cal())) == _cal()
    assert protocol.model_name("elpv") == "elpv_glad" and math.isfinite(_cal().image_threshold)


def test_detect_arrays_runs_one_pipeline_call_per_batch():
    """A batch of B images is one pipeline call: B encodes-worth of work, not B x B (a regression: each image of a
    batch once re-ran the whole batch). Counted on the stub engines: one encode call and ``num_inference_steps``
    UNet calls for the batch, and the same scores as the images alone (project decision 2)."""
    cfg = stub_config()
    rng = np.random.default_rng(1)
    images = rng.uniform(-1, 1, (4, 3, 8, 8)).astype(np.float32)
    eng = StubEngines()
    dets = Detector(eng, cfg).detect_arrays(images)
    assert eng.calls["encode"] == 1
    assert eng.calls["unet"] == cfg.num_inference_steps
    alone = [Detector(StubEngines(), cfg).detect_arrays(images[k:k + 1])[0].score for k in range(4)]
    np.testing.assert_allclose([d.score for d in dets], alone, rtol=1e-6)


def test_detect_files_refuses_an_oversized_image_alone():
    """Issue 27: an image over the pixel limit (read from its header) gets ImageTooLargeError on its own record; its
    batch mates are scored as they are alone (a Pillow DecompressionBombError once aborted the whole batch)."""
    import io
    import struct
    import zlib

    from PIL import Image

    from glad_runtime.errors import ImageTooLargeError

    def png(arr):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format="PNG")
        return buf.getvalue()

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", b"\x78\x9c") + chunk(b"IEND", b""))
    rng = np.random.default_rng(0)
    good = [png(rng.integers(0, 256, (12, 12), dtype=np.uint8)) for _ in range(2)]
    cfg = stub_config(max_image_pixels=10_000)
    out = [d for d, _ in Detector(StubEngines(), cfg).detect([good[0], bomb, good[1]], batch_size=3)]
    assert isinstance(out[1].error, ImageTooLargeError) and "30000x30000" in str(out[1].error)
    alone = [next(Detector(StubEngines(), cfg).detect([g]))[0].score for g in good]
    assert [out[0].score, out[2].score] == pytest.approx(alone, rel=1e-6)
