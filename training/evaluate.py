"""``glad eval BUNDLE DATA``: metrics on an MVTec-format test split, the kNN baseline beside GLAD, and a report.

Outputs in ``OUT``: ``metrics.json`` (I-AUROC, I-AP, I-F1max; with masks P-AUROC, P-AP, P-F1max, AUPRO@0.3; at the
calibrated thresholds the image and pixel operating points), ``scores.csv``, ``roc.png``, ``hist.png`` (score
histograms of good and defective images with the threshold), ``grid.png`` (input / reconstruction / heatmap rows),
``report.md`` and ``report.html``: one self-contained file (every image inline) that **opens with the operating
point** (the threshold and where it came from; misses and false rejects as counts and rates; the confusion counts;
the pixel operating point where the data has masks), then the metrics, the plots, per-image overlays (misses and
false rejects first) on the bundle's one map scale (:meth:`glad_runtime.render.MapScale.for_bundle`), the model
checksum and the date. Scores are raw (never min-max normalised over the test set, project decision 3); labels
come from the detector's threshold: the bundle's calibration (what ``glad eval`` passes by default) or an override
(``--threshold``). Without either the report says that there is no operating point.
"""

from __future__ import annotations

import base64
import html
import io
import json
import time
from pathlib import Path

import numpy as np

from glad_runtime.core.images import Preprocessor, even_subset
from glad_runtime.detector import Detector
from glad_runtime.errors import UsageError
from glad_runtime.render import MapScale

