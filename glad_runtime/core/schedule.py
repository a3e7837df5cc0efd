"""Noise schedule and DDIM math (numpy only).

Plain math, separate from any model (the diffusers convention). Everything follows the official GLAD code as
described in ``shared/reference/glad-spec.md`` sections 1, 2.3 and 10.1:

* scaled-linear betas from 0.00085 to 0.012 over 1000 training steps, ``alphas_cumprod`` of length 1000;
* the DDIM timestep list computed explicitly (project decision 5): stride ``r = T_max // n`` and offset +1, i.e.
  ``[(n-1-k)*r + 1 for k in range(n)]`` (for T_max=750, n=25: 721, 691, ..., 31, 1);
* the DDIM eta=0 update with ``alphas_cumprod[0]`` whenever the previous timestep is negative
  (``set_alpha_to_one=False``), no clipping of ``pred_original_sample``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from glad_runtime.errors import UsageError

__all__ = [
    "NoiseSchedule",
    "scaled_linear_alphas_cumprod",
    "ddim_timesteps",
    "noising_timestep",
]


def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 num_train_timesteps: int = 1000) -> np.ndarray:
    """Cumulative product of alphas for the Stable Diffusion "scaled_linear" schedule.

    ``betas = linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2`` and ``alphas_cumprod = cumprod(1 - betas)``,
    computed in float64 (diffusers computes the betas in float32; the difference is below 1e-7).

    Returns:
        float64 array of shape ``[num_train_timesteps]``, values in (0, 1), strictly decreasing.
        For the SD v1 schedule, ``alphas_cumprod[750] ~= 0.0562`` (spec Appendix B).

    Raises:
        UsageError: for non-positive betas, ``beta_end <= beta_start`` or fewer than 2 timesteps.
    """
    if num_train_timesteps < 2:
        raise UsageError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
    if not (0 < beta_start < beta_end < 1):
        raise UsageError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
    betas = np.linspace(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps, dtype=np.float64) ** 2
    return np.cumprod(1.0 - betas)


def ddim_timesteps(t_max: int, num_inference_steps: int) -> np.ndarray:
    """The official GLAD DDIM timestep list ("leading" spacing over ``t_max`` with offset +1).

    The official code sets ``scheduler.config.num_train_timesteps = T_max`` before ``set_timesteps(n)``
    (spec section 1, "DDIM stride"); this is the explicit equivalent: stride ``r = t_max // n``,
    timesteps ``[(n-1-k)*r + 1 for k in range(n)]``, descending.

    Args:
        t_max: maximum denoising step ``T_max`` (``denoise_step``), 1 <= t_max <= 999.
        num_inference_steps: number of DDIM steps ``n``, 1 <= n <= t_max.

    Returns:
        int64 array of shape ``[n]``, strictly descending, last element 1.

    Raises:
        UsageError: when ``n`` is not in [1, t_max] or ``t_max`` is outside [1, 999].
    """
    if not 1 <= t_max <= 999:
        raise UsageError(f"t_max must be in [1, 999], got {t_max}")
    if not 1 <= num_inference_steps <= t_max:
        raise UsageError(f"num_inference_steps must be in [1, t_max={t_max}], got {num_inference_steps}")
    stride = t_max // num_inference_steps
    return (np.arange(num_inference_steps - 1, -1, -1, dtype=np.int64) * stride + 1)


def noising_timestep(t_max: int, num_inference_steps: int, noise_at: str = "t_max", offset: int = 0) -> int:
    """The timestep the input latent is noised to before the DDIM loop.

    * ``noise_at="t_max"`` (official, project default): noise at ``T_max + offset`` (offset is -1 for the
      VisA / PCB-Bank presets, whose code draws ``randint(T-1, T)``), while the first UNet call is at the first
      listed timestep (e.g. noised at 750, first call at 721: the mismatch is in the official code, spec 2.3).
    * ``noise_at="first_timestep"``: noise exactly at the first listed DDIM timestep, so noise level and first
      UNet timestep agree.

    Raises:
        UsageError: unknown ``noise_at`` or a result outside [0, 999].
    """
    if noise_at == "t_max":
        t = t_max + offset
    elif noise_at == "first_timestep":
        t = int(ddim_timesteps(t_max, num_inference_steps)[0])
    else:
        raise UsageError(f"noise_at must be 't_max' or 'first_timestep', got {noise_at!r}")
    if not 0 <= t <= 999:
        raise UsageError(f"noising timestep {t} outside [0, 999]")
    return t


@dataclass(frozen=True)
class NoiseSchedule:
    """The DDIM schedule used at test time: ``alphas_cumprod`` plus the per-image timestep list.

    Attributes:
        alphas_cumprod: float64 ``[num_train_timesteps]``.
        timesteps: int64 ``[n]``, descending (see :func:`ddim_timesteps`).
        stride: ``t_max // n``; the previous timestep of ``t`` is ``t - stride``.
        noise_timestep: timestep the input latent is noised to (see :func:`noising_timestep`).
    """

    alphas_cumprod: np.ndarray
    timesteps: np.ndarray
    stride: int
    noise_timestep: int

    @classmethod
    def create(cls, t_max: int, num_inference_steps: int, *, beta_start: float = 0.00085, beta_end: float = 0.012,
               num_train_timesteps: int = 1000, noise_at: str = "t_max", noise_offset: int = 0) -> "NoiseSchedule":
        """Build the schedule from the config values (spec section 1)."""
        return cls(
            alphas_cumprod=scaled_linear_alphas_cumprod(beta_start, beta_end, num_train_timesteps),
            timesteps=ddim_timesteps(t_max, num_inference_steps),
            stride=t_max // num_inference_steps,
            noise_timestep=noising_timestep(t_max, num_inference_steps, noise_at, noise_offset),
        )

    def alpha_prod(self, t: int | np.ndarray) -> np.ndarray:
        """``alphas_cumprod[t]`` with ``alphas_cumprod[0]`` for negative ``t`` (``set_alpha_to_one=False``).

        Accepts a scalar or an int array of any shape; returns float64 of the same shape.
        """
        t = np.asarray(t, dtype=np.int64)
        return self.alphas_cumprod[np.where(t >= 0, t, 0)]

    def add_noise(self, latents: np.ndarray, noise: np.ndarray, t: int | np.ndarray) -> np.ndarray:
        """Forward diffusion ``x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps`` (diffusers ``add_noise``).

        Args:
            latents, noise: float32 ``[B, C, h, w]``.
            t: scalar or int ``[B]`` timesteps.
        Returns:
            float32 ``[B, C, h, w]``.
        """
        a = _bcast(self.alpha_prod(t), latents.ndim)
        return (np.sqrt(a) * latents + np.sqrt(1.0 - a) * noise).astype(np.float32)

    def pred_original_sample(self, sample: np.ndarray, noise_pred: np.ndarray, t: int | np.ndarray) -> np.ndarray:
        """Model x0 estimate ``(x_t - sqrt(1 - a_t) * eps_theta) / sqrt(a_t)`` (spec 2.1 item 1), float32."""
        a = _bcast(self.alpha_prod(t), sample.ndim)
        return ((sample - np.sqrt(1.0 - a) * noise_pred) / np.sqrt(a)).astype(np.float32)

    def input_anchored_sample(self, latents: np.ndarray, noise: np.ndarray, noise_pred: np.ndarray,
                              t: int | np.ndarray) -> np.ndarray:
        """Input-anchored x0 estimate (spec 2.1 item 2, the official ``pred_true_sample``).

        The clean input latent ``z0`` re-noised to ``t`` with the same noise ``eps0`` used for the initial
        noising, then denoised with the model's ``eps_theta``::

            x~0 = (sqrt(a_t) z0 + sqrt(1 - a_t) eps0 - sqrt(1 - a_t) eps_theta) / sqrt(a_t)

        Args:
            latents: clean input latents ``z0`` float32 ``[B, C, h, w]``.
            noise: ``eps0`` float32 ``[B, C, h, w]``.
            noise_pred: ``eps_theta`` float32 ``[B, C, h, w]``.
            t: scalar or int ``[B]``.
        """
        return self.pred_original_sample(self.add_noise(latents, noise, t), noise_pred, t)

    def ddim_step(self, pred_original_sample: np.ndarray, noise_pred: np.ndarray,
                  t: int | np.ndarray) -> np.ndarray:
        """DDIM eta=0 update to the previous timestep ``t - stride`` (spec 2.3 step 7d).

        ``x_prev = sqrt(a_prev) * x0_hat + sqrt(1 - a_prev) * eps_theta``; the direction term keeps the raw
        (guided) ``eps_theta``, not one re-derived from a fused ``x0_hat``. ``a_prev = alphas_cumprod[0]`` when
        ``t - stride < 0``.

        Returns:
            float32, the shape of ``pred_original_sample``.
        """
        a_prev = _bcast(self.alpha_prod(np.asarray(t) - self.stride), pred_original_sample.ndim)
        return (np.sqrt(a_prev) * pred_original_sample + np.sqrt(1.0 - a_prev) * noise_pred).astype(np.float32)


def _bcast(a: np.ndarray, ndim: int) -> np.ndarray:
    """Reshape a scalar or ``[B]`` array so it broadcasts over ``[B, ...]`` with ``ndim`` dimensions."""
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(a.shape + (1,) * (ndim - a.ndim)) if a.ndim else a
