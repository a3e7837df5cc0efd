"""Calibration (calib/): thresholds against independent references, edge cases, JSON and bundle round trips, and
labels in `glad detect` / `glad calibrate`."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from glad_runtime.core.calibration import (SCHEMA_VERSION, Calibration, CalibrationError, CalibrationWarning,
                              f1_optimal_threshold, quantile_threshold)
from conftest import StubEngines, stub_config
from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.core.images import load_image, preprocess
from glad_runtime.pipeline.batch import GladPipeline


# ---------------------------------------------------------------------------------------------- references
def brute_force_f1(scores: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Every threshold that changes a decision, rule ``score > c``: candidates below the minimum and halfway between
    consecutive distinct scores. Returns (lowest best threshold, best F1); F1 = 0 when nothing is predicted."""
    u = np.unique(scores)
    cands = [np.nextafter(u[0], -np.inf)] + [(u[k - 1] + u[k]) / 2 for k in range(1, len(u))]
    best_c, best_f1 = None, -1.0
    for c in cands:  # ascending: a strictly greater F1 is needed to move up, so ties keep the lowest threshold
        pred = scores > c
        tp = int((pred & labels).sum())
        fp = int((pred & ~labels).sum())
        fn = int((~pred & labels).sum())
        f1 = 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
        if f1 > best_f1 + 1e-12:
            best_c, best_f1 = float(c), f1
    return best_c, best_f1


def quiet_from_normals(*args, **kw) -> Calibration:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CalibrationWarning)
        return Calibration.from_normals(*args, **kw)


# ---------------------------------------------------------------------------------------------- normal rule
def test_module_imports_neither_torch_nor_sklearn():
    code = "import sys, glad_runtime.core.calibration, glad_runtime.core.bundle; print('torch' in sys.modules, 'sklearn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_quantile_rule_equals_numpy_quantile():
    x = np.arange(1.0, 101.0)  # 1..100
    rng = np.random.default_rng(1)
    c = Calibration.from_normals(rng.permutation(x), target_fpr=0.05)
    # numpy's linear method: position 0.95 * 99 = 94.05 -> 95 + 0.05 * (96 - 95)
    assert c.image_threshold == pytest.approx(95.05, abs=1e-12)
    assert c.image_threshold == pytest.approx(np.quantile(x, 0.95))
    assert c.metrics["fpr"] == pytest.approx(0.05)  # 96..100 are above
    assert (c.image_min, c.image_max, c.n_images, c.n_normal, c.n_anomalous) == (1.0, 100.0, 100, 100, 0)
    assert c.image_stats["q50"] == pytest.approx(50.5) and c.image_stats["mean"] == pytest.approx(50.5)
    assert c.image_stats["std"] == pytest.approx(np.std(x))
    y = rng.gamma(2.0, size=357)
    for fpr in (0.01, 0.1, 0.3):
        for method in ("linear", "higher"):
            assert quiet_from_normals(y, target_fpr=fpr, quantile_method=method).image_threshold == \
                np.quantile(y, 1 - fpr, method=method)
    assert Calibration.from_normals(y, target_fpr=0.1).params["target_fpr"] == 0.1
    assert quantile_threshold(y.reshape(7, 51), 0.1) == np.quantile(y, 0.9)  # any shape, flattened


def test_fpr_on_fresh_normals_matches_target():
    rng = np.random.default_rng(0)
    c = Calibration.from_normals(rng.normal(size=20000), target_fpr=0.01)
    fresh = rng.normal(size=200000)
    assert np.mean(c.is_anomalous(fresh)) == pytest.approx(0.01, abs=0.0015)
    assert c.image_threshold == pytest.approx(2.3263, abs=0.06)  # the N(0,1) 99 % quantile


