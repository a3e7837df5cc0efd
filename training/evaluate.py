"""``glad eval BUNDLE DATA``: metrics on an MVTec-format test split, the kNN baseline beside GLAD, and a report.

Outputs in ``OUT``: ``metrics.json`` (I-AUROC, I-AP, I-F1max; with masks P-AUROC, P-AP, P-F1max, AUPRO@0.3),
``scores.csv``, ``roc.png``, ``grid.png`` (input / reconstruction / heatmap rows) and ``report.md`` / ``report.html``.
Scores are raw (never min-max normalised over the test set, project decision 3).
"""

from __future__ import annotations

import html
import json
import time
from pathlib import Path

import numpy as np

from glad_runtime.core.images import even_subset, load_batches
from glad_runtime.detector import Detector

from .data import MVTecCategory
from .knn import KnnBaseline
from .metrics import image_metrics, pixel_metrics

__all__ = ["evaluate", "score_category"]


def score_category(detector: Detector, data_root: str | Path, *, max_test: int = 0, batch_size: int = 8,
                   progress: bool = True, keep_reconstructions: bool = False):
    """Score an MVTec-format category's test split with ``detector`` (the one place evaluation and the
    quantisation gate read a test set).

    Args:
        max_test: at most this many test images, taken evenly from the sorted list (0 = all; the same subset
            for every call, :func:`glad_runtime.core.images.even_subset`).
    Returns:
        ``(category, paths, labels int [N], detections, masks bool [N, D, D] or None)``; masks at
        ``dino_resolution`` when the category has pixel masks (all-normal masks for good images).
    Raises:
        ImageLoadError: a test image cannot be read (named).
    """
    from .data import load_mask

    cat = MVTecCategory(data_root)
    paths, labels, _ = cat.test_images()
    keep = even_subset(paths, max_test)
    samples = [cat.test_samples()[i] for i in keep]
    paths, labels = [paths[i] for i in keep], labels[keep]
    dets = detector.score_files(paths, batch_size=batch_size, progress=progress, desc="eval GLAD",
                                keep_reconstructions=keep_reconstructions)
    masks = None
    if cat.has_pixel_masks:
        d = detector.config.dino_resolution
        masks = np.stack([load_mask(s.mask_path, d) if s.mask_path is not None else np.zeros((d, d), bool)
                          for s in samples])
    return cat, paths, labels, dets, masks


def evaluate(detector: Detector, data_root: str | Path, out_dir: str | Path, *,
             baseline: str | None = "knn", batch_size: int = 8, max_test: int = 0, progress: bool = True,
             title: str = "GLAD evaluation", log=print) -> dict:
    """Evaluate GLAD (and optionally the kNN baseline) on ``DATA/test`` and write the report.

    Args:
        detector: the bundle's :class:`Detector` (any backend; its engines also run the kNN baseline).
        data_root: MVTec-format category (``train/good`` is used by the baseline only).
        baseline: ``"knn"`` or None.
        max_test: evaluate at most this many test images, taken evenly from the sorted list (0 = all).
    Returns:
        the metrics dict (also in ``metrics.json``).
    """
    from tqdm import tqdm

    cfg, engines = detector.config, detector.engines
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    cat, paths, labels, dets, masks = score_category(detector, data_root, max_test=max_test, batch_size=batch_size,
                                                     progress=progress, keep_reconstructions=True)
    glad_s = time.perf_counter() - start
    result: dict = {"title": title, "data": str(Path(data_root).resolve()), "test_images": len(paths),
                    "anomalous": int(labels.sum()), "config": cfg.to_dict()}
    d = cfg.dino_resolution

    scores = np.array([x.score for x in dets], np.float32)
    maps = np.stack([x.anomaly_map for x in dets])
    steps = np.array([x.adaptive_step for x in dets], np.int64)
    recons = np.stack([x.reconstruction for x in dets])
    inputs = np.concatenate(list(load_batches(paths, cfg.resolution, batch_size)))
    result["glad"] = image_metrics(labels, scores) | {"seconds_per_image": glad_s / len(paths)}
    result["glad"]["adaptive_step_hist"] = {int(k): int(v) for k, v in zip(*np.unique(steps, return_counts=True))}
    if masks is not None:
        result["glad"] |= pixel_metrics(masks, maps)
    log(f"GLAD: {_fmt(result['glad'])}")

    knn_scores = knn_maps = None
    if baseline == "knn":
        start = time.perf_counter()
        # the baseline reads the images straight at its feature resolution: it needs no VAE, so it is not held to
        # the detector's 128 px (going through 128 px cost it about 0.005 AUROC on ELPV mono)
        knn = KnnBaseline(engines, d, seed=cfg.seed)
        knn.fit(load_batches(cat.train_images(), d, batch_size))
        knn_scores, knn_maps = [], []
        for batch in tqdm(list(load_batches(paths, d, batch_size)), desc="eval kNN", unit="batch",
                          disable=not progress):
            s, m = knn.score(batch)
            knn_scores.append(s)
            knn_maps.append(m)
        knn_scores, knn_maps = np.concatenate(knn_scores), np.concatenate(knn_maps)
        result["knn"] = image_metrics(labels, knn_scores) | {
            "seconds_per_image": (time.perf_counter() - start) / len(paths)}
        if masks is not None:
            result["knn"] |= pixel_metrics(masks, knn_maps)
        log(f"kNN baseline: {_fmt(result['knn'])}")
    elif baseline is not None:
        raise ValueError(f"unknown baseline {baseline!r} (supported: knn)")

    with open(out / "scores.csv", "w") as f:
        f.write("path,label,glad_score,adaptive_step" + (",knn_score" if knn_scores is not None else "") + "\n")
        for i, p in enumerate(paths):
            row = f"{p},{labels[i]},{scores[i]:.6f},{steps[i]}"
            f.write(row + (f",{knn_scores[i]:.6f}" if knn_scores is not None else "") + "\n")
    _plot_roc(out / "roc.png", labels, {"GLAD": scores} | ({"kNN": knn_scores} if knn_scores is not None else {}))
    _plot_grid(out / "grid.png", inputs, recons, maps, labels, scores)
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    _write_report(out, result)
    return result


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in m.items() if isinstance(v, float))


