"""The ``Engines`` interface: the four networks behind one small, numpy-in / numpy-out protocol.

The same pipeline runs on PyTorch (reference, ``glad_runtime.engines.pytorch``), ONNX Runtime (in process) or
Triton (served engines): each backend implements these four calls. All arrays are C-contiguous float32 unless
stated; the batch dimension ``B`` is always first and may be any size >= 1.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
from glad_runtime.errors import EngineError  # noqa: F401 (re-exported)

__all__ = ["Engines", "EngineError", "GraphEngines", "check_output", "network_graphs", "exported_graphs",
           "ads_check_signature"]


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

    Optional: ``ads_distance(pred_original_sample [U,C,h,w], input_anchored [U,C,h,w], config) -> [U,g,g] | None``,
    the whole network part of an ADS check fused on the engine's device (``TorchEngines``; the ``ads_check`` graph of
    the graph backends); the pipeline uses it when present and not None, and otherwise composes ``decode`` and
    ``features`` on the host.
    """

    def encode(self, images: np.ndarray) -> np.ndarray: ...

    def unet(self, latents: np.ndarray, timesteps: np.ndarray) -> np.ndarray: ...

    def decode(self, latents: np.ndarray) -> np.ndarray: ...

    def features(self, images: np.ndarray) -> list[np.ndarray]: ...


def network_graphs(config, dino_ads_present: bool = False) -> list[str]:
    """The network graphs a backend needs for ``config`` (one place for every backend and the model repository):
    ``unet``, ``vae_encoder``, ``vae_decoder``, ``dino``, and ``dino_ads`` when the ADS check runs at another size
    than scoring and either ADS is on or the backend has that graph (so ADS can be switched on later). The fused
    ``ads_check`` graph is optional and each backend decides whether it loads it."""
    names = ["unet", "vae_encoder", "vae_decoder", "dino"]
    if config.ads_size != config.dino_resolution and (config.ads_enabled or dino_ads_present):
        names.append("dino_ads")
    return names


def exported_graphs(config) -> list[str]:
    """The graphs exported for a config: ``dino_ads`` whenever the ADS check runs at another size than scoring
    (also with ADS off, so ADS can be switched on at run time without re-exporting), and ``ads_check``, the whole
    network part of an ADS check in one graph (``export.models.AdsCheck``: two decodes, the ADS layer's tokens and
    the nearest-neighbour distance map; it repeats the decoder and ViT weights so that only the map leaves the
    device)."""
    names = ["unet", "vae_encoder", "vae_decoder", "dino"]
    if config.ads_size != config.dino_resolution:
        names.append("dino_ads")
    names.append("ads_check")
    return names


def ads_check_signature(config) -> tuple:
    """The config fields a fused ADS check (``ads_check`` graph, ``export.models.AdsCheck``) is built from: image
    resolution, ADS size, patch size, the ADS layer and its input normalisation. A check made for one signature
    serves only configs with the same one."""
    return (config.resolution, config.ads_size, config.patch_size, config.feature_layers[config.ads_layer],
            config.ads_imagenet_norm)


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


class GraphEngines:
    """The :class:`Engines` calls over named graphs with fixed I/O names, shared by the graph backends (ONNX
    Runtime, Triton, TensorRT): each implements only ``_run_graph(graph, feeds, outputs) -> list of arrays`` and
    sets ``config`` and the feature graphs (:meth:`_init_feature_graphs`).

    Graph I/O (``export.onnx_export``): ``vae_encoder(images) -> latents``, ``unet(latents, timesteps int64) ->
    noise_pred``, ``vae_decoder(latents) -> images``, ``dino`` / ``dino_ads(images) -> tokens_<layer>``. Every output
    is checked (:func:`check_output`: float32, expected shape, finite) and failures raise :class:`EngineError`.
    """

    config = None  # GladConfig, set by the subclass
    _kind = "graph"

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        raise NotImplementedError

    def _init_feature_graphs(self, loaded) -> None:
        """Map image size -> feature graph: ``dino`` at ``dino_resolution``, ``dino_ads`` at the ADS size if loaded."""
        c = self.config
        self._feature_graphs = {c.dino_resolution: "dino"}
        if "dino_ads" in loaded:
            self._feature_graphs[c.ads_size] = "dino_ads"
        self._token_names = [f"tokens_{layer}" for layer in c.feature_layers]
        self._ads_check_loaded = "ads_check" in loaded

    def encode(self, images: np.ndarray) -> np.ndarray:
        """``images f32 [B,3,H,W]`` in [-1,1] -> scaled latents ``[B,C,h,w]``."""
        c = self.config
        out = self._run_graph("vae_encoder", {"images": np.asarray(images, np.float32)}, ["latents"])[0]
        return check_output("vae_encoder", out, (len(images), c.latent_channels, c.latent_size, c.latent_size))

    def unet(self, latents: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
        """Guided ``noise_pred [B,C,h,w]`` at int64 ``timesteps [B]`` (per-sample)."""
        latents = np.asarray(latents, np.float32)
        ts = np.ascontiguousarray(np.broadcast_to(np.asarray(timesteps, np.int64), (len(latents),)))
        out = self._run_graph("unet", {"latents": latents, "timesteps": ts}, ["noise_pred"])[0]
        return check_output("unet", out, latents.shape)

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """Scaled latents ``[B,C,h,w]`` -> images ``[B,3,H,W]``."""
        r = self.config.resolution
        out = self._run_graph("vae_decoder", {"latents": np.asarray(latents, np.float32)}, ["images"])[0]
        return check_output("vae_decoder", out, (len(latents), 3, r, r))

    def features(self, images: np.ndarray) -> list[np.ndarray]:
        """Patch tokens ``[B,S/p,S/p,D]`` per configured layer, for images at a size with a feature graph.

        Raises:
            EngineError: the image size has no feature graph (the sizes available are named).
        """
        images = np.asarray(images, np.float32)
        size = images.shape[-1]
        graph = self._feature_graphs.get(size)
        if graph is None or images.shape[-2] != size:
            raise EngineError(f"features: no {self._kind} for {images.shape[-2]}x{size} images; available sizes "
                              f"{sorted(self._feature_graphs)} (re-export after changing dino/ads resolution)")
        outs = self._run_graph(graph, {"images": images}, self._token_names)
        g = size // self.config.patch_size
        return [check_output(f"{graph}:{name}", o, (len(images), g, g, o.shape[-1]))
                for name, o in zip(self._token_names, outs)]

    def ads_distance(self, pred_original_sample: np.ndarray, input_anchored: np.ndarray, config
                     ) -> np.ndarray | None:
        """The fused ADS check through the ``ads_check`` graph (``export.models.AdsCheck``): float32 latents
        ``[U,C,h,w]`` twice -> distance map ``[U,g,g]`` in [0, 2].

        Returns None (the pipeline then checks on the host) when the graph is not loaded or ``config`` asks for
        other ADS settings than the graph was exported with (:func:`ads_check_signature`).
        """
        c = self.config
        if not (getattr(self, "_ads_check_loaded", False) and ads_check_signature(config) == ads_check_signature(c)):
            return None
        feeds = {"pred_original_sample": np.asarray(pred_original_sample, np.float32),
                 "input_anchored": np.asarray(input_anchored, np.float32)}
        out = self._run_graph("ads_check", feeds, ["distance"])[0]
        g = c.ads_size // c.patch_size
        return check_output("ads_check", out, (len(pred_original_sample), g, g))
