"""Engines: one interface (:mod:`.base`), one specification and a table of backends (:mod:`.registry`), one module
per backend.

* :mod:`.base`: the :class:`Engines` protocol, :class:`GraphEngines` (the calls over named graphs shared by the
  graph backends), :func:`check_output`, :func:`network_graphs`.
* :mod:`.registry`: :class:`EngineSpec` (backend, precision, provider, threads, device, max_batch, the backend's
  own options; checked when built), :data:`BACKENDS` (one row per backend: factory, accepted values, options,
  extra, help; the CLI's engine options are made from it), :func:`open_engines` (the one dispatch),
  :func:`register_backend`, :func:`load_engines` (the keyword form).
* :mod:`.pytorch`: PyTorch reference (imports torch and ``export.models`` when a bundle is loaded).
* :mod:`.ort`: ONNX Runtime in process. :mod:`.openvino`: OpenVINO on the CPU (f32 / bf16). :mod:`.mix`: each
  graph on the CPU configuration measured fastest for it (ONNX Runtime or OpenVINO). :mod:`.trt`: TensorRT
  10 (GPU). :mod:`.triton`: a Triton server's network models.

Importing this package imports nothing heavy (the registry is pure Python, so ``glad --help`` stays fast); the
:mod:`.base` names load numpy on first use, and each backend's library is imported when it is opened.
"""

from __future__ import annotations

import importlib

from glad_runtime.engines.registry import (BACKENDS, DEFAULT_BACKEND, Backend, BackendOption, EngineSpec,
                                           load_engines, open_engines, register_backend)
from glad_runtime.errors import EngineError

__all__ = ["Engines", "EngineError", "GraphEngines", "check_output", "network_graphs", "exported_graphs",
           "ads_check_signature", "EngineSpec", "Backend", "BackendOption", "BACKENDS", "DEFAULT_BACKEND",
           "open_engines", "load_engines", "register_backend"]

_BASE = ("Engines", "GraphEngines", "check_output", "network_graphs", "exported_graphs", "ads_check_signature")


def __getattr__(name: str):
    if name in _BASE:
        value = globals()[name] = getattr(importlib.import_module("glad_runtime.engines.base"), name)
        return value
    raise AttributeError(f"module 'glad_runtime.engines' has no attribute {name!r}")
