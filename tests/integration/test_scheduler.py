"""Step-level scheduler: per-image results equal the batch pipeline's and do not depend on tick mates; one UNet
call per tick over images at different steps; bounded queue."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import StubEngines, stub_config

from glad_runtime.pipeline.batch import GladPipeline
from glad_runtime.pipeline.stream import QueueFullError, StepScheduler


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


def _run(engines, cfg, images, max_active, order=None, overlap=False):
    sched = StepScheduler(engines, cfg, max_active=max_active, max_queue=len(images), overlap=overlap)
    order = range(len(images)) if order is None else order
    results = {r.source: r for r in sched.stream((i, images[i]) for i in order)}
    return results, sched


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("num_seeds", [1, 2])
def test_scheduler_equals_pipeline_on_stub(num_seeds, overlap):
    images = _stub_images(7)
    cfg = stub_config(num_seeds=num_seeds)
    cfg = cfg.replace(tau=_split_tau(StubEngines(), cfg, images))
    ref = GladPipeline(StubEngines(), cfg)(images)
    assert len(set(ref.adaptive_steps.tolist())) > 1, "images should decide at different steps"
    res, sched = _run(StubEngines(), cfg, images, max_active=3, overlap=overlap)
    np.testing.assert_allclose([res[i].score for i in range(7)], ref.scores, rtol=1e-5, atol=1e-7)
    assert [res[i].adaptive_step for i in range(7)] == ref.adaptive_steps.tolist()
    assert [res[i].saff_triggered for i in range(7)] == ref.saff_triggered.tolist()
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
    from glad_runtime.pipeline.batch import InvalidInputError

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
    from glad_runtime.core.images import preprocess
    from glad_runtime.engines.ort import OrtEngines

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


# ---------------------------------------------------------------------------------------------- check-cost controls
def _decided_at(cfg, images):
    out = GladPipeline(StubEngines(), cfg)(images)
    return out, out.adaptive_steps.tolist()


@pytest.mark.parametrize("every", [2, 3])
def test_check_every_m_steps(every):
    images = _stub_images(7)
    base = stub_config(min_step=0)  # never forced: undecided images are checked to the end
    base = base.replace(tau=_split_tau(StubEngines(), base, images))
    cfg = base.replace(ads_check_every=every)
    out, steps = _decided_at(cfg, images)
    ts = [int(t) for t in GladPipeline(StubEngines(), cfg).schedule.timesteps]
    allowed = {t for k, t in enumerate(ts) if k % every == 0 or t < cfg.min_step}
    assert set(steps) - {-1} <= allowed
    # the reference loop with an explicit check mask (the official loop, skipping non-due steps) agrees
    eng = StubEngines()
    pipe = GladPipeline(eng, cfg)
    _, tracks, _ = pipe.reconstruct(eng.encode(images), cfg.seed)
    assert [t.adaptive_step for t in tracks] == steps
    # cost: fewer checks than the official every-step loop, and the scheduler gives the same results
    e1, em = StubEngines(), StubEngines()  # never triggered: every step checked vs every m-th
    GladPipeline(e1, base.replace(tau=10.0))(images)
    GladPipeline(em, cfg.replace(tau=10.0))(images)
    n_steps = len(ts)
    assert sum(e1.decode_batches) == 7 * (2 * n_steps + 1)
    assert sum(em.decode_batches) == 7 * (2 * len(range(0, n_steps, every)) + 1)
    res, _ = _run(StubEngines(), cfg, images, max_active=3)
    assert [res[i].adaptive_step for i in range(7)] == steps
    np.testing.assert_allclose([res[i].score for i in range(7)], out.scores, rtol=1e-5, atol=1e-7)


def test_official_batch_checks_cost_more_and_change_nothing():
    images = _stub_images(6)
    cfg = stub_config()
    cfg = cfg.replace(tau=_split_tau(StubEngines(), cfg, images))
    e_ours, e_off = StubEngines(), StubEngines()
    ours = GladPipeline(e_ours, cfg)(images)
    official = GladPipeline(e_off, cfg, check_decided=True)(images)
    np.testing.assert_array_equal(official.adaptive_steps, ours.adaptive_steps)
    np.testing.assert_allclose(official.scores, ours.scores, rtol=1e-6)
    assert sum(e_off.decode_batches) > sum(e_ours.decode_batches)
    # with a check-cost control the official cost mode checks at the same steps, so results still agree
    m2 = cfg.replace(ads_check_every=2)
    np.testing.assert_allclose(GladPipeline(StubEngines(), m2, check_decided=True)(images).scores,
                               GladPipeline(StubEngines(), m2)(images).scores, rtol=1e-6)


def test_reuse_final_decode():
    images = _stub_images(6)
    cfg = stub_config(min_step=0)  # never forced: untriggered images are checked at the last step
    for tau in np.linspace(0.05, 0.5, 46):  # a tau some images never exceed
        steps = GladPipeline(StubEngines(), cfg.replace(tau=float(tau)))(images).adaptive_steps
        if (steps == -1).any() and (steps != -1).any():
            cfg = cfg.replace(tau=float(tau))
            break
    reuse = cfg.replace(ads_reuse_final_decode=True)
    e_ref, e_re = StubEngines(), StubEngines()
    ref = GladPipeline(e_ref, cfg)(images)
    got = GladPipeline(e_re, reuse)(images)
    assert (ref.adaptive_steps == -1).any() and (ref.adaptive_steps != -1).any()
    np.testing.assert_array_equal(got.adaptive_steps, ref.adaptive_steps)
    # untriggered images: reconstruction = decode of the last step's x0_hat (stub decode is the identity)
    pipe = GladPipeline(StubEngines(), cfg)
    z0 = images
    final, tracks, reused = GladPipeline(StubEngines(), reuse).reconstruct(z0, cfg.seed)
    assert sorted(reused) == [i for i, t in enumerate(tracks) if not t.decided]
    s = pipe.schedule
    for i, img in reused.items():  # the last x0_hat differs from the final DDIM latents by the last update only
        np.testing.assert_allclose(img, final[i], atol=0.1)
        assert not np.allclose(img, final[i], atol=1e-7)
    assert sum(e_re.decode_batches) == sum(e_ref.decode_batches) - len(reused)
    assert s.timesteps[-1] == 1
    res, _ = _run(StubEngines(), reuse, images, max_active=4)
    np.testing.assert_allclose([res[i].score for i in range(6)], got.scores, rtol=1e-5, atol=1e-7)


def test_overlap_runs_stages_concurrently_and_costs_one_tick_more():
    """overlap=True: the reference decode of new images and the finishing of done ones run in worker threads while
    the calling thread encodes and denoises (seen from the engine calls' threads); each image takes its steps + 1
    ticks (steps, then finished) instead of its steps, with the same results."""
    import threading

    class Recording(StubEngines):
        def __init__(self):
            super().__init__()
            self.threads = {"encode": set(), "unet": set(), "decode": set()}

        def decode(self, latents):
            self.threads["decode"].add(threading.current_thread().name)
            return super().decode(latents)

        def encode(self, images):
            self.threads["encode"].add(threading.current_thread().name)
            return super().encode(images)

        def unet(self, latents, timesteps):
            self.threads["unet"].add(threading.current_thread().name)
            return super().unet(latents, timesteps)

    images = _stub_images(4)
    cfg = stub_config()
    plain, s0 = _run(StubEngines(), cfg, images, max_active=2)
    eng = Recording()
    over, s1 = _run(eng, cfg, images, max_active=2, overlap=True)
    for i in range(4):
        assert over[i].score == plain[i].score and over[i].adaptive_step == plain[i].adaptive_step
    steps = len(s0.schedule.timesteps)
    assert {d.ticks for d in plain.values()} == {steps} and {d.ticks for d in over.values()} == {steps + 1}
    here = threading.current_thread().name
    assert eng.threads["unet"] == eng.threads["encode"] == {here}
    assert any(n.startswith("glad-tick") for n in eng.threads["decode"])  # the reference and final decodes