def test_pixel_threshold_is_the_quantile_over_all_pixels():
    rng = np.random.default_rng(2)
    maps = rng.exponential(size=(10, 6, 7)).astype(np.float32)
    scores = maps.reshape(10, -1).max(1)
    c = Calibration.from_normals(scores, list(maps), target_fpr=0.1, pixel_target_fpr=0.02)
    # all 42 pixels of each map are kept (pixels_per_image > 42), so the reference is exact
    assert c.pixel_threshold == pytest.approx(np.quantile(maps.astype(np.float64).ravel(), 0.98))
    assert c.pixel_rule == "normal_quantile" and c.metrics["pixel_fpr"] <= 0.02 + 1 / 420  # one order statistic
    assert (c.pixel_min, c.pixel_max) == (pytest.approx(maps.min()), pytest.approx(maps.max()))
    # subsampled: 2000 of 10 000 pixels per map still lands near the exact quantile
    big = rng.exponential(size=(20, 100, 100)).astype(np.float32)
    cs = Calibration.from_normals(big.mean((1, 2)), list(big), target_fpr=0.1, pixels_per_image=2000, seed=3)
    assert cs.pixel_threshold == pytest.approx(np.quantile(big, 0.9), rel=0.03)
    assert cs.params["pixels_per_image"] == 2000


def test_too_few_images_refused_and_small_n_warned():
    with pytest.raises(CalibrationError, match="4 normal images given; a calibration needs at least 5"):
        Calibration.from_normals([0.1, 0.2, 0.3, 0.4])
    with pytest.warns(CalibrationWarning, match="20 normal images are too few for target_fpr 0.01"):
        Calibration.from_normals(np.linspace(0, 1, 20), target_fpr=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Calibration.from_normals(np.linspace(0, 1, 100), target_fpr=0.01)  # n = 1/fpr: no warning


@pytest.mark.filterwarnings("ignore::glad_runtime.core.calibration.CalibrationWarning")
def test_nan_inf_constant_and_bad_fpr_refused():
    s = np.linspace(0, 1, 50)
    s[[3, 7]] = np.nan
    s[9] = np.inf
    with pytest.raises(CalibrationError, match="2 NaN and 1 infinite values"):
        Calibration.from_normals(s)
    with pytest.raises(CalibrationError, match="all equal"):
        Calibration.from_normals(np.full(50, 0.3))
    with pytest.raises(CalibrationError, match="target_fpr must be in"):
        Calibration.from_normals(np.linspace(0, 1, 50), target_fpr=0.0)
    with pytest.raises(CalibrationError, match="3 anomaly maps for 50"):
        Calibration.from_normals(np.linspace(0, 1, 50), [np.ones(4)] * 3)
    assert issubclass(CalibrationError, ValueError)


# ---------------------------------------------------------------------------------------------- labelled rule
@pytest.mark.parametrize("seed", range(8))
def test_f1_threshold_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(6, 30))
    y = rng.random(n) < 0.4
    y[:2] = [False, True]
    s = np.round(rng.normal(size=n) + 1.2 * y, 1 if seed % 2 else 3)  # seed odd: coarse scores with ties
    thr, best = f1_optimal_threshold(s, y)
    ref_thr, ref_f1 = brute_force_f1(s, y)
    assert best["f1"] == pytest.approx(ref_f1)
    assert thr == pytest.approx(ref_thr, rel=1e-12, abs=1e-12)
    pred = s > thr
    assert best["recall"] == pytest.approx((pred & y).sum() / y.sum())
    c = Calibration.from_labelled(s, y) if min(y.sum(), (~y).sum()) >= 5 else None
    if c is not None:
        assert c.image_threshold == thr and c.rule == "f1_optimal"


def test_f1_ties_keep_equal_scores_together_and_prefer_recall():
    # the two 0.5 scores have different labels: they must share a label; F1 is tied between thresholds 0.45 and
    # 0.55 (F1 0.8 both), the lower (higher recall) wins
    s = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.6, 0.7])
    y = np.array([0, 0, 0, 0, 0, 1, 1, 1], bool)
    thr, best = f1_optimal_threshold(s, y)
    assert thr == pytest.approx(0.45) and best["recall"] == 1.0 and best["f1"] == pytest.approx(6 / 7)
    assert brute_force_f1(s, y) == (pytest.approx(0.45), pytest.approx(6 / 7))
    # perfect separation: the midpoint of the gap
    assert f1_optimal_threshold([0.0, 1.0, 2.0, 10.0, 11.0], [0, 0, 0, 1, 1])[0] == pytest.approx(6.0)


