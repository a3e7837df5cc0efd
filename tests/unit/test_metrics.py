"""Tests of training/metrics.py against scikit-learn and brute-force references (spec section 6, decision 10)."""


import numpy as np
import pytest
from skimage.measure import label as sk_label
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score

from training.metrics import aupro, f1_max, image_metrics, pixel_metrics


def _trapezoid(y, x):
    x, y = np.asarray(x, float), np.asarray(y, float)
    return float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))


def brute_f1max(labels, scores):
    """Max F1 over every threshold 'score >= t' for t in the distinct scores."""
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores).ravel()
    best = 0.0
    for t in np.unique(scores):
        pred = scores >= t
        tp = np.sum(pred & labels)
        fp = np.sum(pred & ~labels)
        fn = np.sum(~pred & labels)
        if tp:
            best = max(best, 2 * tp / (2 * tp + fp + fn))
    return best


def brute_aupro(masks, maps, fpr_limit=0.3, n=200):
    """Independent AUPRO: explicit loops over thresholds and skimage regions, np.interp at the FPR limit."""
    masks = np.asarray(masks, bool)
    maps = np.asarray(maps, float)
    lo, hi = maps.min(), maps.max()
    regions = []
    for i in range(masks.shape[0]):
        lab = sk_label(masks[i])  # default: full (8-) connectivity
        for r in range(1, lab.max() + 1):
            regions.append((i, lab == r))
    points = [(0.0, 0.0), (1.0, 1.0)]
    neg = ~masks
    for k in range(n):
        t = lo + (hi - lo) * k / n
        pred = maps > t
        overlaps = [pred[i][reg].sum() / reg.sum() for i, reg in regions]
        fpr = (pred & neg).sum() / neg.sum()
        points.append((fpr, float(np.mean(overlaps))))
    points.sort()
    fprs = np.array([p[0] for p in points])
    pros = np.array([p[1] for p in points])
    keep = fprs <= fpr_limit
    x = np.concatenate([fprs[keep], [fpr_limit]])
    y = np.concatenate([pros[keep], [np.interp(fpr_limit, fprs, pros)]])
    return _trapezoid(y, x) / fpr_limit