def _plot_roc(path: Path, labels: np.ndarray, curves: dict[str, np.ndarray]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    for name, s in curves.items():
        fpr, tpr, _ = roc_curve(labels, s)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(labels, s):.3f})")
    ax.plot([0, 1], [0, 1], "k:", lw=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("Image-level ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(path: Path, inputs: np.ndarray, recons: np.ndarray, maps: np.ndarray, labels: np.ndarray,
               scores: np.ndarray, per_class: int = 4) -> None:
    """Columns: the highest-scoring anomalous and normal test images; rows: input, reconstruction, heatmap."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for lab in (1, 0):
        idx = np.where(labels == lab)[0]
        picks += list(idx[np.argsort(-scores[idx])][:per_class])
    vmax = float(np.percentile(maps, 99.5))
    fig, axes = plt.subplots(3, len(picks), figsize=(1.6 * len(picks), 5.2), squeeze=False)
    for c, i in enumerate(picks):
        for r, (img, kw) in enumerate([((inputs[i].transpose(1, 2, 0) + 1) / 2, {}),
                                       ((recons[i].transpose(1, 2, 0) + 1) / 2, {}),
                                       (maps[i], {"cmap": "inferno", "vmin": 0, "vmax": vmax})]):
            ax = axes[r, c]
            ax.imshow(np.clip(img, 0, 1) if img.ndim == 3 else img, **kw)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, c].set_title(f"{'defect' if labels[i] else 'good'}\n{scores[i]:.3f}", fontsize=8)
    for r, name in enumerate(["input", "reconstruction", "anomaly map"]):
        axes[r, 0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _write_report(out: Path, result: dict) -> None:
    keys = [k for k in ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO") if k in result["glad"]]
    rows = [("GLAD", result["glad"])] + ([("kNN baseline", result["knn"])] if "knn" in result else [])
    md = [f"# {result['title']}", "", f"Data: `{result['data']}`, {result['test_images']} test images "
          f"({result['anomalous']} anomalous). Preset `{result['config']['preset']}`.", "",
          "| method | " + " | ".join(keys) + " | s/image |", "|---" * (len(keys) + 2) + "|"]
    for name, m in rows:
        md.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {m['seconds_per_image']:.3f} |")
    md += ["", "AUPRO integrates the PRO curve to FPR 0.3 and divides by 0.3. Scores are raw (uncalibrated).", "",
           "![ROC](roc.png)", "", "![input / reconstruction / anomaly map](grid.png)", ""]
    (out / "report.md").write_text("\n".join(md))
    table = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{m[k]:.4f}</td>" for k in keys)
                    + f"<td>{m['seconds_per_image']:.3f}</td></tr>" for n, m in rows)
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(result['title'])}</title></head>"
        f"<body style='font-family:sans-serif'><h1>{html.escape(result['title'])}</h1>"
        f"<p>{html.escape(result['data'])}: {result['test_images']} test images ({result['anomalous']} anomalous)</p>"
        f"<table border='1' cellpadding='4'><tr><th>method</th>" + "".join(f"<th>{k}</th>" for k in keys)
        + f"<th>s/image</th></tr>{table}</table><p><img src='roc.png'></p><p><img src='grid.png'></p></body></html>")
