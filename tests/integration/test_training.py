"""ATP training smoke test on real images, the loss target's closed form, checkpoint reload, eval and report."""

import json

import numpy as np
import pytest
import torch

from glad_runtime.core.schedule import scaled_linear_alphas_cumprod
from training.atp import TrainConfig, atp_target


def test_atp_target_closed_form():
    """Target (A): the x0 formula applied to (x_t, target) gives back the NORMAL latent z_n (spec 4.1)."""
    g = torch.Generator().manual_seed(0)
    zn, za, eps = (torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64) for _ in range(3))
    a_all = torch.from_numpy(scaled_linear_alphas_cumprod())
    t = torch.tensor([0, 1, 100, 500, 900, 999])
    a, lam = a_all[t], t.double() / 1000
    target = atp_target(eps, zn, za, a, lam).double()
    av, lv = a.view(-1, 1, 1, 1), lam.view(-1, 1, 1, 1)
    zs = lv * za + (1 - lv) * zn
    xt = av.sqrt() * zs + (1 - av).sqrt() * eps
    np.testing.assert_allclose(target.numpy(), ((xt - av.sqrt() * zn) / (1 - av).sqrt()).numpy(), atol=1e-5)
    x0 = (xt - (1 - av).sqrt() * target) / av.sqrt()
    np.testing.assert_allclose(x0.numpy(), zn.numpy(), atol=1e-4)
    # untouched pairs (z_a == z_n): plain DDPM epsilon target
    np.testing.assert_allclose(atp_target(eps, zn, zn, a, lam).numpy(), eps.float().numpy(), atol=1e-6)


@pytest.fixture(scope="module")
def small_category(tmp_path_factory, elpv_images):
    from PIL import Image

    good, bad = elpv_images
    root = tmp_path_factory.mktemp("cat") / "elpv_small"
    for sub, imgs in (("train/good", good[:3]), ("test/good", good[3:]), ("test/defect", bad[:2])):
        (root / sub).mkdir(parents=True)
        for i, im in enumerate(imgs):
            Image.fromarray(im).save(root / sub / f"{i:03d}.png")
    return root


def test_train_smoke_and_checkpoint_reload(small_category, tmp_path):
    from export.models import load_bundle_modules
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset
    from glad_runtime.engines.pytorch import TorchEngines
    from training.atp import train_bundle

    cfg = TrainConfig(vae_steps=3, vae_batch=2, unet_steps=4, unet_batch=4, variants=2, checkpoint_every=2)
    out = tmp_path / "bundle"
    b = train_bundle(small_category, out, get_preset("tiny"), cfg, features="random", progress=False,
                     log=lambda *_: None)
    stats = json.loads((out / "training.json").read_text())["stats"]
    assert stats["pairs"] == 6 and np.isfinite(stats["unet_loss_last100"])
    assert b.config.scaling_factor > 0 and b.config.scaling_factor != 1.0  # 1 / std of the trained VAE latents
    assert (out / "checkpoints" / "unet_last.pt").is_file() and (out / "checkpoints" / "vae_last.pt").is_file()
    # the bundle reloads to identical outputs
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 128, 128)).astype(np.float32)
    e1 = TorchEngines(load_bundle_modules(Bundle(out)))
    e2 = TorchEngines(load_bundle_modules(Bundle(out)))
    z = e1.encode(x)
    np.testing.assert_array_equal(z, e2.encode(x))
    np.testing.assert_array_equal(e1.unet(z, np.array([100, 200])), e2.unet(z, np.array([100, 200])))
    # resume: a finished run continues at its last step and trains nothing more
    state = torch.load(out / "checkpoints" / "unet_last.pt", weights_only=False)
    assert state["step"] == 4


