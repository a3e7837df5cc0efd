"""Triton engine: the :class:`~glad_runtime.engines.Engines` interface over the network models of a GLAD server.

Each network call (``encode``, ``unet``, ``decode``, ``features``) becomes one or more gRPC requests to the models
``<prefix>_vae_encoder``, ``<prefix>_unet``, ``<prefix>_vae_decoder``, ``<prefix>_dino`` / ``<prefix>_dino_ads``
that ``glad serve`` generates (``triton_models.repository``); the ADS/SAFF loop stays in the calling process
(:class:`~glad_runtime.pipeline.batch.GladPipeline`), so the results equal the in-process ONNX Runtime engine's.
``glad detect --server URL`` uses it. For the loop on the server (one request per batch) use
:mod:`glad_runtime.serving.client` and the ``<prefix>_glad`` model instead.

Transport: gRPC with binary tensors and message limits raised to 2 GiB (:data:`glad_runtime.serving.client.GRPC_CHANNEL_ARGS`);
optionally system shared memory (``shared_memory=True``, client and server on the same host): one input and one
output region per network, sized for the model's ``max_batch_size`` and registered once.

No torch, no onnxruntime: numpy and ``tritonclient[grpc]`` only.
"""

from __future__ import annotations

import re
import threading
import uuid
from pathlib import Path

import numpy as np

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.core.config import GladConfig
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.serving import protocol

__all__ = ["TritonEngines", "default_model_prefix", "NETWORKS"]

#: Network model suffixes served per bundle (``dino_ads`` only when the bundle exports it).
NETWORKS = ("unet", "vae_encoder", "vae_decoder", "dino", "dino_ads", "ads_check")

_NP = protocol.NUMPY_DTYPES


def default_model_prefix(bundle: Bundle | str | Path) -> str:
    """The model-name prefix of a bundle on a server: its folder name, lower-cased, runs of characters other
    than ``[a-z0-9]`` replaced by ``_`` (``runs/ELPV-mono`` -> ``elpv_mono``; ``glad`` if nothing is left; a
    leading digit gets a ``m`` in front, so names stay valid identifiers)."""
    name = Path(bundle.path if isinstance(bundle, Bundle) else bundle).resolve().name
    prefix = re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "glad"
    return f"m{prefix}" if prefix[0].isdigit() else prefix


class _Model:
    """One served network: its config (batch limit, I/O names, dtypes, dims) and optional shm regions."""

    def __init__(self, name: str, cfg: dict):
        self.name = name
        self.max_batch = int(cfg.get("max_batch_size", 0)) or 1
        self.inputs = {i["name"]: (i["data_type"], [int(d) for d in i["dims"]]) for i in cfg["input"]}
        self.outputs = {o["name"]: (o["data_type"], [int(d) for d in o["dims"]]) for o in cfg["output"]}
        self.params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.shm: dict[str, tuple[str, object, int]] = {}


