"""Engines: one interface (:mod:`.base`), a registry (:func:`load_engines`), one module per backend.

* :mod:`.base`: the :class:`Engines` protocol, :class:`GraphEngines` (the calls over named graphs shared by the
  graph backends), :func:`check_output`, :func:`network_graphs`.
* :mod:`.pytorch`: PyTorch reference (imports torch and ``export.models`` when a bundle is loaded).
* :mod:`.ort`: ONNX Runtime in process. :mod:`.openvino`: OpenVINO on the CPU (f32 / bf16). :mod:`.mix`: each
  graph on the CPU configuration measured fastest for it (ONNX Runtime or OpenVINO). :mod:`.trt`: TensorRT
  10 (GPU). :mod:`.triton`: a Triton server's network models.

Importing this package imports numpy only; each backend's heavy library is imported when it is chosen.
"""

from __future__ import annotations

from glad_runtime.engines.base import (Engines, EngineError, GraphEngines, ads_check_signature, check_output,
                                       exported_graphs, network_graphs)

__all__ = ["Engines", "EngineError", "GraphEngines", "check_output", "load_engines", "BACKENDS", "network_graphs",
           "exported_graphs", "ads_check_signature"]


#: Backends :func:`load_engines` knows; ``torch`` needs the ``torch`` extra, ``ort`` the ``onnx`` extra (and
#: ``glad export``), ``openvino`` the ``openvino`` extra (and ``glad export``), ``mix`` both and a plan measured on
#: this machine (``python -m bench.cpu_mix BUNDLE``: each graph on its fastest CPU configuration), ``tensorrt`` a GPU, TensorRT and
#: ``glad build``, ``triton`` a server started with ``glad serve`` and the ``serve`` extra (tritonclient).
BACKENDS = ("torch", "ort", "openvino", "mix", "tensorrt", "triton")


def load_engines(bundle, backend: str = "torch", *, device: str = "cpu", precision: str = "fp32",
                 provider: str = "cpu", threads: int = 0, max_batch: int = 16, url: str | None = None,
                 model_prefix: str | None = None, shared_memory: bool = False) -> Engines:
    """Open a bundle's networks on one backend; the single place the CLI and SDK build engines.

    Args:
        bundle: a :class:`~glad_runtime.core.bundle.Bundle`.
        backend: ``"torch"`` (reference, imports torch), ``"ort"`` (ONNX Runtime, no torch), ``"openvino"``
            (OpenVINO on the CPU, no torch), ``"mix"`` (each graph on its measured fastest CPU configuration, the
            bundle's ``engines/cpu_mix.json``), ``"tensorrt"`` or ``"triton"``.
        device: torch device for ``torch`` (``cpu``, ``cuda``, ``auto``).
        precision: ``fp32`` / ``fp16`` (``ort``, ``tensorrt``; ``torch`` runs fp16 on CUDA only), ``int8`` (``ort``:
            the quantised graphs where they exist, fp32 elsewhere; ``tensorrt``), ``fp8`` (``tensorrt``); ``openvino``:
            ``fp32`` / ``f32`` or ``bf16`` (its inference precision hint on the fp32 graphs).
        provider: ONNX Runtime provider for ``ort``: ``cpu``, ``cuda``, ``tensorrt``.
        threads: ONNX Runtime intra-op / OpenVINO inference threads (0 = the cores this process may use:
            :mod:`glad_runtime.core.cpus`).
        max_batch: images per network call (``triton``: the served models' ``max_batch_size`` applies).
        url: ``triton``: the server's gRPC ``host:port``.
        model_prefix: ``triton``: the bundle's model prefix (default: from the bundle folder name, as
            ``glad serve`` names it).
        shared_memory: ``triton``: pass tensors through system shared memory (server on the same host).
    Raises:
        ValueError: unknown backend or an option the backend cannot honour.
        BundleError: the files the backend needs are missing or modified.
    """
    if backend == "torch":
        from glad_runtime.engines.pytorch import TorchEngines, load_modules

        dtype = None if precision == "fp32" else precision
        return TorchEngines(load_modules(bundle), device=device, dtype=dtype, max_batch=max_batch)
    if backend == "ort":
        from glad_runtime.engines.ort import OrtEngines

        return OrtEngines(bundle, precision=precision, provider=provider, intra_op_threads=threads,
                          max_batch=max_batch)
    if backend == "openvino":
        from glad_runtime.engines.openvino import OpenVinoEngines

        if provider != "cpu":
            raise ValueError(f"backend 'openvino' runs on the CPU only, got provider {provider!r}")
        return OpenVinoEngines(bundle, precision=precision, num_threads=threads, max_batch=max_batch)
    if backend == "mix":
        from glad_runtime.engines.mix import MixedEngines

        if provider != "cpu" or precision not in ("fp32", "mix"):
            raise ValueError("backend 'mix' runs on the CPU with the precisions of its plan (no --precision)")
        return MixedEngines(bundle, threads=threads, max_batch=max_batch)
    if backend == "tensorrt":
        from glad_runtime.engines.trt import TensorRTEngines

        return TensorRTEngines(bundle, precision=precision)
    if backend == "triton":
        from glad_runtime.engines.triton import TritonEngines, default_model_prefix

        if not url:
            raise ValueError("backend 'triton' needs the server URL (glad detect --server HOST:PORT)")
        return TritonEngines(url, model_prefix or default_model_prefix(bundle), bundle.config,
                             checksum=bundle.checksum(), shared_memory=shared_memory)
    raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