def test_labelled_edge_cases():
    s = np.linspace(0, 1, 12)
    with pytest.raises(CalibrationError, match="all normal"):
        Calibration.from_labelled(s, np.zeros(12))
    with pytest.raises(CalibrationError, match="all anomalous"):
        Calibration.from_labelled(s, np.ones(12, bool))
    bad = s.copy()
    bad[0] = np.nan
    with pytest.raises(CalibrationError, match="1 NaN and 0 infinite"):
        Calibration.from_labelled(bad, s > 0.5)
    with pytest.raises(CalibrationError, match="all equal"):
        Calibration.from_labelled(np.ones(12), s > 0.5)
    with pytest.raises(CalibrationError, match="1-D with 12 entries"):
        Calibration.from_labelled(s, np.ones(5))
    with pytest.raises(CalibrationError, match="bool or 0/1"):
        Calibration.from_labelled(s, np.full(12, 2))
    with pytest.raises(CalibrationError, match="at least 5"):
        Calibration.from_labelled(s[:4], [0, 0, 1, 1])
    with pytest.warns(CalibrationWarning, match="11 normal and 1 anomalous"):
        Calibration.from_labelled(s, s > 0.95)
    with pytest.warns(CalibrationWarning, match="flags every calibration image"):
        # anomalies scored lowest: the best F1 flags everything
        Calibration.from_labelled(s, np.r_[np.ones(6), np.zeros(6)].astype(bool))


def test_labelled_pixel_f1_equals_brute_force_and_quantile_fallback():
    rng = np.random.default_rng(5)
    masks = np.zeros((6, 5, 5), bool)
    masks[3:, 1:3, 1:3] = True
    maps = (rng.random((6, 5, 5)) + 0.8 * masks).round(2)
    scores = maps.reshape(6, -1).max(1) + np.array([0, 0, 0, 1, 1, 1])
    labels = np.array([0, 0, 0, 1, 1, 1])
    with pytest.warns(CalibrationWarning):  # 3 per class
        c = Calibration.from_labelled(scores, labels, pixel_maps=list(maps), masks=list(masks))
    ref_thr, ref_f1 = brute_force_f1(maps.ravel(), masks.ravel())
    assert c.pixel_rule == "f1_optimal" and c.pixel_threshold == pytest.approx(ref_thr)
    assert c.metrics["pixel_f1"] == pytest.approx(ref_f1)
    with pytest.warns(CalibrationWarning):
        q = Calibration.from_labelled(scores, labels, pixel_maps=list(maps), pixel_target_fpr=0.1)
    assert q.pixel_rule == "normal_quantile"
    assert q.pixel_threshold == pytest.approx(np.quantile(maps[:3].ravel(), 0.9))  # the normal images' pixels


# ---------------------------------------------------------------------------------------------- normalisation, JSON
def test_normalize_threshold_at_half_clipped_and_override():
    c = Calibration.from_normals(np.array([0.0, 1.0, 2.0, 3.0, 4.0]), target_fpr=0.25)  # threshold 3.0, span 4
    assert c.image_threshold == pytest.approx(3.0)
    assert c.normalize(3.0) == 0.5 and c.normalize(4.0) == pytest.approx(0.75) and c.normalize(1.0) == 0.0
    assert c.normalize(100.0) == 1.0 and c.normalize(-100.0) == 0.0
    np.testing.assert_allclose(c.normalize(np.array([2.0, 3.5])), [0.25, 0.625])
    assert c.normalize(2.0, threshold=2.0) == 0.5 and c.label(2.5, threshold=2.0) == "anomalous"
    assert c.label(3.0) == "normal" and c.label(3.0001) == "anomalous"  # strictly above
    s = np.random.default_rng(0).uniform(-2, 6, 1000)
    np.testing.assert_array_equal(c.is_anomalous(s), c.normalize(s) > 0.5)
    with pytest.raises(CalibrationError, match="no pixel threshold"):
        c.normalize_map(np.zeros((2, 2)))
    with pytest.raises(CalibrationError, match="finite"):
        c.threshold(float("nan"))


