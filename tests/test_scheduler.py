"""Step-level scheduler: per-image results equal the batch pipeline's and do not depend on tick mates; one UNet
call per tick over images at different steps; bounded queue."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import StubEngines, stub_config

from glad_runtime.pipeline import GladPipeline
from glad_runtime.scheduler import QueueFullError, StepScheduler


def _stub_images(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    base = rng.uniform(-0.5, 0.5, size=(1, 3, 8, 8))
    imgs = np.repeat(base, n, axis=0) + rng.normal(0, 0.02, size=(n, 3, 8, 8))
    for i in range(n):  # defects of different strengths: images decide at different steps
        imgs[i, :, 2:5, 2:5] += 0.15 * i
    return np.clip(imgs, -1, 1).astype(np.float32)


def _split_tau(engines, cfg, images) -> float:
    """A tau that splits the batch: the median first-check ADS score (min_step 0 so the probe decides at once)."""
    probe = GladPipeline(engines, cfg.replace(min_step=0, tau=-1.0))(images)
    return float(np.median(probe.ads_scores))


def _run(engines, cfg, images, max_active, order=None):
    sched = StepScheduler(engines, cfg, max_active=max_active, max_queue=len(images))
    order = range(len(images)) if order is None else order
    results = {r.key: r for r in sched.stream((i, images[i]) for i in order)}
    return results, sched


@pytest.mark.parametrize("num_seeds", [1, 2])
def test_scheduler_equals_pipeline_on_stub(num_seeds):
    images = _stub_images(7)
    cfg = stub_config(num_seeds=num_seeds)
    cfg = cfg.replace(tau=_split_tau(StubEngines(), cfg, images))
    ref = GladPipeline(StubEngines(), cfg)(images)
    assert len(set(ref.adaptive_steps.tolist())) > 1, "images should decide at different steps"
    res, sched = _run(StubEngines(), cfg, images, max_active=3)
    np.testing.assert_allclose([res[i].score for i in range(7)], ref.scores, rtol=1e-5, atol=1e-7)
    assert [res[i].adaptive_step for i in range(7)] == ref.adaptive_steps.tolist()
    assert [res[i].triggered for i in range(7)] == ref.triggered.tolist()
    np.testing.assert_allclose(np.stack([res[i].anomaly_map for i in range(7)]), ref.anomaly_maps, rtol=1e-5,
                               atol=1e-6)
    # images at different steps shared UNet calls: fewer calls than one image at a time
    steps = len(sched.schedule.timesteps) * num_seeds
    assert sched.stats["unet_calls"] < 7 * steps and sched.stats["unet_images"] == 7 * steps


def test_results_do_not_depend_on_tick_mates():
    images = _stub_images(6)
    cfg = stub_config().replace(tau=_split_tau(StubEngines(), stub_config(), images))
    a, _ = _run(StubEngines(), cfg, images, max_active=2)
    b, _ = _run(StubEngines(), cfg, images, max_active=5, order=[5, 3, 1, 0, 2, 4])
    for i in range(6):
        assert a[i].adaptive_step == b[i].adaptive_step
        np.testing.assert_allclose(a[i].anomaly_map, b[i].anomaly_map, rtol=1e-5, atol=1e-6)


def test_bounded_queue_and_bad_input():
    cfg = stub_config()
    sched = StepScheduler(StubEngines(), cfg, max_active=1, max_queue=2)
    imgs = _stub_images(3)
    from glad_runtime.pipeline import InvalidInputError

    with pytest.raises(InvalidInputError):
        sched.submit(np.full((3, 8, 8), np.nan, np.float32))
    sched.submit(imgs[0])
    sched.submit(imgs[1])
    with pytest.raises(QueueFullError):
        sched.submit(imgs[2])
    assert sched.pending == 2
    assert len(list(sched.drain())) == 2 and sched.pending == 0
    with pytest.raises(ValueError):
        StepScheduler(StubEngines(), cfg, max_active=0)


def test_scheduler_equals_pipeline_on_ort_real_images(exported_bundle, elpv_images):
    """Real graphs (ONNX Runtime) on real cells, ADS on with tau splitting the decisions."""
    from glad_runtime.images import preprocess
    from glad_runtime.ort_engine import OrtEngines

    b = exported_bundle[0]
    good, bad = elpv_images
    imgs = np.stack([preprocess(np.repeat(i[..., None] / 255.0, 3, -1).astype(np.float32), b.config.resolution)
                     for i in (good[0], bad[0], good[1], bad[1])])
    eng = OrtEngines(b)
    cfg = b.config.replace(tau=_split_tau(eng, b.config, imgs))
    ref = GladPipeline(eng, cfg)(imgs)
    res, _ = _run(eng, cfg, imgs, max_active=3)
    assert [res[i].adaptive_step for i in range(4)] == ref.adaptive_steps.tolist()
    np.testing.assert_allclose([res[i].score for i in range(4)], ref.scores, rtol=1e-4)
