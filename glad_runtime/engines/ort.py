"""ONNX Runtime engine: the :class:`~glad_runtime.engines.Engines` interface over a bundle's exported graphs.

No torch: numpy in, numpy out. The graphs are the ones ``glad export`` writes into ``BUNDLE/onnx/`` (see
``export.onnx_export`` for their inputs and outputs). The execution provider is an explicit setting, never a silent
fallback: ``cpu`` (``CPUExecutionProvider``), ``cuda`` (``CUDAExecutionProvider``, needs ``onnxruntime-gpu``) or
``tensorrt`` (``TensorrtExecutionProvider`` with CUDA behind it for unsupported nodes; its engines are cached under
``BUNDLE/engines/ort-trt/``).
"""

from __future__ import annotations

from typing import Sequence

import logging
import os
from pathlib import Path

import numpy as np

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import EngineSpecError

__all__ = ["OrtEngines", "PROVIDERS", "session_options"]

log = logging.getLogger("glad.ort")
#: precision -> file suffix in ``onnx/`` (``int8``: Q/DQ graphs from ``glad calibrate --quantize int8``)
_SUFFIX = {"fp32": "", "fp16": ".fp16", "int8": ".int8"}

#: ``provider`` setting -> ONNX Runtime provider list (first is preferred for each node, CPU only where named).
PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider"],
}


def session_options(intra_op_threads: int = 0, inter_op_threads: int = 0, spinning: bool = False):
    """``onnxruntime.SessionOptions`` with full graph optimisation; ``intra_op_threads`` 0 = the cores this process
    may use (:func:`glad_runtime.core.cpus.threads_for`: affinity and cgroup quota, where ONNX Runtime's own default
    counts the machine's physical cores); ``inter_op_threads`` 0 = ONNX Runtime's default; threads do not spin
    unless ``spinning`` (:func:`glad_runtime.core.cpus.ort_spinning`)."""
    import onnxruntime as ort

    from glad_runtime.core.cpus import ort_spinning, threads_for

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads_for(1, int(intra_op_threads))
    opts.inter_op_num_threads = int(inter_op_threads)
    opts.log_severity_level = 3
    return ort_spinning(opts, spinning)


