"""ADS and SAFF on stub engines whose outputs are known, against a plain per-sample reference of spec 2.2/3."""

import numpy as np
import pytest

from glad_runtime.core.ads import ads_decision, raw_feature_input, saff_fuse, saff_mask
from glad_runtime.pipeline.batch import GladPipeline
from glad_runtime.core.schedule import scaled_linear_alphas_cumprod

from conftest import StubEngines, stub_config


def _images():
    """Two 8x8 images: one smooth (normal-like), one with a strong local blob (anomalous-like)."""
    yy, xx = np.mgrid[0:8, 0:8] / 7.0
    smooth = np.stack([xx * 0.2, yy * 0.2, (xx + yy) * 0.1]) - 0.1
    blob = smooth.copy()
    blob[:, 2:5, 3:6] = [[[0.9]], [[-0.9]], [[0.8]]]
    return np.stack([smooth, blob]).astype(np.float32)


def reference_loop(engines, image, cfg, eps0):
    """Spec 2.3 for ONE image, written plainly from the formulas (independent of the pipeline code)."""
    a = scaled_linear_alphas_cumprod()
    r = cfg.t_max // cfg.num_inference_steps
    ts = [(cfg.num_inference_steps - 1 - k) * r + 1 for k in range(cfg.num_inference_steps)]
    z0 = engines.encode(image[None])[0]
    tn = cfg.t_max
    x = np.sqrt(a[tn]) * z0 + np.sqrt(1 - a[tn]) * eps0
    decided, step, fused_at = False, -1, None
    for t in ts:
        eps = engines.unet(x[None].astype(np.float32), np.array([t]))[0]
        x0 = (x - np.sqrt(1 - a[t]) * eps) / np.sqrt(a[t])
        if not decided:
            xt_true = np.sqrt(a[t]) * z0 + np.sqrt(1 - a[t]) * eps0
            x0a = (xt_true - np.sqrt(1 - a[t]) * eps) / np.sqrt(a[t])
            # DINO on raw [-1, 1] decodes: the stub normalises inside, so undo it exactly as the pipeline does
            fm = engines.features(raw_feature_input(x0[None].astype(np.float32)))[0][0].reshape(-1, 4)
            fa = engines.features(raw_feature_input(x0a[None].astype(np.float32)))[0][0].reshape(-1, 4)
            fm = fm / np.linalg.norm(fm, axis=1, keepdims=True)
            fa = fa / np.linalg.norm(fa, axis=1, keepdims=True)
            dist = np.array([min(1 - fa[i] @ fm[j] for j in range(len(fm))) for i in range(len(fa))])
            s = np.sort(dist)[::-1][:cfg.ads_top_k].mean()
            if s > cfg.tau:
                m = 1 / (1 + np.exp(-dist.reshape(1, 8, 8)))
                x0 = m * x0 + (1 - m) * x0a
                decided, step, fused_at = True, t, "saff"
            elif t < cfg.min_step:
                x0 = x0a
                decided, step, fused_at = True, t, "forced"
        prev = t - r
        ap = a[prev] if prev >= 0 else a[0]
        x = np.sqrt(ap) * x0 + np.sqrt(1 - ap) * eps
    return x, step, fused_at


@pytest.mark.parametrize("tau", [-1.0, 0.002, 0.02, 10.0])
def test_pipeline_matches_reference_loop(tau):
    cfg = stub_config(tau=tau)
    eng = StubEngines()
    pipe = GladPipeline(eng, cfg)
    images = _images()
    z0 = eng.encode(images)
    eps0 = pipe.noise(1, cfg.seed)[0]
    final, tracks, _ = pipe.reconstruct(z0, cfg.seed)
    for i in range(2):
        x_ref, step_ref, kind = reference_loop(StubEngines(), images[i], cfg, eps0)
        assert tracks[i].adaptive_step == step_ref
        assert tracks[i].triggered == (kind == "saff")
        np.testing.assert_allclose(final[i], x_ref, rtol=1e-4, atol=1e-4)