class TritonEngines(GraphEngines):
    """GLAD's four networks on a Triton server (gRPC).

    Args:
        url: gRPC ``host:port`` of the server.
        model_prefix: the bundle's prefix on the server (``glad serve`` prints it; see :func:`default_model_prefix`).
        config: the bundle's :class:`GladConfig` (sizes and feature layers of the calls).
        checksum: when given, every served network's ``bundle_checksum`` parameter must equal it (the server
            serves exactly this bundle).
        timeout: seconds per RPC (``client_timeout``).
        shared_memory: pass tensors through system shared memory (same host only).
    Raises:
        BundleError: the server serves another bundle under this prefix (checksum differs).
        EngineError: the server or a network model is unreachable / not loaded (the typed
            :mod:`glad_runtime.serving.client` error is the ``__cause__``).
    """

    @classmethod
    def from_spec(cls, bundle: Bundle, spec) -> "TritonEngines":
        """The ``triton`` row's factory (:mod:`glad_runtime.engines.registry`): the server at
        ``spec.options["url"]``, the bundle's models under ``options["model_prefix"]`` (default
        :func:`default_model_prefix`), checked against the bundle's checksum; ``options["shared_memory"]``."""
        o = spec.options
        return cls(o["url"], o["model_prefix"] or default_model_prefix(bundle), bundle.config,
                   checksum=bundle.checksum(), shared_memory=o["shared_memory"])

    def __init__(self, url: str, model_prefix: str, config: GladConfig, *, checksum: str | None = None,
                 timeout: float | None = 60.0, shared_memory: bool = False):
        import tritonclient.grpc as grpcclient

        from glad_runtime.serving.client import GRPC_CHANNEL_ARGS, classify_error

        self._grpc, self._classify = grpcclient, classify_error
        self.url, self.prefix, self.config, self.timeout = url, model_prefix, config, timeout
        self.client = grpcclient.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)
        self._lock = threading.Lock()
        self.models: dict[str, _Model] = {}
        wanted = network_graphs(config)
        optional = ["ads_check"] if config.ads_enabled else []  # served when the bundle has it (fused ADS check)
        for graph in wanted + optional:
            name = f"{model_prefix}_{graph}"
            if graph in optional:
                try:
                    if not self.client.is_model_ready(name, client_timeout=timeout):
                        continue
                except Exception:  # noqa: BLE001 - not served: the pipeline checks on the host
                    continue
            try:
                cfg = self.client.get_model_config(name, as_json=True, client_timeout=timeout)["config"]
                if not self.client.is_model_ready(name, client_timeout=timeout):
                    raise EngineError(f"{url}: model {name} is not ready")
            except EngineError:
                self.close()
                raise
            except Exception as e:
                self.close()
                raise EngineError(f"triton {url}: {name}: {classify_error(e, url)}") from classify_error(e, url)
            m = _Model(name, cfg)
            served = m.params.get("bundle_checksum")
            if checksum is not None and served != checksum:
                self.close()
                raise BundleError(f"{url} serves {name} from bundle {served}, this bundle is {checksum}; "
                                  "regenerate the repository with `glad serve` or pass the right --model-prefix")
            self.models[graph] = m
        self._init_feature_graphs(self.models)
        self.shared_memory = False
        if shared_memory:
            self._setup_shm()

    # ------------------------------------------------------------------ shared memory
    def _setup_shm(self) -> None:
        import tritonclient.utils.shared_memory as shm

        self._shm = shm
        tag = uuid.uuid4().hex[:8]
        for graph, m in self.models.items():
            for kind, tensors in (("in", m.inputs), ("out", m.outputs)):
                for tname, (dtype, dims) in tensors.items():
                    nbytes = m.max_batch * int(np.prod([max(d, 1) for d in dims])) * np.dtype(_NP[dtype]).itemsize
                    region = f"glad_{tag}_{graph}_{kind}_{tname}"
                    handle = shm.create_shared_memory_region(region, f"/{region}", nbytes)
                    self.client.register_system_shared_memory(region, f"/{region}", nbytes)
                    m.shm[f"{kind}:{tname}"] = (region, handle, nbytes)
        self.shared_memory = True

    # ------------------------------------------------------------------ calls
    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        m = self.models[graph]
        n = len(next(iter(feeds.values())))
        parts = []
        for start in range(0, n, m.max_batch):
            chunk = {k: np.ascontiguousarray(v[start:start + m.max_batch]) for k, v in feeds.items()}
            parts.append(self._infer_chunk(m, chunk, outputs))
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]

    def _infer_chunk(self, m: _Model, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        g = self._grpc
        inputs = []
        with self._lock:
            for name, arr in feeds.items():
                dtype, dims = m.inputs[name]
                arr = protocol.to_wire(np.ascontiguousarray(arr, dtype=_NP[dtype]), dims)
                inp = g.InferInput(name, list(arr.shape), dtype.replace("TYPE_", ""))
                if self.shared_memory:
                    region, handle, _ = m.shm[f"in:{name}"]
                    self._shm.set_shared_memory_region(handle, [arr])
                    inp.set_shared_memory(region, arr.nbytes)
                else:
                    inp.set_data_from_numpy(arr)
                inputs.append(inp)
            outs = []
            for name in outputs:
                o = g.InferRequestedOutput(name)
                if self.shared_memory:
                    region, _, nbytes = m.shm[f"out:{name}"]
                    o.set_shared_memory(region, nbytes)
                outs.append(o)
            try:
                r = self.client.infer(m.name, inputs, outputs=outs, client_timeout=self.timeout)
            except Exception as e:
                err = self._classify(e, self.url)
                raise EngineError(f"triton {m.name}: {err}") from err
            result = []
            for name in outputs:
                if self.shared_memory:
                    o = r.get_output(name)
                    dtype = _NP[m.outputs[name][0]]
                    arr = self._shm.get_contents_as_numpy(m.shm[f"out:{name}"][1], dtype, list(o.shape)).copy()
                else:
                    arr = r.as_numpy(name)
                result.append(arr)
        return result

    def close(self) -> None:
        """Unregister and destroy the shared-memory regions and close the channel (idempotent)."""
        for m in self.models.values():
            for region, handle, _ in m.shm.values():
                try:
                    self.client.unregister_system_shared_memory(region)
                except Exception:
                    pass
                try:
                    self._shm.destroy_shared_memory_region(handle)
                except Exception:
                    pass
            m.shm.clear()
        try:
            self.client.close()
        except Exception:
            pass

    def __del__(self):  # best effort: shm segments must not outlive the process
        try:
            if getattr(self, "shared_memory", False):
                self.close()
        except Exception:
            pass