class OrtEngines(GraphEngines):
    """GLAD's four networks in ONNX Runtime.

    Args:
        bundle: a :class:`~glad_runtime.core.bundle.Bundle` or its folder, exported with ``glad export``.
        precision: ``"fp32"`` (``onnx/<graph>.onnx``), ``"fp16"`` (``onnx/<graph>.fp16.onnx``; fp32 I/O),
            ``"int8"`` (the Q/DQ ``onnx/<graph>.int8.onnx`` of ``glad calibrate --quantize int8`` where one exists,
            fp32 for the other graphs: quantisation is per graph), or a mapping ``{graph: precision}`` (graphs not
            named run fp32). What each graph runs is in :attr:`graph_precisions` and logged (``glad.ort``).
        provider: ``"cpu"``, ``"cuda"`` or ``"tensorrt"`` (see :data:`PROVIDERS`).
        intra_op_threads, inter_op_threads: ONNX Runtime thread pools (:func:`session_options`; intra 0 = the cores
            this process may use, inter 0 = ONNX Runtime's default). spinning: let idle threads spin (off: they
            sleep and leave the cores to others; measured in ``bench/cpu_share.py``). graphs: load only these
            (default: every graph the config needs).
        max_batch: calls are split into chunks of at most this many images (bounded memory).
        verify: check the graphs' sha256 against the bundle manifest before loading.
        fused_check: load the ``ads_check`` graph (the whole ADS check in one call, only the distance map returned)
            when the bundle has it. Default: on the ``cuda`` / ``tensorrt`` providers, where it avoids moving two
            decodes and the tokens to the host per check (3.2x on an H200, see bench/gpu_check.py); off on ``cpu``,
            where the host path measured as fast (tiny ELPV bundle: 136-153 vs 157-173 ms per image in checks).
    Raises:
        BundleError: graphs missing (run ``glad export``) or modified since export.
        EngineSpecError: unknown precision or provider, or a provider this onnxruntime build lacks (naming the package
            that has it).
    """

    @classmethod
    def from_spec(cls, bundle: Bundle, spec) -> "OrtEngines":
        """The ``ort`` row's factory (:mod:`glad_runtime.engines.registry`): ``spec.precision``,
        ``spec.provider``, ``spec.threads`` intra-op threads, ``spec.max_batch`` per call."""
        return cls(bundle, precision=spec.precision, provider=spec.provider, intra_op_threads=spec.threads,
                   max_batch=spec.max_batch)

    def __init__(self, bundle: Bundle | str | os.PathLike, precision: str = "fp32", provider: str = "cpu", *,
                 intra_op_threads: int = 0, inter_op_threads: int = 0, max_batch: int = 16, verify: bool = True,
                 fused_check: bool | None = None, spinning: bool = False, graphs: Sequence[str] | None = None):
        import onnxruntime as ort

        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.config = self.bundle.config
        if not isinstance(precision, str):
            bad = {g: p for g, p in dict(precision).items() if p not in _SUFFIX}
        else:
            bad = {} if precision in _SUFFIX else {"*": precision}
        if bad:
            raise EngineSpecError(f"precision must be one of {sorted(_SUFFIX)} (or a {{graph: precision}} map), got "
                                  f"{precision!r}")
        if provider not in PROVIDERS:
            raise EngineSpecError(f"provider must be one of {sorted(PROVIDERS)}, got {provider!r}")
        available = ort.get_available_providers()
        missing = [p for p in PROVIDERS[provider] if p not in available]
        if missing:
            raise EngineSpecError(f"provider {provider!r} needs {missing}, not in this onnxruntime build (available: "
                                  f"{available}); install onnxruntime-gpu instead of onnxruntime for cuda/tensorrt")
        self.precision, self.provider, self.max_batch = precision, provider, max(1, int(max_batch))
        self.opts = session_options(intra_op_threads, inter_op_threads, spinning)
        self.sessions: dict[str, object] = {}
        # dino_ads: required with ADS on; loaded when present so ADS can be switched on later
        needed = network_graphs(self.config, dino_ads_present=any(
            self.bundle.file(f"onnx/dino_ads{sfx}.onnx").is_file() for sfx in _SUFFIX.values()))
        if fused_check is None:
            fused_check = provider != "cpu"
        if fused_check and any(self.bundle.file(f"onnx/ads_check{sfx}.onnx").is_file() for sfx in _SUFFIX.values()):
            needed.append("ads_check")  # optional: bundles exported before it run the check on the host
        if graphs is not None:  # a part of the networks (MixedEngines routes the others elsewhere)
            needed = [g for g in needed if g in set(graphs)]
        #: the precision each loaded graph runs at (``int8`` falls back to fp32 per graph, see above)
        self.graph_precisions = self._resolve(precision, needed)
        gp = self.graph_precisions
        ads_feats = "dino_ads" if "dino_ads" in gp else "dino"
        if "ads_check" in gp and not gp["ads_check"] == gp.get("vae_decoder") == gp.get(ads_feats):
            del gp["ads_check"]  # the fused check would bypass a quantised decoder / ADS feature graph
        paths = {name: self.bundle.file(f"onnx/{name}{_SUFFIX[p]}.onnx") for name, p in self.graph_precisions.items()}
        absent = [p.name for p in paths.values() if not p.is_file()]
        if absent:
            raise BundleError(f"{self.bundle.path}: no exported graphs {absent}; run `glad export "
                              f"{self.bundle.path}` (precision {precision})")
        if any(p != "fp32" for p in self.graph_precisions.values()) or precision != "fp32":
            log.info("%s: graph precisions %s", self.bundle.path, self.graph_precisions)
        if verify:
            rel = [f"onnx/{p.name}" for p in paths.values()]
            rel += [r + ".data" for r in rel if self.bundle.file(r + ".data").is_file()]
            self.bundle.verify(prefix="onnx/", required=rel)
        for name, path in paths.items():
            providers = self._providers(provider, self.graph_precisions[name])
            self.sessions[name] = ort.InferenceSession(str(path), self.opts, providers=providers)
        # feature graphs are fixed-size: map image size -> graph
        self._init_feature_graphs(self.sessions)

    def _resolve(self, precision, needed: list[str]) -> dict[str, str]:
        """``{graph: precision}``: a mapping is taken as given (unnamed graphs fp32); ``"int8"`` picks the graphs
        with an ``.int8.onnx`` and fp32 for the rest, and refuses a bundle with none."""
        if not isinstance(precision, str):
            return {g: dict(precision).get(g, "fp32") for g in needed}
        if precision != "int8":
            return {g: precision for g in needed}
        got = {g: "int8" if self.bundle.file(f"onnx/{g}.int8.onnx").is_file() else "fp32" for g in needed}
        if "int8" not in got.values():
            raise BundleError(f"{self.bundle.path}: no quantised graphs (onnx/<graph>.int8.onnx); run `glad calibrate "
                              f"{self.bundle.path} NORMAL_DIR --quantize int8` first")
        return got

    def _providers(self, provider: str, precision: str) -> list:
        if provider != "tensorrt":
            return list(PROVIDERS[provider])
        cache = Path(self.bundle.file("engines/ort-trt"))
        cache.mkdir(parents=True, exist_ok=True)
        trt_opts = {"trt_fp16_enable": precision == "fp16", "trt_int8_enable": precision == "int8",
                    "trt_engine_cache_enable": True,
                    "trt_engine_cache_path": str(cache), "trt_timing_cache_enable": True}
        return [("TensorrtExecutionProvider", trt_opts), "CUDAExecutionProvider"]

    @property
    def graphs(self) -> list[str]:
        """Names of the loaded graphs."""
        return list(self.sessions)

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str] | None = None
                   ) -> list[np.ndarray]:
        sess = self.sessions[graph]
        n = len(next(iter(feeds.values())))
        chunks = []
        for start in range(0, n, self.max_batch):
            part = {k: np.ascontiguousarray(v[start:start + self.max_batch]) for k, v in feeds.items()}
            try:
                chunks.append(sess.run(outputs, part))
            except Exception as e:  # onnxruntime raises its own exception classes (Fail, InvalidArgument, ...)
                raise EngineError(f"{graph}: ONNX Runtime failed: {type(e).__name__}: {e}") from e
        return [np.concatenate([c[k] for c in chunks]) for k in range(len(chunks[0]))]
