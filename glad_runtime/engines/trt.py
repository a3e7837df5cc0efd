"""TensorRT engines: keys, optimisation profiles, lookup, and the :class:`~glad_runtime.engines.Engines` backend.

Engines are not portable across GPU models or TensorRT versions (deployment-anchors.md 1e), so every engine file
``BUNDLE/engines/<slug>.plan`` has a JSON sidecar with its :class:`EngineKey` (graph, precision, GPU name and
compute capability, TensorRT version, input shapes of the optimisation profile, and a signature of the ONNX graph
it came from). :func:`find_engine` returns the engine whose key matches the running GPU and TensorRT, and refuses
with the differing fields otherwise. Building and refitting live in ``export.tensorrt_build`` (``glad build``).

This module imports neither torch nor TensorRT at import time; :class:`TensorRTEngines` needs ``tensorrt`` and
``polygraphy`` (the ``tensorrt`` extra) and a CUDA GPU.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import EngineMismatchError, TensorRTUnavailable  # noqa: F401 (re-exported)
from glad_runtime.errors import InvalidInputError, UsageError

__all__ = ["EngineKey", "GpuInfo", "TensorRTUnavailable", "EngineMismatchError", "current_gpu", "parse_nvidia_smi",
           "optimization_profile", "find_engine", "TensorRTEngines", "PRECISIONS", "onnx_source"]

PRECISIONS = ("fp32", "fp16", "int8", "fp8")


@dataclass(frozen=True)
class GpuInfo:
    """One GPU as ``nvidia-smi`` reports it: marketing name and compute capability (``"9.0"`` for H100/H200)."""

    name: str
    compute_capability: str


def parse_nvidia_smi(text: str) -> list[GpuInfo]:
    """Parse ``nvidia-smi --query-gpu=name,compute_cap --format=csv,noheader`` output (one GPU per line).

    Raises:
        InvalidInputError: a line without two comma-separated fields.
    """
    gpus = []
    for line in text.strip().splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.rsplit(",", 1)]
        if len(parts) != 2 or not parts[0] or not re.fullmatch(r"\d+\.\d+", parts[1]):
            raise InvalidInputError(f"unexpected nvidia-smi line: {line!r}")
        gpus.append(GpuInfo(parts[0], parts[1]))
    return gpus


def current_gpu(index: int = 0) -> GpuInfo:
    """The GPU engines are built for / run on (``CUDA_VISIBLE_DEVICES`` applies through nvidia-smi's numbering
    only when unset; pass ``index`` explicitly on multi-GPU hosts).

    Raises:
        TensorRTUnavailable: no ``nvidia-smi`` or no GPU.
    """
    exe = shutil.which("nvidia-smi")
    if exe is None:
        raise TensorRTUnavailable("no NVIDIA GPU here (nvidia-smi not found): TensorRT engines need a CUDA GPU. On "
                                  "CPU use `--engine ort` (ONNX Runtime) instead")
    try:
        out = subprocess.run([exe, "--query-gpu=name,compute_cap", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=30, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise TensorRTUnavailable(f"nvidia-smi failed: {e}") from e
    gpus = parse_nvidia_smi(out)
    if not gpus:
        raise TensorRTUnavailable("nvidia-smi lists no GPU")
    if not 0 <= index < len(gpus):
        raise TensorRTUnavailable(f"GPU index {index} out of range ({len(gpus)} GPUs)")
    return gpus[index]


def tensorrt_version() -> str:
    """Installed TensorRT version. Raises TensorRTUnavailable when the package is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed: `pip install -e .[tensorrt]` on a GPU machine") from e
    return trt.__version__


Shape = tuple[int, ...]


