"""OpenVINO engine: the :class:`~glad_runtime.engines.Engines` interface over a bundle's exported graphs on the CPU.

No torch: numpy in, numpy out. It reads the same fp32 graphs as the ONNX Runtime engine (``BUNDLE/onnx/<graph>.onnx``,
written by ``glad export``; inputs and outputs in ``export.onnx_export``) and compiles them with ``openvino.Core`` for
the ``CPU`` device (the ``openvino`` extra: ``pip install -e '.[openvino]'``):

* precision is OpenVINO's ``INFERENCE_PRECISION_HINT``: ``f32``, or ``bf16`` on CPUs whose
  ``OPTIMIZATION_CAPABILITIES`` list ``BF16`` (AVX-512 BF16, AMX); I/O stays float32 / int64 either way;
* ``PERFORMANCE_HINT`` ``LATENCY`` (one stream) and ``INFERENCE_NUM_THREADS`` from the cores this process may use
  (affinity and cgroup quota, :mod:`glad_runtime.core.cpus`) unless given;
* the batch dimension stays dynamic (one compiled model serves every batch size); ``static_batches`` adds models
  compiled for fixed batch sizes, used for calls of exactly that size (faster at small batches);
* compiled models are cached (OpenVINO's ``CACHE_DIR``) in ``BUNDLE/engines/openvino/<openvino version>-<cpu key>/``,
  the cpu key a hash of the CPU's ``FULL_DEVICE_NAME`` and ``OPTIMIZATION_CAPABILITIES``. OpenVINO's CPU blobs do
  not depend on the precision hint (it is applied when a blob is loaded), so ``f32`` and ``bf16`` share them. The
  cache is not in the bundle manifest (nothing verifies or records it; delete the folder to rebuild it); a bundle
  folder that cannot be written runs uncached, with a warning in the log (``glad.openvino``).

Measured on the tiny bundle against ONNX Runtime (2-core AVX-512-BF16 CPU, real ELPV cells, tests/integration/test_openvino.py):
f32 graphs within 6e-6 relative, the whole ADS loop with the same adaptive steps and scores within 1.2e-6; bf16
graphs within 3e-3 (dino) to 4.8e-2 (vae_decoder) relative (max |difference| / max |value|; mean errors 2-3e-2),
scores within 1.3e-2 and the same adaptive steps on those cells.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.core.cpus import threads_for
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import EngineSpecError

__all__ = ["OpenVinoEngines", "PRECISIONS", "cache_key"]

log = logging.getLogger("glad.openvino")

#: precision setting -> OpenVINO ``INFERENCE_PRECISION_HINT`` (``fp32`` is accepted as the project's name for f32)
PRECISIONS = {"f32": "f32", "fp32": "f32", "bf16": "bf16"}


def cache_key(core) -> str:
    """``<openvino version>-<cpu key>``: the folder name of this machine's compiled models under
    ``BUNDLE/engines/openvino/``; the cpu key is the first 12 hex digits of the sha256 of the CPU's
    ``FULL_DEVICE_NAME`` and ``OPTIMIZATION_CAPABILITIES`` (the name alone, e.g. ``AMD EPYC``, spans CPU
    generations with and without bf16)."""
    import openvino

    version = openvino.__version__.split("-")[0]
    name = str(core.get_property("CPU", "FULL_DEVICE_NAME"))
    caps = ",".join(sorted(str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")))
    return f"{version}-{hashlib.sha256(f'{name}|{caps}'.encode()).hexdigest()[:12]}"


class OpenVinoEngines(GraphEngines):
    """GLAD's four networks in OpenVINO on the CPU.

    Calls and checks are :class:`~glad_runtime.engines.GraphEngines`': ``encode(images f32 [B,3,H,W]) -> latents
    [B,C,h,w]``, ``unet(latents f32 [B,C,h,w], timesteps int64 [B]) -> noise_pred``, ``decode(latents) -> images
    [B,3,H,W]``, ``features(images [B,3,S,S]) -> [B,S/p,S/p,D]`` per layer; every output float32, shape and
    finiteness checked (:func:`~glad_runtime.engines.check_output`).

    Args:
        bundle: a :class:`~glad_runtime.core.bundle.Bundle` or its folder, exported with ``glad export`` (the fp32
            graphs are read whatever the precision).
        precision: ``"f32"`` (or ``"fp32"``), ``"bf16"``, or a mapping ``{graph: precision}`` (graphs not named run
            f32). What each graph runs is in :attr:`graph_precisions`.
        num_threads: ``INFERENCE_NUM_THREADS`` per compiled model (0 = :func:`glad_runtime.core.cpus.usable_cores`, the cores this
            process may use).
        max_batch: calls are split into chunks of at most this many images (bounded memory).
        static_batches: batch sizes that also get a model compiled for that fixed size (calls of exactly that size
            use it; other sizes use the dynamic-batch model). Each adds a compile and a cache blob per graph.
        cache_dir: folder of OpenVINO's model cache (default ``BUNDLE/engines/openvino/<cache_key>``); ``False``
            compiles without a cache.
        verify: check the graphs' sha256 against the bundle manifest before loading.
        fused_check: load the ``ads_check`` graph (the whole ADS check in one call) when the bundle has it; off by
            default, as for ONNX Runtime on the CPU (the host path measured as fast there).
    Attributes:
        graph_precisions: ``{graph: "f32" | "bf16"}`` of the loaded graphs.
        loaded_from_cache: ``{graph: bool}``: whether OpenVINO loaded the (dynamic-batch) model from the cache.
        cache_dir: the cache folder used, or None.
    Raises:
        ImportError: the ``openvino`` package is not installed (the ``openvino`` extra).
        EngineSpecError: unknown precision, a negative thread count or a static batch size < 1.
        EngineError: ``bf16`` asked on a CPU without bf16 support (OpenVINO's capabilities are named), or OpenVINO
            failed to read or compile a graph (naming it).
        BundleError: graphs missing (run ``glad export``) or modified since export.
    """

    _kind = "graph"

    @classmethod
    def from_spec(cls, bundle: Bundle, spec) -> "OpenVinoEngines":
        """The ``openvino`` row's factory (:mod:`glad_runtime.engines.registry`): ``spec.precision`` (fp32 / f32,
        bf16), ``spec.threads`` inference threads, ``spec.max_batch`` per call."""
        return cls(bundle, precision=spec.precision, num_threads=spec.threads, max_batch=spec.max_batch)

    def __init__(self, bundle: Bundle | str | os.PathLike, precision: str | Mapping[str, str] = "f32", *,
                 num_threads: int = 0, max_batch: int = 16, static_batches: Sequence[int] = (),
                 cache_dir: str | os.PathLike | bool | None = None, verify: bool = True, fused_check: bool = False,
                 graphs: Sequence[str] | None = None):
        import openvino

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.config = self.bundle.config
        requested = {"*": precision} if isinstance(precision, str) else dict(precision)
        bad = {g: p for g, p in requested.items() if p not in PRECISIONS}
        if bad:
            raise EngineSpecError(f"openvino precision must be one of {sorted(PRECISIONS)} (or a {{graph: precision}} "
                                  f"map), got {precision!r}")
        if int(num_threads) < 0:
            raise EngineSpecError(f"num_threads must be >= 0 (0 = the cores this process may use), got {num_threads}")
        if any(int(b) < 1 for b in static_batches):
            raise EngineSpecError(f"static_batches must be batch sizes >= 1, got {list(static_batches)}")
        self.precision, self.max_batch = precision, max(1, int(max_batch))
        self.num_threads = threads_for(1, int(num_threads))
        self.static_batches = sorted({int(b) for b in static_batches})
        self.core = core = openvino.Core()
        needed = network_graphs(self.config, dino_ads_present=self.bundle.file("onnx/dino_ads.onnx").is_file())
        if fused_check and self.bundle.file("onnx/ads_check.onnx").is_file():
            needed.append("ads_check")
        if graphs is not None:  # a part of the networks (MixedEngines routes the others elsewhere)
            needed = [g for g in needed if g in set(graphs)]
        if isinstance(precision, str):
            self.graph_precisions = {g: PRECISIONS[precision] for g in needed}
        else:
            self.graph_precisions = {g: PRECISIONS[requested.get(g, "f32")] for g in needed}
        if "bf16" in self.graph_precisions.values():
            caps = [str(c) for c in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")]
            if "BF16" not in caps:
                raise EngineError(f"openvino bf16: this CPU ({core.get_property('CPU', 'FULL_DEVICE_NAME')}) has no "
                                  f"bf16 support (OpenVINO capabilities {caps}); use precision f32")
        paths = {g: self.bundle.file(f"onnx/{g}.onnx") for g in self.graph_precisions}
        absent = [p.name for p in paths.values() if not p.is_file()]
        if absent:
            raise BundleError(f"{self.bundle.path}: no exported graphs {absent}; run `glad export {self.bundle.path}`")
        if verify:
            rel = [f"onnx/{p.name}" for p in paths.values()]
            rel += [r + ".data" for r in rel if self.bundle.file(r + ".data").is_file()]
            self.bundle.verify(prefix="onnx/", required=rel)
        self.cache_dir = self._set_cache(cache_dir)
        self.compiled: dict[str, object] = {}
        self._static: dict[tuple[str, int], object] = {}
        self._requests: dict[object, object] = {}
        self._locks: dict[object, threading.Lock] = {}
        self.loaded_from_cache: dict[str, bool] = {}
        for name, path in paths.items():
            cfg = {"INFERENCE_PRECISION_HINT": self.graph_precisions[name], "PERFORMANCE_HINT": "LATENCY",
                   "INFERENCE_NUM_THREADS": self.num_threads}
            try:
                self.compiled[name] = model = core.compile_model(str(path), "CPU", cfg)
                self.loaded_from_cache[name] = bool(model.get_property("LOADED_FROM_CACHE"))
                if self.static_batches:
                    source = core.read_model(str(path))
                    for b in self.static_batches:
                        m = source.clone()
                        m.reshape({i.get_any_name(): [b] + list(i.get_partial_shape())[1:] for i in m.inputs})
                        self._static[name, b] = core.compile_model(m, "CPU", cfg)
            except Exception as e:  # openvino raises RuntimeError subclasses with the plugin's message
                raise EngineError(f"{name}: OpenVINO could not compile {path.name} ({self.graph_precisions[name]}): "
                                  f"{type(e).__name__}: {e}") from e
        for model in [*self.compiled.values(), *self._static.values()]:
            self._requests[model] = model.create_infer_request()
            self._locks[model] = threading.Lock()
        if set(self.graph_precisions.values()) != {"f32"}:
            log.info("%s: openvino graph precisions %s", self.bundle.path, self.graph_precisions)
        self._init_feature_graphs(self.compiled)

    def _set_cache(self, cache_dir) -> Path | None:
        if cache_dir is False:
            return None
        path = Path(cache_dir) if cache_dir not in (None, True) else \
            self.bundle.file(f"engines/openvino/{cache_key(self.core)}")
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            log.warning("openvino: no model cache (%s); compiling every time", e)
            return None
        if not os.access(path, os.W_OK):
            log.warning("openvino: no model cache (%s is not writable); compiling every time", path)
            return None
        self.core.set_property({"CACHE_DIR": str(path)})
        return path

    @property
    def graphs(self) -> list[str]:
        """Names of the loaded graphs."""
        return list(self.compiled)

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
                   ) -> list[np.ndarray]:
        n = len(next(iter(feeds.values())))
        chunks = []
        for start in range(0, n, self.max_batch):
            part = {k: np.ascontiguousarray(v[start:start + self.max_batch]) for k, v in feeds.items()}
            size = len(next(iter(part.values())))
            model = self._static.get((graph, size))
            model = self.compiled[graph] if model is None else model
            names = outputs or [o.get_any_name() for o in model.outputs]
            try:
                with self._locks[model]:
                    res = self._requests[model].infer(part)  # results are copies (share_outputs=False)
                    chunks.append([res[model.output(k)] for k in names])
            except Exception as e:  # openvino raises RuntimeError with the plugin's message (shapes, types, ...)
                raise EngineError(f"{graph}: OpenVINO failed: {type(e).__name__}: {e}") from e
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