def test_decision_steps_extremes():
    ts = [251, 201, 151, 101, 51, 1]
    # tau below every score: decided (SAFF) at the first timestep
    _, tracks, _ = GladPipeline(StubEngines(), stub_config(tau=-1.0)).reconstruct(_images(), 0)
    assert [t.adaptive_step for t in tracks] == [ts[0], ts[0]] and all(t.triggered for t in tracks)
    # tau above every score: forced at the first timestep below min_step (150 -> 101)
    _, tracks, _ = GladPipeline(StubEngines(), stub_config(tau=10.0)).reconstruct(_images(), 0)
    assert [t.adaptive_step for t in tracks] == [101, 101] and not any(t.triggered for t in tracks)


def test_decode_work_only_for_undecided():
    """Once decided, a sample costs no more ADS decodes: batch sizes of the ADS decodes shrink."""
    cfg = stub_config(tau=0.02)
    eng = StubEngines()
    _, tracks, _ = GladPipeline(eng, cfg).reconstruct(_images(), 0)
    steps = sorted(t.adaptive_step for t in tracks)
    assert steps[0] != steps[1], "the test needs the two images to decide at different steps"
    # each ADS decode holds both estimates (x0 and x~0) of every undecided image
    sizes = eng.decode_batches
    assert sizes[0] == 4 and 2 in sizes and sizes == sorted(sizes, reverse=True)
    n_checks = [t for t in [251, 201, 151, 101] if t >= min(steps)]
    assert len(sizes) == len(n_checks)


def test_ads_disabled_is_plain_ddim():
    cfg = stub_config(ads_enabled=False)
    eng = StubEngines()
    _, tracks, _ = GladPipeline(eng, cfg).reconstruct(_images(), 0)
    assert all(t.adaptive_step == -1 for t in tracks) and eng.calls["features"] == 0


def test_ads_decision_rule():
    trig, forced = ads_decision(np.array([0.5, 0.1, 0.1]), t=301, tau=0.3, min_step=350)
    assert trig.tolist() == [True, False, False] and forced.tolist() == [False, True, True]
    trig, forced = ads_decision(np.array([0.5, 0.1]), t=361, tau=0.3, min_step=350)
    assert trig.tolist() == [True, False] and forced.tolist() == [False, False]
    from glad_runtime.engines import EngineError

    with pytest.raises(EngineError):
        ads_decision(np.array([np.nan]), 1, 0.3, 350)


def test_saff_mask_and_fuse():
    d = np.zeros((1, 4, 4), np.float32)
    d[0, 1, 1] = 2.0
    m = saff_mask(d, (4, 4))
    assert m.shape == (1, 1, 4, 4)
    assert m[0, 0, 0, 0] == pytest.approx(0.5) and m[0, 0, 1, 1] == pytest.approx(1 / (1 + np.exp(-2)))
    # resized when the feature grid differs from the latent grid (patch-14 extractors)
    assert saff_mask(d, (8, 8)).shape == (1, 1, 8, 8)
    x0, xa = np.ones((1, 4, 4, 4), np.float32), np.zeros((1, 4, 4, 4), np.float32)
    fused = saff_fuse(x0, xa, m)
    np.testing.assert_allclose(fused[0, 2], m[0, 0])  # broadcast over the 4 latent channels


def test_raw_feature_input_inverts_imagenet_normalisation():
    x = np.random.default_rng(0).uniform(-1, 1, (2, 3, 4, 4)).astype(np.float32)
    mean = np.array([0.485, 0.456, 0.406])[:, None, None]
    std = np.array([0.229, 0.224, 0.225])[:, None, None]
    seen = ((raw_feature_input(x) + 1) / 2 - mean) / std
    np.testing.assert_allclose(seen, x, atol=1e-5)