def test_json_round_trip_and_schema_checks():
    rng = np.random.default_rng(0)
    c = Calibration.from_normals(rng.random(40), list(rng.random((40, 4, 4))), target_fpr=0.05,
                                 model_checksum="abc", extra_params={"pipeline_seed": 3})
    d = json.loads(c.to_json())
    assert d["schema_version"] == SCHEMA_VERSION == 1 and d["rule"] == "normal_quantile"
    back = Calibration.from_json(c.to_json())
    assert back == c and back.params["pipeline_seed"] == 3
    assert back.normalize_map(np.full((2, 2), c.pixel_threshold)).tolist() == [[0.5, 0.5], [0.5, 0.5]]
    with pytest.raises(CalibrationError, match="newer"):
        Calibration.from_dict(d | {"schema_version": 2})
    with pytest.raises(CalibrationError, match="schema_version"):
        Calibration.from_dict({k: v for k, v in d.items() if k != "schema_version"})
    with pytest.raises(CalibrationError, match="unknown calibration keys"):
        Calibration.from_dict(d | {"bogus": 1})
    with pytest.raises(CalibrationError, match="image_max must exceed"):
        Calibration.from_dict(d | {"image_max": d["image_min"]})
    with pytest.raises(CalibrationError, match="not valid JSON"):
        Calibration.from_json("{")


# ---------------------------------------------------------------------------------------------- bundle
def _stub_bundle(tmp_path):
    b = Bundle.create(tmp_path / "b", stub_config())
    (b.file("weights") / "w.bin").write_bytes(b"weights")
    b.write_manifest()
    return b


def test_bundle_round_trip_verify_and_tamper(tmp_path):
    b = _stub_bundle(tmp_path)
    assert b.calibration() is None
    checksum, model = b.checksum(), b.model_checksum()
    c = Calibration.from_normals(np.linspace(0, 1, 30), target_fpr=0.05, model_checksum=model)
    b.write_calibration(c)
    b.verify()  # the manifest now covers calibration.json
    assert "calibration.json" in b.manifest()["files"] and b.checksum() != checksum and b.model_checksum() == model
    assert Bundle(b.path).calibration() == c
    # a modified calibration fails verification
    (b.file("calibration.json")).write_text(c.replace(image_threshold=0.0).to_json())
    with pytest.raises(BundleError, match="calibration.json"):
        b.calibration()
    b.write_calibration(c)  # rewriting through the API is fine
    # a tampered weight file is not blessed by a new calibration
    (b.file("weights") / "w.bin").write_bytes(b"evil")
    with pytest.raises(BundleError, match="w.bin"):
        b.write_calibration(c)


def test_bundle_calibration_for_another_model(tmp_path):
    b = _stub_bundle(tmp_path)
    with pytest.raises(BundleError, match="computed for model"):
        b.write_calibration(Calibration.from_normals(np.linspace(0, 1, 30), target_fpr=0.05, model_checksum="x"))
    b.write_calibration(Calibration.from_normals(np.linspace(0, 1, 30), target_fpr=0.05,
                                                 model_checksum=b.model_checksum()))
    (b.file("weights") / "w.bin").write_bytes(b"retrained")
    b.write_manifest()  # what training does
    with pytest.warns(CalibrationWarning, match="rerun `glad calibrate`"):
        assert b.calibration() is not None
    # a calibration.json copied in by hand is not trusted
    b2 = _stub_bundle(tmp_path / "2")
    shutil.copy(b.file("calibration.json"), b2.file("calibration.json"))
    with pytest.raises(BundleError, match="not in the manifest"):
        b2.calibration()