from .data import MVTecCategory
from .knn import KnnBaseline
from .metrics import image_metrics, operating_point, pixel_metrics, pixel_operating_point

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
    pre = Preprocessor.from_config(cfg)
    inputs = np.concatenate(list(pre.batches(paths, batch_size)))
    result["glad"] = image_metrics(labels, scores) | {"seconds_per_image": glad_s / len(paths)}
    result["glad"]["adaptive_step_hist"] = {int(k): int(v) for k, v in zip(*np.unique(steps, return_counts=True))}
    if masks is not None:
        result["glad"] |= pixel_metrics(masks, maps)
    log(f"GLAD: {_fmt(result['glad'])}")
    threshold = dets[0].threshold  # one threshold labels every image of a run (the detector's)
    if threshold is not None:
        result["operating_point"] = operating_point(labels, scores, threshold) | {
            "threshold_source": dets[0].threshold_source, "source_detail": _threshold_detail(detector)}
        op = result["operating_point"]
        op["miss_rate"] = _rate(op["misses"], op["TP"] + op["FN"])  # of the defective images
        op["false_reject_rate"] = _rate(op["false_rejects"], op["FP"] + op["TN"])  # of the good images
        log(f"at threshold {threshold:.6g} ({op['threshold_source']}): {op['misses']} misses of "
            f"{op['TP'] + op['FN']} defective, {op['false_rejects']} false rejects of {op['FP'] + op['TN']} good")
    if detector.pixel_threshold is not None:
        result["pixel_threshold"] = {"value": detector.pixel_threshold,
                                     "source": "calibration" if detector.calibration is not None
                                     and detector.calibration.pixel_threshold == detector.pixel_threshold
                                     else "override"}
        if masks is not None:
            result["pixel_operating_point"] = pixel_operating_point(masks, maps, detector.pixel_threshold)

    knn_scores = knn_maps = None
    if baseline == "knn":
        start = time.perf_counter()
        # the baseline reads the images straight at its feature resolution: it needs no VAE, so it is not held to
        # the detector's 128 px (going through 128 px cost it about 0.005 AUROC on ELPV mono)
        knn = KnnBaseline(engines, d, seed=cfg.seed)
        knn.fit(pre.with_resolution(d).batches(cat.train_images(), batch_size))
        knn_scores, knn_maps = [], []
        for batch in tqdm(list(pre.with_resolution(d).batches(paths, batch_size)), desc="eval kNN", unit="batch",
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
        raise UsageError(f"unknown baseline {baseline!r} (supported: knn)")

    with open(out / "scores.csv", "w") as f:
        f.write("path,label,glad_score,adaptive_step" + (",knn_score" if knn_scores is not None else "") + "\n")
        for i, p in enumerate(paths):
            row = f"{p},{labels[i]},{scores[i]:.6f},{steps[i]}"
            f.write(row + (f",{knn_scores[i]:.6f}" if knn_scores is not None else "") + "\n")
    _plot_roc(out / "roc.png", labels, {"GLAD": scores} | ({"kNN": knn_scores} if knn_scores is not None else {}))
    _plot_hist(out / "hist.png", labels, scores, threshold)
    scale = MapScale.for_bundle(detector.calibration, detector.config)
    result["map_scale"] = {"source": scale.source, "vmax": scale.vmax, "threshold": scale.threshold}
    _plot_grid(out / "grid.png", inputs, recons, maps, labels, scores, vmax=scale.vmax)
    result["model_checksum"] = _checksum(detector)
    result["date"] = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    (out / "metrics.json").write_text(json.dumps(result, indent=2, default=float))
    _write_report(out, result, _overlays(detector, paths, labels, dets, scale), scale)
    return result


def _rate(count: int, total: int | None) -> float | None:
    return None if not total else count / total


def _threshold_detail(detector: Detector) -> str:
    """Where the image threshold of ``detector`` came from, in words (the report's first line)."""
    cal = detector.calibration
    if detector.threshold is not None:
        was = f"; the bundle's calibrated threshold is {cal.image_threshold:.6g}" if cal is not None else \
            "; the bundle is uncalibrated"
        return f"override for this run (--threshold){was}"
    if cal is None:
        return ""
    if cal.rule == "normal_quantile":
        fpr = cal.params.get("target_fpr")
        how = f"the {1 - float(fpr):.4g} quantile of the scores of {cal.n_normal} held-out normal images, target " \
            f"false-reject rate {100 * float(fpr):.3g}%" if fpr is not None else \
            f"a quantile of the scores of {cal.n_normal} normal images"
    elif cal.rule == "f1_optimal":
        how = f"F1-optimal on {cal.n_normal} normal and {cal.n_anomalous} defective labelled images"
    else:
        how = f"rule {cal.rule}"
    when = f", {cal.created}" if cal.created else ""
    return f"calibration.json (glad calibrate{when}): {how}"


def _checksum(detector: Detector) -> str | None:
    if detector.bundle is not None:
        return detector.bundle.checksum()
    return detector.calibration.model_checksum if detector.calibration is not None else None


#: Per-image overlays in the HTML report: at most this many of each kind.
OVERLAYS_PER_KIND = 4


def _overlays(detector: Detector, paths: list, labels: np.ndarray, dets: list,
              scale: MapScale | None = None) -> list[tuple[str, str, bytes]]:
    """``(kind, caption, PNG bytes)`` for the report: misses, false rejects, then the highest-scoring defective
    and good images, drawn with :func:`glad_runtime.render.render_detection` on the bundle's one map scale
    (``scale``, default :meth:`MapScale.for_bundle` of the detector's calibration), so a colour means the same
    map value in every overlay. Defect outlines and boxes appear on images labelled anomalous only (the rule of
    :mod:`glad_runtime.render`)."""
    from glad_runtime.core.images import load_image
    from glad_runtime.render import render_detection

    scale = scale or MapScale.for_bundle(detector.calibration, detector.config)
    scores = np.array([d.score for d in dets])
    order = list(np.argsort(-scores))
    kinds = []
    if dets[0].label is not None:
        pred = np.array([d.label == "anomalous" for d in dets])
        kinds += [("miss (defective, passed)", [i for i in order if labels[i] and not pred[i]]),
                  ("false reject (good, rejected)", [i for i in order if not labels[i] and pred[i]])]
    kinds += [("defective, highest scores", [i for i in order if labels[i]]),
              ("good, highest scores", [i for i in order if not labels[i]])]
    shown, out = set(), []
    for kind, idx in kinds:
        for i in [i for i in idx if i not in shown][:OVERLAYS_PER_KIND]:
            shown.add(i)
            buf = io.BytesIO()
            render_detection(dets[i], load_image(paths[i]).rgb, scale).save(buf, format="PNG")
            out.append((kind, Path(paths[i]).name, buf.getvalue()))
    return out


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


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


def _plot_hist(path: Path, labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> None:
    """Histograms of the raw scores of good and defective test images, with the threshold line when labelled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    bins = np.histogram_bin_edges(np.r_[scores, [] if threshold is None else [threshold]], bins=30)
    for lab, name, colour in ((0, "good", "tab:blue"), (1, "defective", "tab:red")):
        if (labels == lab).any():
            ax.hist(scores[labels == lab], bins=bins, alpha=0.6, color=colour,
                    label=f"{name} ({(labels == lab).sum()})")
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", lw=1.2, label=f"threshold {threshold:.4g}")
    ax.set_xlabel("raw image score")
    ax.set_ylabel("images")
    ax.set_title("Scores of the test images")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_grid(path: Path, inputs: np.ndarray, recons: np.ndarray, maps: np.ndarray, labels: np.ndarray,
               scores: np.ndarray, per_class: int = 4, vmax: float | None = None) -> None:
    """Columns: the highest-scoring anomalous and normal test images; rows: input, reconstruction, heatmap.
    ``vmax``: the heatmaps' colour ceiling (the bundle's :class:`MapScale` ``vmax``, as in the overlays); None
    (uncalibrated): the 99.5th percentile of these maps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picks = []
    for lab in (1, 0):
        idx = np.where(labels == lab)[0]
        picks += list(idx[np.argsort(-scores[idx])][:per_class])
    vmax = float(np.percentile(maps, 99.5)) if vmax is None else float(vmax)
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


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _operating_rows(result: dict) -> tuple[list[str], str]:
    """The operating-point section (what the report opens with) as Markdown lines and as HTML: the threshold and
    its source; misses and false rejects as counts and rates; the confusion counts; the pixel operating point
    where the data has masks (else what the pixel threshold is used for)."""
    op = result.get("operating_point")
    if op is None:
        text = ("No operating point: the bundle is uncalibrated (run `glad calibrate`, or pass `--threshold`), so the "
                "images carry raw scores only and no labels.")
        return [text, ""], f"<p class='none'>{html.escape(text)}</p>"
    n_bad, n_good = op["TP"] + op["FN"], op["FP"] + op["TN"]
    source = op.get("source_detail") or op["threshold_source"]
    head = (f"Image threshold {op['threshold']:.6g}, from {source}. An image is rejected (anomalous) when its raw "
            "score is greater.")
    tiles = [("misses", "defective images passed", op["misses"], n_bad, op.get("miss_rate"), "defective"),
             ("false rejects", "good images rejected", op["false_rejects"], n_good, op.get("false_reject_rate"),
              "good")]
    md = [f"**{head}**", "", "| at this threshold | images | rate |", "|---|---|---|"]
    md += [f"| **{name}**: {what} | **{k}** of {n} | **{_pct(r)}** of {kind} |" for name, what, k, n, r, kind in tiles]
    rates = f"precision {_pct(op['precision'])}, recall {_pct(op['recall'])}"
    md += ["", f"Confusion counts ({rates}):", "", "| | predicted anomalous | predicted normal |", "|---|---|---|",
           f"| defective | {op['TP']} | {op['FN']} (misses) |",
           f"| good | {op['FP']} (false rejects) | {op['TN']} |", ""]
    body = (f"<p class='thr'>{html.escape(head)}</p><div class='tiles'>"
            + "".join(f"<div class='tile'><div class='big' style='color:{'#b00' if k else '#070'}'>{k}</div>"
                      f"<div><b>{name}</b>: {what}</div><div><span class='rate'>{_pct(r)}</span> of {n} {kind} "
                      "images</div></div>" for name, what, k, n, r, kind in tiles)
            + f"</div><p>Confusion counts ({html.escape(rates)}):</p>"
            f"<table class='cm'><tr><th></th><th>predicted anomalous</th><th>predicted normal</th></tr>"
            f"<tr><th>defective</th><td>{op['TP']}</td><td class='bad'>{op['FN']} misses</td></tr>"
            f"<tr><th>good</th><td class='bad'>{op['FP']} false rejects</td><td>{op['TN']}</td></tr></table>")
    line = _pixel_line(result)
    if line:
        md += [line, ""]
        body += f"<p>{html.escape(line)}</p>"
    return md, body


def _pixel_line(result: dict) -> str:
    """The pixel operating point in words (masks), or what the pixel threshold does here (no masks), or ""."""
    pt = result.get("pixel_threshold")
    px = result.get("pixel_operating_point")
    if pt is None:
        return "No pixel threshold (calibrated without maps): no defect regions are drawn."
    where = f"pixel threshold {pt['value']:.6g} ({pt['source']})"
    if px is None:
        return (f"No pixel ground truth in this data: the {where} only outlines the defect regions of rejected "
                "images in the overlays.")
    n_bad, n_good = px["TP"] + px["FN"], px["FP"] + px["TN"]
    return (f"Pixel operating point at the {where}: {px['TP']:,} of {n_bad:,} defective pixels flagged (recall "
            f"{_pct(px['recall'])}, {px['FN']:,} missed), {px['FP']:,} of {n_good:,} good pixels flagged "
            f"(false-positive rate {_pct(px['FPR'])}); precision {_pct(px['precision'])}, IoU {_pct(px['IoU'])}, "
            f"F1 {_pct(px['F1'])}.")


def _write_report(out: Path, result: dict, overlays: list[tuple[str, str, bytes]] = (),
                  scale: MapScale | None = None) -> None:
    keys = [k for k in ("I-AUROC", "I-AP", "I-F1max", "P-AUROC", "P-AP", "P-F1max", "AUPRO") if k in result["glad"]]
    rows = [("GLAD", result["glad"])] + ([("kNN baseline", result["knn"])] if "knn" in result else [])
    ident = (f"Model checksum `{result.get('model_checksum') or 'unknown'}`, preset `{result['config']['preset']}`, "
             f"evaluated {result.get('date', '')}.")
    data = (f"Data: `{result['data']}`, {result['test_images']} test images ({result['anomalous']} anomalous). "
            f"{ident}")
    op_md, op_html = _operating_rows(result)
    md = [f"# {result['title']}", "", "## Operating point", "", *op_md, data, "", "## Metrics", "",
          "| method | " + " | ".join(keys) + " | s/image |", "|---" * (len(keys) + 2) + "|"]
    for name, m in rows:
        md.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + f" | {m['seconds_per_image']:.3f} |")
    md += ["", "AUROC, AP, F1max and AUPRO are threshold-free (AUPRO integrates the PRO curve to FPR 0.3 and divides "
           "by 0.3). Scores are raw, never normalised over the test set.", "",
           "![score histograms](hist.png)", "", "![ROC](roc.png)", "",
           "![input / reconstruction / anomaly map](grid.png)",
           "", "The self-contained `report.html` also shows per-image overlays.", ""]
    (out / "report.md").write_text("\n".join(md))

    def img(name: str, alt: str) -> str:
        return f"<img alt='{alt}' src='{_data_uri((out / name).read_bytes())}'>"

    table = "".join(f"<tr><td>{html.escape(n)}</td>" + "".join(f"<td>{m[k]:.4f}</td>" for k in keys)
                    + f"<td>{m['seconds_per_image']:.3f}</td></tr>" for n, m in rows)
    figures = "".join(
        f"<figure><img alt='{html.escape(name)}' src='{_data_uri(png)}'><figcaption>{html.escape(kind)}<br>"
        f"<code>{html.escape(name)}</code></figcaption></figure>" for kind, name, png in overlays)
    scale = scale or MapScale.for_bundle(None)
    which = "pixel" if scale.source == "calibration" else "image"
    colours = (f"One colour scale for every image (the bundle's calibration: 0 to {scale.vmax:.4g}, the {which} "
               f"threshold {scale.threshold:.4g} at mid-bar, marked on each colour bar)" if not scale.per_image else
               "Colours scaled to each image's own maximum (uncalibrated bundle): not comparable across images")
    marks = ("Cyan outlines and numbered red boxes are the defect regions of images labelled anomalous (pixels above "
             "the pixel threshold). Images labelled normal get no outlines or boxes, whatever their hot spots: "
             "those are not defects at this threshold; each caption says how many areas were above the pixel "
             "threshold.")
    style = ("body{font-family:sans-serif;max-width:1200px;margin:1em auto;padding:0 1em;color:#222}"
             "img{max-width:100%}"
             "table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #999;padding:4px 8px;text-align:right}"
             "th{background:#eee}.cm td.bad{color:#b00}figure{display:inline-block;margin:6px;vertical-align:top;"
             "text-align:center;font-size:13px}figure img{max-width:360px;max-height:420px}"
             ".plots img{max-width:48%;margin-right:1%}"
             ".op{border:2px solid #444;border-radius:6px;padding:.2em 1em .6em;background:#fafafa}"
             ".op h2{margin:.4em 0}.thr{font-size:1.1em;font-weight:bold}.none{font-size:1.1em;color:#b00}"
             ".tiles{display:flex;gap:1em;flex-wrap:wrap}.tile{border:1px solid #bbb;border-radius:6px;"
             "padding:.5em 1em;background:#fff;min-width:16em}.tile .big{font-size:2.2em;font-weight:bold}"
             ".tile .rate{font-size:1.3em;font-weight:bold}.meta{color:#555}")
    title = html.escape(result["title"])
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{style}</style></head><body>"
        f"<h1>{title}</h1><section class='op'><h2>Operating point</h2>{op_html}</section>"
        f"<p class='meta'>{html.escape(result['data'])}: {result['test_images']} test images "
        f"({result['anomalous']} anomalous). {html.escape(ident.replace('`', ''))}</p>"
        f"<h2>Metrics</h2><table><tr><th>method</th>" + "".join(f"<th>{k}</th>" for k in keys)
        + f"<th>s/image</th></tr>{table}</table><p>Threshold-free metrics; scores are raw.</p>"
        f"<div class='plots'>{img('hist.png', 'score histograms')}{img('roc.png', 'ROC')}</div>"
        + (f"<h2>Images</h2><p>{html.escape(colours)}. {html.escape(marks)}</p>{figures}" if figures else "")
        + f"<h2>Input, reconstruction, anomaly map</h2>{img('grid.png', 'grid')}</body></html>")