def random_blob_masks(rng, n, h, w):
    masks = np.zeros((n, h, w), bool)
    for i in range(n):
        for _ in range(rng.integers(0, 4)):
            y, x = rng.integers(0, h - 4), rng.integers(0, w - 4)
            masks[i, y : y + rng.integers(1, 6), x : x + rng.integers(1, 6)] = True
    masks[0, 2:5, 2:6] = True  # at least one region
    return masks


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_image_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    y = rng.random(300) < 0.4
    s = np.round(rng.normal(size=300) + 1.2 * y, 1)  # rounded: many ties
    r = image_metrics(y.astype(int), s)
    assert set(r) == {"I-AUROC", "I-AP", "I-F1max"}
    assert r["I-AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert r["I-AP"] == pytest.approx(average_precision_score(y, s), abs=1e-12)
    assert r["I-F1max"] == pytest.approx(brute_f1max(y, s), abs=1e-12)
    p, rc, _ = precision_recall_curve(y, s)
    with np.errstate(all="ignore"):
        f = 2 * p * rc / (p + rc)
    assert r["I-F1max"] == pytest.approx(np.nanmax(f), abs=1e-12)
    assert f1_max(y, s) == pytest.approx(r["I-F1max"], abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_pixel_metrics_equal_sklearn(seed):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 4, 24, 32)
    maps = np.round(rng.normal(size=masks.shape) + 1.5 * masks, 1).astype(np.float32)
    r = pixel_metrics(masks, maps)
    y, s = masks.ravel(), maps.ravel()
    assert set(r) == {"P-AUROC", "P-AP", "P-F1max", "AUPRO"}
    assert r["P-AUROC"] == pytest.approx(roc_auc_score(y, s), abs=1e-10)
    assert r["P-AP"] == pytest.approx(average_precision_score(y, s), abs=1e-10)
    assert r["P-F1max"] == pytest.approx(brute_f1max(y, s), abs=1e-10)
    assert r["AUPRO"] == pytest.approx(aupro(masks, maps), abs=1e-12)
    # continuous scores (no ties), 0/1 integer masks
    maps2 = rng.normal(size=masks.shape) + masks
    r2 = pixel_metrics(masks.astype(np.uint8), maps2, with_aupro=False)
    assert "AUPRO" not in r2
    assert r2["P-AUROC"] == pytest.approx(roc_auc_score(masks.ravel(), maps2.ravel()), abs=1e-10)
    assert r2["P-AP"] == pytest.approx(average_precision_score(masks.ravel(), maps2.ravel()), abs=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_aupro_matches_brute_force(seed):
    rng = np.random.default_rng(seed)
    masks = random_blob_masks(rng, 3, 16, 20)
    noise = 1.0 if seed < 2 else 0.3
    maps = masks * rng.uniform(0.2, 1.0) + noise * rng.random(masks.shape)
    if seed == 3:
        maps = np.round(maps, 1)  # ties at thresholds
    assert aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-9)
    assert aupro(masks, maps, fpr_limit=0.5, num_thresholds=37) == pytest.approx(
        brute_aupro(masks, maps, 0.5, 37), abs=1e-9
    )


def test_aupro_diagonal_regions_are_8_connected():
    masks = np.zeros((1, 8, 8), bool)
    masks[0, 1, 1] = masks[0, 2, 2] = True  # one 8-connected region (two 4-connected ones)
    masks[0, 6, 6] = True
    maps = np.zeros((1, 8, 8))
    maps[0, 1, 1] = 1.0  # half of the diagonal region, none of the other
    maps[0, 0, 7] = 0.5
    assert aupro(masks, maps) == pytest.approx(brute_aupro(masks, maps), abs=1e-12)


def test_aupro_perfect_and_constant_maps():
    rng = np.random.default_rng(0)
    masks = random_blob_masks(rng, 5, 32, 32)
    assert aupro(masks, masks.astype(np.float32)) == 1.0
    assert aupro(masks, masks * 3.0 + 0.01 * rng.random(masks.shape)) == 1.0  # positives all above negatives
    assert aupro(masks, np.zeros(masks.shape)) == pytest.approx(0.15, abs=1e-9)  # random-ranking diagonal
    assert aupro(masks, -masks.astype(float)) < 0.2  # inverted map


def test_aupro_never_exceeds_one():
    for seed in range(25):
        rng = np.random.default_rng(seed)
        masks = random_blob_masks(rng, 2, 16, 16)
        maps = rng.random(masks.shape) + rng.uniform(0, 3) * masks
        v = aupro(masks, maps)
        assert 0.0 <= v <= 1.0
        assert 0.0 <= aupro(masks, maps, fpr_limit=0.01) <= 1.0


def test_aupro_many_maps_stays_in_range():
    """A category-sized input (40 maps of 256x256, two region shapes). No timing here: speed belongs in bench/."""
    rng = np.random.default_rng(0)
    masks = np.zeros((40, 256, 256), bool)
    masks[::2, 100:140, 60:90] = True
    masks[1::4, 10:20, 10:250] = True
    maps = (masks + rng.normal(0, 0.7, masks.shape)).astype(np.float32)
    r = pixel_metrics(masks, maps)
    assert 0.5 < r["AUPRO"] <= 1.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="empty"):
        image_metrics([], [])
    with pytest.raises(ValueError, match="length"):
        image_metrics([0, 1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        image_metrics([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="single class"):
        image_metrics([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="binary"):
        image_metrics([0, 2, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="1-D"):
        image_metrics(np.zeros((2, 2)), np.zeros((2, 2)))
    m = np.zeros((2, 8, 8), bool)
    m[0, 2:4, 2:4] = True
    with pytest.raises(ValueError, match="shape"):
        pixel_metrics(m, np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="shape"):
        aupro(m, np.zeros((2, 8, 9)))
    with pytest.raises(ValueError, match="empty"):
        aupro(np.zeros((0, 8, 8), bool), np.zeros((0, 8, 8)))
    bad = np.zeros((2, 8, 8))
    bad[1, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        aupro(m, bad)
    with pytest.raises(ValueError, match="NaN"):
        pixel_metrics(m, bad)
    with pytest.raises(ValueError, match="single class"):
        aupro(np.zeros((2, 8, 8), bool), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="single class"):
        pixel_metrics(np.ones((2, 8, 8), bool), np.zeros((2, 8, 8)))
    with pytest.raises(ValueError, match="fpr_limit"):
        aupro(m, np.zeros((2, 8, 8)), fpr_limit=0.0)


@pytest.mark.parametrize("seed", [0, 1])
def test_operating_points_equal_sklearn(seed):
    from sklearn.metrics import confusion_matrix, jaccard_score, precision_recall_fscore_support

    from training.metrics import operating_point, pixel_operating_point

    rng = np.random.default_rng(seed)
    y = rng.random(40) < 0.3
    s = rng.normal(size=40) + y
    t = float(np.quantile(s, 0.6))
    op = operating_point(y.astype(int), s, t)
    tn, fp, fn, tp = confusion_matrix(y, s > t, labels=[False, True]).ravel()
    assert (op["TN"], op["FP"], op["FN"], op["TP"]) == (tn, fp, fn, tp)
    assert (op["misses"], op["false_rejects"]) == (fn, fp)
    p, r, f, _ = precision_recall_fscore_support(y, s > t, average="binary", zero_division=0)
    np.testing.assert_allclose([op["precision"], op["recall"], op["F1"], op["FPR"]], [p, r, f, fp / (fp + tn)])
    assert operating_point(y, s, s[y].min() - 1)["misses"] == 0  # strictly greater: nothing above it is passed
    assert operating_point(np.zeros(3), [0.1, 0.2, 0.3], 0.2)["recall"] is None  # no defective images: undefined

    masks = rng.random((3, 16, 16)) < 0.2
    maps = rng.random((3, 16, 16)) + 0.5 * masks
    pt = 0.8
    px = pixel_operating_point(masks, maps, pt)
    tn, fp, fn, tp = confusion_matrix(masks.ravel(), maps.ravel() > pt).ravel()
    assert (px["TN"], px["FP"], px["FN"], px["TP"]) == (tn, fp, fn, tp)
    np.testing.assert_allclose(px["IoU"], jaccard_score(masks.ravel(), maps.ravel() > pt))
    with pytest.raises(ValueError, match="finite"):
        pixel_operating_point(masks, maps, float("nan"))