# ---------------------------------------------------------------------------------------------- detect
def _images(folder, values, size=(10, 12)):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, v in enumerate(values):
        rng = np.random.default_rng(k)
        img = np.clip(v + rng.normal(0, 12, size), 0, 255).astype(np.uint8)
        p = folder / f"img{k:02d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def test_detect_files_labels_override_and_uncalibrated(tmp_path):
    from calib.collect import score_images
    from glad_runtime.detector import Detector
    from glad_runtime.output import UNCALIBRATED_NOTE, detect_files, summarize

    pipe = GladPipeline(StubEngines(), stub_config())
    normals = _images(tmp_path / "normal", [90, 95, 100, 105, 110, 100])
    scored = score_images(Detector(StubEngines(), stub_config()), normals, batch_size=4, progress=False)
    direct = pipe(np.stack([pipe.preprocessor.image(load_image(p)) for p in normals]))
    np.testing.assert_allclose(scored.scores, direct.scores, rtol=1e-6)  # batching does not change scores
    cal = quiet_from_normals(scored.scores, scored.pixels, target_fpr=0.2)
    probe = normals + _images(tmp_path / "probe", [250, 5])
    recs = detect_files(Detector(StubEngines(), stub_config(), cal), probe, tmp_path / "o1", progress=False)
    for r in recs:
        assert r.threshold == cal.image_threshold and r.threshold_source == "calibration"
        assert r.label == ("anomalous" if r.score > cal.image_threshold else "normal")
        assert r.normalized_score == pytest.approx(cal.normalize(r.score))
    written = [json.loads(line) for line in open(tmp_path / "o1" / "results.jsonl")]
    assert [w["label"] for w in written] == [r.label for r in recs]
    assert json.loads((tmp_path / "o1" / "img00.json").read_text())["normalized_score"] == recs[0].normalized_score
    summary = summarize(recs)
    assert summary["anomalous"] + summary["normal"] == len(probe) and "note" not in summary
    # per-call override: above every score -> all normal; below every score -> all anomalous
    hi = detect_files(Detector(StubEngines(), stub_config(), cal, threshold=1e9), probe, tmp_path / "o2", progress=False)
    assert {r.label for r in hi} == {"normal"} and hi[0].threshold_source == "override"
    assert all(r.normalized_score == 0.0 for r in hi)
    lo = detect_files(Detector(StubEngines(), stub_config(), cal, threshold=-1.0), probe, tmp_path / "o3", progress=False)
    assert {r.label for r in lo} == {"anomalous"}
    # uncalibrated: no labels and a note; a threshold alone labels without normalising
    raw = detect_files(Detector(StubEngines(), stub_config(), None), probe, tmp_path / "o4", progress=False)
    assert all(r.label is None and r.normalized_score is None for r in raw)
    assert summarize(raw)["note"] == UNCALIBRATED_NOTE
    only = detect_files(Detector(StubEngines(), stub_config(), None, threshold=float(np.median([r.score for r in raw]))), probe, tmp_path / "o5",
                        progress=False)
    assert {r.label for r in only} == {"normal", "anomalous"} and only[0].normalized_score is None
    with pytest.raises(ValueError, match="finite"):
        detect_files(Detector(StubEngines(), stub_config(), None, threshold=float("inf")), probe, tmp_path / "o6", progress=False)


def test_labelled_samples_layouts(tmp_path):
    from training.data import labelled_samples

    cat = tmp_path / "cat"
    _images(cat / "test" / "good", [100, 100])
    _images(cat / "test" / "crack", [200])
    (cat / "ground_truth" / "crack").mkdir(parents=True)
    Image.fromarray(np.full((10, 12), 255, np.uint8)).save(cat / "ground_truth" / "crack" / "img00_mask.png")
    bare = tmp_path / "bare"
    _images(bare / "good", [100])
    _images(bare / "scratch", [200, 210])
    for folder, labels, n_masks in ((cat, [0, 0, 1], 1), (cat / "test", [0, 0, 1], 1), (bare, [0, 1, 1], 0)):
        s = labelled_samples(folder)
        assert [t.label for t in s] == labels and sum(t.mask_path is not None for t in s) == n_masks
    with pytest.raises(FileNotFoundError, match="neither test/"):
        labelled_samples(tmp_path / "cat" / "ground_truth")


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_calibrate_labelled_on_stub_pipeline(tmp_path, stub_backends):
    """`glad calibrate --labelled` wiring with the stub engines in place of the torch engine (fast)."""
    import glad_cli.main as main

    b = _stub_bundle(tmp_path)
    normal = tmp_path / "normal"
    _images(normal, [100, 102, 98, 101, 99])
    lab = tmp_path / "lab"
    _images(lab / "good", [100, 103, 97, 100, 104])
    _images(lab / "dent", [240, 10, 235, 15, 245])
    res = CliRunner().invoke(main.cli, ["calibrate", str(b.path), str(normal), "--labelled", str(lab), "--quiet"])
    assert res.exit_code == 0, res.output
    cal = Bundle(b.path).calibration()
    assert cal.rule == "f1_optimal" and (cal.n_normal, cal.n_anomalous) == (10, 5)
    assert cal.pixel_rule == "normal_quantile" and cal.params["labelled_dir"] == str(lab.resolve())
    assert "rule: f1_optimal" in res.output and "calibration written" in res.output
    Bundle(b.path).verify()
    # all-normal labelled folder: a clear error, the calibration is unchanged
    only_good = tmp_path / "only_good"
    _images(only_good / "good", [100] * 5)
    res = CliRunner().invoke(main.cli, ["calibrate", str(b.path), str(normal), "--labelled", str(only_good),
                                        "--quiet"])
    assert res.exit_code != 0 and "all normal" in res.output
    assert Bundle(b.path).calibration() == cal
    # `glad detect --threshold` overrides the stored threshold for the run
    out = tmp_path / "out"
    for extra, source in (([], "calibration"), (["--threshold", "-1"], "override")):
        res = CliRunner().invoke(main.cli, ["detect", str(b.path), str(lab / "dent"), "--out", str(out), "--quiet",
                                            *extra])
        assert res.exit_code == 0, res.output
        recs = [json.loads(line) for line in open(out / "results.jsonl")]
        assert {r["threshold_source"] for r in recs} == {source}
        assert all(r["label"] == cal.label(r["score"], r["threshold"]) for r in recs)
        assert res.output.count("anomalous ") == sum(r["label"] == "anomalous" for r in recs)
    assert {r["label"] for r in recs} == {"anomalous"} and recs[0]["threshold"] == -1.0
    # `glad detect --set`: a config field for this run; the score is then the map's maximum (top-1 >= top-K mean),
    # and the summary says the calibration was made with another config
    res = CliRunner().invoke(main.cli, ["detect", str(b.path), str(lab / "dent"), "--out", str(tmp_path / "top1"),
                                        "--quiet", "--set", "top_k=1", "--map-format", "npy"])
    assert res.exit_code == 0, res.output
    top1 = {r["source"]: r for r in map(json.loads, open(tmp_path / "top1" / "results.jsonl"))}
    for r in recs:
        assert top1[r["source"]]["score"] >= r["score"] - 1e-6
    assert "run with --set top_k" in json.loads(res.output.strip().splitlines()[-1])["note"]
    res = CliRunner().invoke(main.cli, ["detect", str(b.path), str(lab / "dent"), "--out", str(out), "--quiet",
                                        "--set", "no_such_field=1"])
    assert res.exit_code == 2 and "--set" in res.output and "no_such_field" in res.output
    # an uncalibrated bundle: no labels, and a note
    plain = _stub_bundle(tmp_path / "plain")
    res = CliRunner().invoke(main.cli, ["detect", str(plain.path), str(lab / "dent"), "--out", str(out), "--quiet"])
    assert res.exit_code == 0 and "note: the bundle is uncalibrated" in res.output
    assert json.loads(res.output.strip().splitlines()[-1])["note"].startswith("the bundle is uncalibrated")