@dataclass(frozen=True)
class EngineKey:
    """What an engine was built for; two keys must be equal for an engine to be used.

    Attributes:
        graph: ``unet``, ``vae_encoder``, ``vae_decoder``, ``dino``, ``dino_ads`` or ``ads_check``.
        precision: ``fp32``, ``fp16``, ``int8`` or ``fp8``.
        gpu: GPU name (``nvidia-smi``); compute_capability: ``"9.0"``.
        trt_version: TensorRT version string (engines are tied to the exact version).
        profile: ``((input_name, min_shape, opt_shape, max_shape), ...)`` sorted by input name.
        onnx_signature: :func:`export.tensorrt_build.graph_signature` of the source graph (structure, not weights:
            refitted weights keep the key).
    """

    graph: str
    precision: str
    gpu: str
    compute_capability: str
    trt_version: str
    profile: tuple[tuple[str, Shape, Shape, Shape], ...]
    onnx_signature: str

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        prof = tuple(sorted((str(n), tuple(map(int, a)), tuple(map(int, b)), tuple(map(int, c)))
                            for n, a, b, c in self.profile))
        object.__setattr__(self, "profile", prof)

    @property
    def static(self) -> bool:
        """True when min == opt == max for every input (static shapes, the fastest engines)."""
        return all(a == b == c for _, a, b, c in self.profile)

    @property
    def max_batch(self) -> int:
        """Largest batch the profile admits."""
        return min(c[0] for _, _, _, c in self.profile)

    def slug(self) -> str:
        """File-name stem: ``unet.fp16.nvidia-h200-sm90.trt10.13.0.35.b1-16.<hash8>``."""
        gpu = re.sub(r"[^a-z0-9]+", "-", self.gpu.lower()).strip("-")
        batches = sorted({(a[0], c[0]) for _, a, _, c in self.profile})
        lo, hi = batches[0]
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:8]
        return (f"{self.graph}.{self.precision}.{gpu}-sm{self.compute_capability.replace('.', '')}"
                f".trt{self.trt_version}.b{lo}-{hi}.{digest}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["profile"] = [[n, list(a), list(b), list(c)] for n, a, b, c in self.profile]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "EngineKey":
        return cls(**{**d, "profile": tuple((n, tuple(a), tuple(b), tuple(c)) for n, a, b, c in d["profile"])})

    def mismatches(self, **wanted) -> list[str]:
        """``field: stored != wanted`` for each given field that differs."""
        return [f"{k}: engine {getattr(self, k)!r} != here {v!r}" for k, v in wanted.items()
                if getattr(self, k) != v]


def optimization_profile(inputs: dict[str, list], batch: tuple[int, int, int]) -> dict[str, tuple[Shape, Shape, Shape]]:
    """Min/opt/max shapes per input from the ONNX input dims (``"batch"`` or any symbolic first dim is the batch).

    Args:
        inputs: ``{name: [dim, ...]}`` as in ``onnx/export.json`` (ints, or strings for dynamic dims).
        batch: ``(min, opt, max)``; ``(n, n, n)`` for a static-batch engine.
    Raises:
        UsageError: ``min <= opt <= max`` violated, batch < 1, or a dynamic dim other than the first.
    """
    lo, opt, hi = (int(b) for b in batch)
    if not 1 <= lo <= opt <= hi:
        raise UsageError(f"batch profile must satisfy 1 <= min <= opt <= max, got {batch}")
    prof = {}
    for name, dims in inputs.items():
        rest = dims[1:]
        if any(not isinstance(d, int) or d <= 0 for d in rest):
            raise UsageError(f"input {name!r}: only the batch dimension may be dynamic, got {dims}")
        fixed = tuple(int(d) for d in rest)
        if isinstance(dims[0], int) and dims[0] > 0:  # a static first dim: the graph fixes the batch
            prof[name] = ((dims[0],) + fixed,) * 3
        else:
            prof[name] = ((lo,) + fixed, (opt,) + fixed, (hi,) + fixed)
    return prof


def onnx_source(bundle: Bundle, graph: str, precision: str) -> Path:
    """The ONNX file an engine of this precision is built from: fp32 ``<g>.onnx``, fp16 ``<g>.fp16.onnx``,
    int8/fp8 the quantised ``<g>.int8.onnx`` / ``<g>.fp8.onnx`` (Q/DQ graphs from quantisation calibration).

    Raises:
        BundleError: the file is missing, naming the command that makes it.
    """
    name = f"{graph}.onnx" if precision == "fp32" else f"{graph}.{precision}.onnx"
    path = bundle.file(f"onnx/{name}")
    if not path.is_file():
        hint = "glad export" if precision in ("fp32", "fp16") else "glad calibrate --quantize"
        raise BundleError(f"{bundle.path}: no onnx/{name}; run `{hint} {bundle.path}` first")
    return path


def stored_keys(bundle: Bundle) -> list[tuple[Path, EngineKey]]:
    """All engines of a bundle with their keys (sidecar ``<slug>.json`` next to ``<slug>.plan``)."""
    out = []
    for meta in sorted(bundle.file("engines").glob("*.json")):
        plan = meta.with_suffix(".plan")
        if plan.is_file():
            out.append((plan, EngineKey.from_dict(json.loads(meta.read_text())["key"])))
    return out


def find_engine(bundle: Bundle, graph: str, precision: str, gpu: GpuInfo, trt_version: str) -> tuple[Path, EngineKey]:
    """The stored engine for ``graph`` / ``precision`` built on this GPU model and TensorRT version.

    Among matches the one admitting the largest batch wins.

    Raises:
        EngineMismatchError: none matches; lists each stored engine of that graph and why it does not fit, and the
            ``glad build`` command to run.
    """
    want = dict(graph=graph, precision=precision, gpu=gpu.name, compute_capability=gpu.compute_capability,
                trt_version=trt_version)
    keys = stored_keys(bundle)
    fits = [(p, k) for p, k in keys if not k.mismatches(**want)]
    if fits:
        return max(fits, key=lambda pk: pk[1].max_batch)
    why = [f"{p.name}: {'; '.join(k.mismatches(**want))}" for p, k in keys if k.graph == graph]
    raise EngineMismatchError(
        f"{bundle.path}: no {precision} engine for {graph!r} on {gpu.name} (sm {gpu.compute_capability}) with "
        f"TensorRT {trt_version}" + (f"; stored engines do not fit: {why}" if why else "; none built") +
        f". Run `glad build {bundle.path} --precision {precision}` on this machine")


def engines_to_load(bundle: Bundle, precision: str, gpu: GpuInfo,
                    trt_version: str) -> list[tuple[str, Path, EngineKey]]:
    """The engines :class:`TensorRTEngines` opens: ``(graph, plan path, key)`` per graph.

    Required: ``unet``, ``vae_encoder``, ``vae_decoder``, ``dino``, and ``dino_ads`` when the ADS size differs from
    ``dino_resolution`` and ADS is on or such an engine was built. Optional: ``ads_check`` (the fused ADS check), only
    when an engine of this precision fits this GPU and TensorRT; bundles built before it check on the host.

    Raises:
        EngineMismatchError: a required engine is missing or does not fit (:func:`find_engine`).
    """
    graphs = network_graphs(bundle.config, dino_ads_present=any(k.graph == "dino_ads" for _, k in stored_keys(bundle)))
    out = [(g, *find_engine(bundle, g, precision, gpu, trt_version)) for g in graphs]
    try:
        out.append(("ads_check", *find_engine(bundle, "ads_check", precision, gpu, trt_version)))
    except EngineMismatchError:
        pass
    return out


class TensorRTEngines(GraphEngines):
    """GLAD's networks on TensorRT engines from ``glad build`` (polygraphy's ``TrtRunner``: numpy in and out).

    Args:
        bundle: the bundle (or folder).
        precision: the engines' precision (``fp16`` default; ``fp32``, ``int8``, ``fp8``).
        gpu_index: which GPU (nvidia-smi numbering).
    Raises:
        TensorRTUnavailable: no GPU or no TensorRT.
        EngineMismatchError: an engine is missing or was built for another GPU / TensorRT / precision.
    """

    @classmethod
    def from_spec(cls, bundle: Bundle, spec) -> "TensorRTEngines":
        """The ``tensorrt`` row's factory (:mod:`glad_runtime.engines.registry`): the engines of
        ``spec.precision``."""
        return cls(bundle, precision=spec.precision)

    def __init__(self, bundle: Bundle | str, precision: str = "fp16", gpu_index: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.config = self.bundle.config
        gpu, version = current_gpu(gpu_index), tensorrt_version()
        try:
            from polygraphy.backend.trt import EngineFromBytes, TrtRunner
        except ImportError as e:
            raise TensorRTUnavailable("polygraphy is needed to run TensorRT engines (the tensorrt extra)") from e
        self.runners, self.keys = {}, {}
        for g, path, key in engines_to_load(self.bundle, precision, gpu, version):
            self.bundle.verify(prefix="engines/", required=[f"engines/{path.name}"])
            runner = TrtRunner(EngineFromBytes(path.read_bytes()))
            runner.activate()
            self.runners[g], self.keys[g] = runner, key
        self._init_feature_graphs(self.runners)

    def close(self) -> None:
        """Release the engines' GPU memory."""
        for r in self.runners.values():
            r.deactivate()
        self.runners.clear()

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        step = self.keys[graph].max_batch
        lo = min(a[0] for _, a, _, _ in self.keys[graph].profile)
        n = len(next(iter(feeds.values())))
        chunks = []
        for start in range(0, n, step):
            part = {k: np.ascontiguousarray(v[start:start + step]) for k, v in feeds.items()}
            m = len(next(iter(part.values())))
            if m < lo:  # static-batch engine: pad with copies of the last sample, drop them after
                part = {k: np.concatenate([v] + [v[-1:]] * (lo - m)) for k, v in part.items()}
            try:
                out = self.runners[graph].infer(part)
            except Exception as e:  # polygraphy / TensorRT raise several types
                raise EngineError(f"{graph}: TensorRT failed: {type(e).__name__}: {e}") from e
            chunks.append([np.asarray(out[name])[:m] for name in outputs])
        return [np.concatenate([c[i] for c in chunks]).astype(np.float32) for i in range(len(outputs))]
