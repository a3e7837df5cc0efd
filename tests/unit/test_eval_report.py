"""``glad eval`` on a calibrated bundle (issue 32): the bundle's calibration labels the test images by default,
``--threshold`` overrides it, and the report opens with the operating point (threshold and source, misses and false
rejects with counts and rates, the pixel operating point with masks); overlays on the bundle's one scale. Stub
engines behind every backend (``stub_backends``: fast, no networks)."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import html_image_sources, stub_config
from glad_runtime.core.bundle import Bundle
from glad_runtime.core.calibration import Calibration

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")


@pytest.fixture
def stub_eval(tmp_path, stub_backends):
    """A stub bundle, an MVTec-format category (3 train, 3 good and 3 defective test images with masks) and every
    backend opening stub engines."""
    b = Bundle.create(tmp_path / "b", stub_config())
    (b.file("weights") / "w.bin").write_bytes(b"weights")
    b.write_manifest()
    rng = np.random.default_rng(0)
    data = tmp_path / "cat"
    for sub in ("train/good", "test/good", "test/crack", "ground_truth/crack"):
        (data / sub).mkdir(parents=True)
    for k in range(3):
        for sub in ("train/good", "test/good"):
            Image.fromarray(rng.integers(90, 110, (12, 12), dtype=np.uint8)).save(data / sub / f"{k}.png")
        img = rng.integers(90, 110, (12, 12), dtype=np.uint8)
        img[2:2 + 2 * (k + 1), 3:8] = 250  # defects of three sizes: scores spread
        Image.fromarray(img).save(data / "test/crack" / f"{k}.png")
        mask = np.zeros((12, 12), np.uint8)
        mask[2:2 + 2 * (k + 1), 3:8] = 255
        Image.fromarray(mask).save(data / "ground_truth/crack" / f"{k}_mask.png")
    return b, data


def _eval(*args):
    from glad_cli.main import cli

    return CliRunner().invoke(cli, ["eval", *map(str, args), "--baseline", "none", "--batch-size", "4"])


def _scores(out):
    rows = [r.split(",") for r in (out / "scores.csv").read_text().splitlines()[1:]]
    return np.array([int(r[1]) for r in rows], bool), np.array([float(r[2]) for r in rows])


def test_eval_uses_the_calibration_and_opens_with_the_operating_point(stub_eval, tmp_path):
    b, data = stub_eval
    raw = tmp_path / "raw"
    res = _eval(b.path, data, "--out", raw)
    assert res.exit_code == 0, res.output
    assert "uncalibrated" in (raw / "report.md").read_text()
    truth, scores = _scores(raw)
    assert len(np.unique(np.round(scores, 6))) > 3
    # a threshold between the two highest good scores: one false reject; the pixel threshold at the image threshold
    # (the score is a top-K mean of the map, so the rejected images have pixels above it)
    t = float(np.sort(scores[~truth])[-2:].mean())
    cal = Calibration(rule="normal_quantile", image_threshold=t, image_min=float(scores.min()),
                      image_max=float(scores.max()), n_images=40, n_normal=40, pixel_threshold=t,
                      pixel_rule="normal_quantile", pixel_min=0.0, pixel_max=2 * float(scores.max()),
                      params={"target_fpr": 0.05, "quantile_method": "linear"}, model_checksum=b.model_checksum())
    b.write_calibration(cal)

    out = tmp_path / "cal"
    res = _eval(b.path, data, "--out", out)
    assert res.exit_code == 0, res.output
    metrics = json.loads((out / "metrics.json").read_text())
    op = metrics["operating_point"]
    pred = scores > t
    misses, false_rejects = int((truth & ~pred).sum()), int((~truth & pred).sum())
    assert (op["misses"], op["false_rejects"]) == (misses, false_rejects)
    assert op["threshold"] == pytest.approx(t) and op["threshold_source"] == "calibration"
    assert op["miss_rate"] == pytest.approx(misses / truth.sum())
    assert op["false_reject_rate"] == pytest.approx(false_rejects / (~truth).sum())
    assert op["source_detail"].startswith("calibration.json (glad calibrate")
    assert "40 held-out normal images, target false-reject rate 5%" in op["source_detail"]
    assert (misses, false_rejects) == (0, 1)
    assert metrics["pixel_threshold"] == {"value": pytest.approx(t), "source": "calibration"}
    assert metrics["map_scale"]["source"] == "calibration" and metrics["map_scale"]["vmax"] == pytest.approx(2 * t)
    px = metrics["pixel_operating_point"]
    assert px["pixel_threshold"] == pytest.approx(t) and px["TP"] + px["FN"] > 0 and px["TP"] + px["FP"] > 0

    md = (out / "report.md").read_text()
    first = md.split("## ")[1]  # the first section after the title
    assert first.startswith("Operating point") and f"{t:.6g}" in first and "calibration.json" in first
    assert f"**{misses}** of {truth.sum()}" in first and f"**{false_rejects}** of {(~truth).sum()}" in first
    assert f"{100 * misses / truth.sum():.1f}%" in first and "Pixel operating point" in first
    page = (out / "report.html").read_text()
    body = page[page.index("<body>"):]
    assert body.index("Operating point") < body.index("Metrics") < body.index("Images")
    assert f"{false_rejects} false rejects" in page and "One colour scale for every image" in page

    srcs = html_image_sources(page)
    assert len(srcs) == 3 + 6  # hist, roc, grid and every test image (<= 4 per kind)
    assert all(base64.b64decode(s.split(",", 1)[1])[:4] == b"\x89PNG" for s in srcs)

    # --threshold overrides the calibration for the run, and the report says so
    over = tmp_path / "over"
    res = _eval(b.path, data, "--out", over, "--threshold", float(scores.max()) + 1)
    assert res.exit_code == 0, res.output
    op = json.loads((over / "metrics.json").read_text())["operating_point"]
    assert op["threshold_source"] == "override" and op["misses"] == truth.sum() and op["false_rejects"] == 0
    assert op["miss_rate"] == 1.0 and op["false_reject_rate"] == 0.0
    assert re.search(r"override for this run \(--threshold\); the bundle's calibrated threshold is",
                     (over / "report.md").read_text())
    res = _eval(b.path, data, "--out", over, "--threshold", "nan")
    assert res.exit_code == 2 and "finite" in res.output
