import numpy as np
import pytest

from glad_runtime.core.schedule import NoiseSchedule, ddim_timesteps, noising_timestep, scaled_linear_alphas_cumprod


def test_alphas_cumprod_closed_form_and_appendix_b():
    a = scaled_linear_alphas_cumprod()
    betas = np.array([(0.00085 ** 0.5 + (0.012 ** 0.5 - 0.00085 ** 0.5) * i / 999) ** 2 for i in range(1000)])
    np.testing.assert_allclose(a, np.cumprod(1 - betas), rtol=1e-12)
    for t, v in {0: 0.9991, 199: 0.7552, 331: 0.5383, 350: 0.5065, 449: 0.3485, 450: 0.3470, 500: 0.2763,
                 600: 0.1608, 721: 0.0705, 750: 0.0562, 850: 0.0233}.items():
        assert a[t] == pytest.approx(v, abs=6e-5), t


@pytest.mark.parametrize("t_max", [450, 500, 600, 750, 850, 999])
@pytest.mark.parametrize("n", [1, 3, 15, 25, "tmax"])
def test_timesteps_match_explicit_formula_and_diffusers(t_max, n):
    from diffusers import DDIMScheduler

    n = t_max if n == "tmax" else n
    ts = ddim_timesteps(t_max, n)
    r = t_max // n
    assert ts.tolist() == [(n - 1 - k) * r + 1 for k in range(n)]
    assert ts[-1] == 1 and np.all(np.diff(ts) < 0)
    # the official hack: the scheduler's num_train_timesteps overwritten with T_max before set_timesteps(n)
    s = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                      set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
    s.register_to_config(num_train_timesteps=t_max)
    s.set_timesteps(n)
    assert ts.tolist() == s.timesteps.tolist()


def test_timestep_examples_and_errors():
    assert ddim_timesteps(750, 25)[:3].tolist() == [721, 691, 661]
    assert ddim_timesteps(450, 15).tolist()[:2] == [421, 391]
    for bad in [(750, 0), (750, 751), (1000, 25), (0, 1)]:
        with pytest.raises(ValueError):
            ddim_timesteps(*bad)


def test_noising_timestep_variants():
    # official: noise at T_max while the first UNet call is at the first listed timestep
    assert noising_timestep(750, 25, "t_max") == 750
    assert ddim_timesteps(750, 25)[0] == 721
    assert noising_timestep(450, 15, "t_max", offset=-1) == 449  # VisA / PCB-Bank randint(T-1, T)
    assert noising_timestep(750, 25, "first_timestep") == 721
    assert noising_timestep(450, 15, "first_timestep") == 421
    with pytest.raises(ValueError):
        noising_timestep(750, 25, "middle")
    s = NoiseSchedule.create(750, 25, noise_at="first_timestep")
    assert s.noise_timestep == s.timesteps[0]


def test_ddim_step_closed_form_and_diffusers():
    import torch
    from diffusers import DDIMScheduler

    rng = np.random.default_rng(0)
    s = NoiseSchedule.create(750, 25)
    x = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    eps = rng.standard_normal((2, 4, 8, 8)).astype(np.float32)
    a = s.alphas_cumprod
    ref = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                        set_alpha_to_one=False, steps_offset=1)
    ref.register_to_config(num_train_timesteps=750)
    ref.set_timesteps(25)
    for t in [721, 331, 31, 1]:
        x0 = s.pred_original_sample(x, eps, t)
        np.testing.assert_allclose(x0, (x - np.sqrt(1 - a[t]) * eps) / np.sqrt(a[t]), rtol=1e-5, atol=1e-5)
        prev = s.ddim_step(x0, eps, t)
        a_prev = a[t - 30] if t - 30 >= 0 else a[0]  # alphas_cumprod[0] for negative previous steps
        np.testing.assert_allclose(prev, np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps, rtol=1e-5, atol=1e-5)
        out = ref.step(torch.from_numpy(eps), t, torch.from_numpy(x), eta=0.0)
        np.testing.assert_allclose(prev, out.prev_sample.numpy(), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(x0, out.pred_original_sample.numpy(), rtol=1e-4, atol=1e-4)


def test_input_anchored_sample_closed_form():
    rng = np.random.default_rng(1)
    s = NoiseSchedule.create(750, 25)
    z0, e0, e = (rng.standard_normal((1, 4, 4, 4)).astype(np.float32) for _ in range(3))
    t = 421
    a = s.alphas_cumprod[t]
    expected = z0 + np.sqrt((1 - a) / a) * (e0 - e)
    np.testing.assert_allclose(s.input_anchored_sample(z0, e0, e, t), expected, rtol=1e-5, atol=1e-5)
    # per-sample timesteps broadcast over the batch
    ts = np.array([721, 31])
    x = rng.standard_normal((2, 4, 4, 4)).astype(np.float32)
    both = s.pred_original_sample(x, np.zeros_like(x), ts)
    np.testing.assert_allclose(both[1], x[1] / np.sqrt(s.alphas_cumprod[31]), rtol=1e-5)