def test_cli_calibrate_then_detect_tiny_bundle(tiny_bundle, tmp_path):
    """The real path: `glad calibrate` and `glad detect` on a copy of the tiny torch bundle (ADS off, 2 steps, 112 px features: speed)."""
    from glad_cli.main import cli

    path = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.path, path)
    fast = tiny_bundle.config.replace(ads_enabled=False, num_inference_steps=2, dino_resolution=112)
    (path / "config.json").write_text(fast.to_json())
    b = Bundle(path)
    b.write_manifest()
    normal = tmp_path / "normal"
    _images(normal, [100, 110, 95, 105, 100], size=(32, 32))
    res = CliRunner().invoke(cli, ["calibrate", str(path), str(normal), "--target-fpr", "0.2", "--quiet",
                                   "--pixels-per-image", "500"])
    assert res.exit_code == 0, res.output
    cal = Bundle(path).calibration()
    assert cal.rule == "normal_quantile" and cal.n_images == 5 and cal.params["target_fpr"] == 0.2
    assert cal.model_checksum == b.model_checksum() and cal.pixel_threshold is not None
    assert "images: 5 (5 normal, 0 anomalous)" in res.output and "normal scores: min" in res.output
    Bundle(path).verify()

    probe = tmp_path / "probe"
    _images(probe, [100, 250], size=(32, 32))
    out = tmp_path / "out"
    res = CliRunner().invoke(cli, ["detect", str(path), str(probe), "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in open(out / "results.jsonl")]
    for r in recs:
        assert r["label"] == ("anomalous" if r["score"] > cal.image_threshold else "normal")
        assert r["threshold"] == cal.image_threshold and r["normalized_score"] == pytest.approx(
            cal.normalize(r["score"]))
        assert f"{r['label']:9s} {r['normalized_score']:.3f}" in res.output
    summary = json.loads(res.output.strip().splitlines()[-1])
    assert summary["anomalous"] + summary["normal"] == 2 and summary["threshold_source"] == "calibration"