def test_knn_baseline_separates_planted_outlier(tiny_modules):
    from glad_runtime.engines.pytorch import TorchEngines
    from training.knn import KnnBaseline

    eng = TorchEngines(tiny_modules)
    rng = np.random.default_rng(0)
    base = np.tile(np.linspace(-0.5, 0.5, 128, dtype=np.float32), (3, 128, 1))
    train = np.stack([base + 0.01 * rng.standard_normal(base.shape).astype(np.float32) for _ in range(4)])
    test = train[:2].copy()
    test[1, :, 40:80, 40:80] = 0.9
    knn = KnnBaseline(eng, 224).fit([train])
    scores, maps = knn.score(test)
    assert scores[1] > scores[0] and maps.shape == (2, 224, 224)
    peak = np.unravel_index(np.argmax(maps[1]), maps[1].shape)
    assert 50 <= peak[0] <= 160 and 50 <= peak[1] <= 160  # the planted square (40..80 of 128 -> 70..140 of 224)


def test_eval_report(small_category, tiny_bundle, tmp_path):
    import base64
    import re
    import shutil
    from conftest import html_image_sources

    from PIL import Image

    from export.models import load_bundle_modules
    from glad_runtime.detector import Detector
    from glad_runtime.engines.pytorch import TorchEngines
    from training.evaluate import evaluate

    eng = TorchEngines(load_bundle_modules(tiny_bundle))
    res = evaluate(Detector(eng, tiny_bundle.config), small_category, tmp_path / "raw", baseline="knn",
                   batch_size=4, progress=False, log=lambda *_: None)
    assert set(res["glad"]) >= {"I-AUROC", "I-AP", "I-F1max"} and "P-AUROC" not in res["glad"]
    assert 0 <= res["knn"]["I-AUROC"] <= 1 and "operating_point" not in res
    for f in ("metrics.json", "report.md", "report.html", "roc.png", "hist.png", "grid.png", "scores.csv"):
        assert (tmp_path / "raw" / f).is_file(), f
    md = (tmp_path / "raw" / "report.md").read_text()
    assert "kNN baseline" in md and "uncalibrated" in md

    # with ground-truth masks and a threshold: the operating point, counted here from the scores themselves
    cat = tmp_path / "cat"
    shutil.copytree(small_category, cat)
    for p in sorted((cat / "test" / "defect").glob("*.png")):
        w, h = Image.open(p).size
        m = np.zeros((h, w), np.uint8)
        m[h // 4:h // 2, w // 4:w // 2] = 255
        (cat / "ground_truth" / "defect").mkdir(parents=True, exist_ok=True)
        Image.fromarray(m).save(cat / "ground_truth" / "defect" / f"{p.stem}_mask.png")
    rows = [r.split(",") for r in (tmp_path / "raw" / "scores.csv").read_text().splitlines()[1:]]
    truth, scores = np.array([int(r[1]) for r in rows], bool), np.array([float(r[2]) for r in rows])
    t = float(np.sort(scores)[:2].mean())  # between two scores: 6-decimal rounding in scores.csv cannot flip one
    out = tmp_path / "labelled"
    res = evaluate(Detector(eng, tiny_bundle.config, threshold=t, bundle=tiny_bundle,
                                      pixel_threshold=0.05), cat, out, baseline=None,
                   batch_size=4, progress=False, log=lambda *_: None)
    op, pred = res["operating_point"], scores > t
    assert (op["misses"], op["false_rejects"]) == (int((truth & ~pred).sum()), int((~truth & pred).sum()))
    assert op["threshold_source"] == "override" and "P-AUROC" in res["glad"]
    px = res["pixel_operating_point"]
    assert px["pixel_threshold"] == 0.05 and px["TP"] + px["FN"] > 0
    page = (out / "report.html").read_text()

    srcs = html_image_sources(page)
    assert len(srcs) == 3 + len(rows)  # hist, roc, grid and one overlay per test image (<= 4 per kind)
    for src in srcs:  # self-contained: every image inline and a valid PNG
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:4] == b"\x89PNG"
    assert f"{op['misses']} misses" in page and tiny_bundle.checksum() in page
    assert re.search(r"evaluated \d{4}-\d\d-\d\d", page)


def test_train_defaults_per_architecture():
    sd = TrainConfig.for_architecture("sd14-dino-vitb8")
    assert (sd.unet_lr, sd.weight_decay, sd.unet_batch, sd.grad_clip, sd.vae_steps) == (5e-6, 1e-2, 32, 1.0, 0)
    assert TrainConfig.for_architecture("tiny", unet_steps=7).unet_steps == 7
