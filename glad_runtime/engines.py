"""The ``Engines`` interface: the four networks behind one small, numpy-in / numpy-out protocol.

The same pipeline runs on PyTorch (reference, ``glad_runtime.torch_engine``), ONNX Runtime (in process) or
Triton (served engines): each backend implements these four calls. All arrays are C-contiguous float32 unless
stated; the batch dimension ``B`` is always first and may be any size >= 1.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

__all__ = ["Engines", "EngineError"]


class EngineError(RuntimeError):
    """A network call failed (backend error, wrong output shape, non-finite output)."""


@runtime_checkable
class Engines(Protocol):
    """The four networks of GLAD.

    * ``encode(images [B,3,H,W] in [-1,1]) -> latents [B,C,h,w]``: VAE encoder, scaled by ``scaling_factor``
      (posterior mean by default, project decision 6).
    * ``unet(latents [B,C,h,w], timesteps int64 [B]) -> noise_pred [B,C,h,w]``: the classifier-free-guided noise
      prediction with the conditioning ("a photo of sks" / "") and guidance scale baked in (decision 7).
      Per-sample ``timesteps`` let images at different steps share one call.
    * ``decode(latents [B,C,h,w]) -> images [B,3,H,W]``: VAE decoder of ``latents / scaling_factor``, roughly in
      [-1, 1], not clamped.
    * ``features(images [B,3,H',W'] in [-1,1]) -> list of [B,H'/p,W'/p,D]``: patch tokens (class and register
      tokens dropped) of each configured layer, pre-final-norm; ImageNet normalisation ``((x+1)/2-mean)/std`` is
      applied inside. The list follows ``GladConfig.feature_layers``.
    """

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def unet(self, latents: np.ndarray, timesteps: np.ndarray) -> np.ndarray: ...

    def decode(self, latents: np.ndarray) -> np.ndarray: ...

    def features(self, images: np.ndarray) -> list[np.ndarray]: ...


def check_output(name: str, array: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Validate a network output: float32, the expected shape, all finite.

    Raises:
        EngineError: naming the network, with the shape or the count of non-finite values.
    """
    array = np.ascontiguousarray(array, dtype=np.float32)
    if array.shape != tuple(shape):
        raise EngineError(f"{name}: output shape {array.shape}, expected {tuple(shape)}")
    bad = ~np.isfinite(array)
    if bad.any():
        raise EngineError(f"{name}: {int(bad.sum())} non-finite values in the output")
    return array
