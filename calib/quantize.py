"""Quantisation calibration: INT8 Q/DQ graphs from the inputs the GLAD loop really feeds each network.

Steps (``glad calibrate BUNDLE NORMAL_DIR --quantize int8``, :func:`quantize_bundle`):

1. **Record** (:func:`record_calibration`): normal images run through the :class:`~glad_runtime.pipeline.batch.GladPipeline`
   on the fp32 ONNX Runtime graphs behind a :class:`RecordingEngines` wrapper, which keeps the inputs of every
   network call: encoder images, the latents and int64 timesteps at every DDIM step the loop visits, the decoder
   inputs (VAE round trip, ADS decodes of ``x0`` and the input-anchored sample, final reconstruction) and the
   feature-extractor images at each size (``dino`` scoring size, ``dino_ads`` ADS size). A
   :class:`CalibrationSet` holds them per graph and saves as one ``.npz`` per graph (keys = graph input names,
   the format NVIDIA ModelOpt reads directly).
2. **Quantise** each chosen graph to ``BUNDLE/onnx/<graph>.int8.onnx``: ONNX Runtime static quantisation
   (:func:`quantize_graph`: ``quant_pre_process`` then ``quantize_static``, QDQ format, symmetric signed INT8
   activations and per-channel INT8 weights, the layout TensorRT's explicit quantisation needs) over a
   :class:`GraphDataReader` of the recorded inputs. Only ``Conv``/``ConvTranspose``/``MatMul``/``Gemm`` get Q/DQ
   (:data:`OP_TYPES_TO_QUANTIZE`): normalisations, softmax, GELU/SiLU, residual adds and the timestep embedding
   stay float, and by default the first and last quantisable node of each graph (image/latent-facing
   convolutions) are excluded too (:func:`nodes_to_exclude`). On a GPU, :func:`quantize_graph_modelopt` makes the
   same files (and ``<graph>.fp8.onnx``) with NVIDIA ModelOpt from the same recorded data.
3. **Check** each graph on held-out recorded inputs (relative error against fp32, :func:`graph_errors`) and, with
   labelled data, the **accuracy gate** (:func:`accuracy_gate`): image AUROC (and AUPRO with masks) of the whole
   pipeline with the quantised graphs may drop at most ``max_delta`` below fp32. A rejected set of graphs is
   deleted; ``onnx/quantize.json`` records settings, per-graph errors, sizes, latency and the gate either way.

:class:`glad_runtime.engines.ort.OrtEngines` runs ``precision="int8"`` on the graphs that have an accepted
``.int8.onnx`` and fp32 on the others (listed in ``OrtEngines.graph_precisions`` and logged), and
``glad build --precision int8`` builds TensorRT engines from the same Q/DQ files (``glad_runtime.engines.trt.onnx_source``).
:func:`write_trt_calibration_table` also writes the per-tensor ranges as ONNX Runtime's TensorRT-EP calibration
table (``calibration.cache`` / ``.flatbuffers`` / ``.json``) for TensorRT's implicit INT8 path on the fp32 graphs.

Numpy and onnx/onnxruntime only (the ``onnx`` extra); no torch.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import GladConfig
from glad_runtime.errors import PathNotFoundError, QuantizationError, UsageError  # noqa: F401 (re-exported)

__all__ = ["QuantizationError", "RecordingEngines", "CalibrationSet", "record_calibration", "GraphDataReader",
           "QuantSettings", "OP_TYPES_TO_QUANTIZE", "nodes_to_exclude", "quantized_path", "quantize_graph",
           "quantize_graph_modelopt", "graph_errors", "GateResult", "accuracy_gate", "evaluate_engines",
           "quantize_bundle", "QUANT_REPORT", "is_qdq", "write_trt_calibration_table", "CALIBRATION_METHODS",
           "format_gate_table"]

log = logging.getLogger("glad.quantize")

#: Graph input names, in call order (export/onnx_export.py).
GRAPH_INPUTS = {"unet": ("latents", "timesteps"), "vae_encoder": ("images",), "vae_decoder": ("latents",),
                "dino": ("images",), "dino_ads": ("images",)}
#: Op types that get Q/DQ on their inputs (TensorRT fuses Q/DQ around these into INT8 kernels).
OP_TYPES_TO_QUANTIZE = ("Conv", "ConvTranspose", "MatMul", "Gemm")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
#: ``onnx/quantize.json``: settings, per-graph errors and sizes, the gate.
QUANT_REPORT = "onnx/quantize.json"


# ---------------------------------------------------------------------------------------------- recording
def feature_graph(config: GladConfig, size: int) -> str:
    """The feature graph that serves images of ``size`` px: ``dino`` (scoring size) or ``dino_ads`` (ADS size).

    Raises:
        QuantizationError: a size neither graph has.
    """
    if size == config.dino_resolution:
        return "dino"
    if size == config.ads_size:
        return "dino_ads"
    raise QuantizationError(f"no feature graph for {size}px images (dino {config.dino_resolution}, "
                            f"ads {config.ads_size})")


class RecordingEngines:
    """An :class:`~glad_runtime.engines.Engines` wrapper that forwards every call and keeps a copy of its inputs.

    Args:
        engines: the backend that computes the outputs (the fp32 graphs, so the recorded inputs are the fp32 loop's).
        config: the bundle config (maps feature-image sizes to ``dino`` / ``dino_ads``).
    Attributes:
        calls: ``{graph: [ {input_name: array [b, ...]} , ...]}`` one entry per network call, in call order;
            ``unet`` entries have ``latents f32 [b,C,h,w]`` and ``timesteps int64 [b]``.
    """

    def __init__(self, engines, config: GladConfig):
        self.engines, self.config = engines, config
        self.calls: dict[str, list[dict[str, np.ndarray]]] = {}

    def _keep(self, graph: str, **feeds: np.ndarray) -> None:
        self.calls.setdefault(graph, []).append({k: np.array(v, copy=True) for k, v in feeds.items()})

    def encode(self, images):
        self._keep("vae_encoder", images=np.asarray(images, np.float32))
        return self.engines.encode(images)

    def unet(self, latents, timesteps):
        latents = np.asarray(latents, np.float32)
        ts = np.broadcast_to(np.asarray(timesteps, np.int64), (len(latents),))
        self._keep("unet", latents=latents, timesteps=ts)
        return self.engines.unet(latents, ts)

    def decode(self, latents):
        self._keep("vae_decoder", latents=np.asarray(latents, np.float32))
        return self.engines.decode(latents)

    def features(self, images):
        images = np.asarray(images, np.float32)
        self._keep(feature_graph(self.config, images.shape[-1]), images=images)
        return self.engines.features(images)


@dataclass
class CalibrationSet:
    """Recorded network inputs, concatenated per graph along the batch axis.

    Attributes:
        feeds: ``{graph: {input_name: array [N_graph, ...]}}`` (float32; ``unet.timesteps`` int64).
        calls: ``{graph: number of network calls recorded}``.
        images: the source image files (or ``array[i]`` labels), in order.
    """

    feeds: dict[str, dict[str, np.ndarray]]
    calls: dict[str, int] = field(default_factory=dict)
    images: list[str] = field(default_factory=list)

    @classmethod
    def from_recording(cls, rec: RecordingEngines, images: Sequence[str] = ()) -> "CalibrationSet":
        feeds = {g: {name: np.concatenate([c[name] for c in calls]) for name in calls[0]}
                 for g, calls in rec.calls.items() if calls}
        return cls(feeds, {g: len(c) for g, c in rec.calls.items()}, [str(i) for i in images])

    def samples(self, graph: str) -> int:
        """Number of recorded samples (batch rows) for ``graph`` (0 when none)."""
        f = self.feeds.get(graph)
        return 0 if not f else len(next(iter(f.values())))

    def split(self, graph: str, holdout: float = 0.25, seed: int = 0
              ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """``(calibrate, check)`` feeds of one graph: a seeded random ``holdout`` fraction (at least one sample,
        none when only one exists) is kept apart to measure the quantised graph's error on unseen inputs."""
        n = self.samples(graph)
        if n == 0:
            raise QuantizationError(f"no recorded inputs for {graph!r}")
        k = 0 if n < 2 else max(1, int(round(n * holdout)))
        idx = np.random.default_rng(seed).permutation(n)
        hold, keep = np.sort(idx[:k]), np.sort(idx[k:])
        f = self.feeds[graph]
        return {k_: v[keep] for k_, v in f.items()}, {k_: v[hold] for k_, v in f.items()}

    def save(self, folder: str | os.PathLike) -> list[Path]:
        """Write ``<folder>/<graph>.npz`` (uncompressed; keys = graph input names, as ModelOpt's
        ``calibration_data`` expects) and ``<folder>/calibration_set.json`` (calls, image list). Returns the files."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        out = []
        for g, f in self.feeds.items():
            np.savez(folder / f"{g}.npz", **f)
            out.append(folder / f"{g}.npz")
        (folder / "calibration_set.json").write_text(json.dumps({"calls": self.calls, "images": self.images,
                                                                 "samples": {g: self.samples(g) for g in self.feeds}},
                                                                indent=2))
        return out

    @classmethod
    def load(cls, folder: str | os.PathLike) -> "CalibrationSet":
        """Read a set written by :meth:`save`. Raises PathNotFoundError (a FileNotFoundError)
        when the folder has no ``.npz``."""
        folder = Path(folder)
        files = sorted(folder.glob("*.npz"))
        if not files:
            raise PathNotFoundError(f"{folder}: no <graph>.npz calibration files")
        feeds = {}
        for p in files:
            with np.load(p) as z:
                feeds[p.stem] = {k: z[k] for k in z.files}
        meta = json.loads((folder / "calibration_set.json").read_text()) if (folder / "calibration_set.json"
                                                                               ).is_file() else {}
        return cls(feeds, meta.get("calls", {}), meta.get("images", []))


def record_calibration(engines, config: GladConfig, images: np.ndarray | Iterable[np.ndarray], *,
                       names: Sequence[str] = (), progress: Callable[[str], None] | None = None) -> CalibrationSet:
    """Run the GLAD pipeline on normal images and record every network's inputs.

    Args:
        engines: the fp32 backend (any :class:`~glad_runtime.engines.Engines`; ``OrtEngines`` fp32 in the CLI).
        config: the bundle config (the pipeline runs exactly as ``glad detect`` would).
        images: preprocessed float32 ``[N,3,R,R]`` in [-1, 1], or an iterable of such batches (the batch size is
            the caller's; an image's recorded inputs do not depend on its batch mates, project decision 2).
        names: labels of the images (file paths), kept in the set.
        progress: called with a short message per batch.
    Returns:
        :class:`CalibrationSet`: per image, ``vae_encoder`` 1 sample, ``unet`` one per DDIM step
        (``num_inference_steps`` x ``num_seeds``), ``vae_decoder`` 1 + ``num_seeds`` (+ 2 per ADS check),
        ``dino`` 1 + ``num_seeds``, ``dino_ads`` 2 per ADS check.
    Raises:
        QuantizationError: no images. Pipeline errors propagate.
    """
    from glad_runtime.pipeline.batch import GladPipeline

    rec = RecordingEngines(engines, config)
    pipe = GladPipeline(rec, config)
    batches = [images] if isinstance(images, np.ndarray) else images
    n = 0
    for batch in batches:
        if len(batch) == 0:
            continue
        pipe(batch)
        n += len(batch)
        if progress:
            progress(f"recorded {n} images")
    if n == 0:
        raise QuantizationError("no calibration images")
    return CalibrationSet.from_recording(rec, names or [f"array[{i}]" for i in range(n)])


class GraphDataReader(CalibrationDataReader):
    """ONNX Runtime ``CalibrationDataReader`` over one graph's recorded inputs, in batches.

    Args:
        feeds: ``{input_name: array [N, ...]}`` (e.g. ``CalibrationSet.feeds[graph]``).
        batch_size: rows per ``get_next()`` (the last batch may be smaller).
    ``get_next()`` returns ``{input_name: array [b, ...]}`` (C-contiguous) and then None; ``rewind()`` restarts.
    Every batch has the same size ``b = min(batch_size, N)``; the last ``N mod b`` rows are left out (ONNX
    Runtime's entropy and percentile calibrators stack per-batch results and fail on a ragged last batch).
    """

    def __init__(self, feeds: Mapping[str, np.ndarray], batch_size: int = 8):
        if not feeds:
            raise QuantizationError("empty calibration feeds")
        lengths = {len(v) for v in feeds.values()}
        if len(lengths) != 1 or 0 in lengths:
            raise QuantizationError(f"calibration inputs differ in length or are empty: "
                                    f"{ {k: len(v) for k, v in feeds.items()} }")
        n = lengths.pop()
        self.feeds, self.batch_size = dict(feeds), min(max(1, int(batch_size)), n)
        self.n = n - n % self.batch_size
        self._pos = 0

    def __len__(self) -> int:
        return self.n // self.batch_size

    def get_next(self):
        if self._pos >= self.n:
            return None
        s = slice(self._pos, self._pos + self.batch_size)
        self._pos += self.batch_size
        return {k: np.ascontiguousarray(v[s]) for k, v in self.feeds.items()}

    def rewind(self) -> None:
        self._pos = 0


# ---------------------------------------------------------------------------------------------- quantising
@dataclass
class QuantSettings:
    """How a graph is quantised.

    Attributes:
        method: ``percentile`` (default: the lowest held-out error measured, README "Quantisation calibration"),
            ``minmax`` or ``entropy`` (ONNX Runtime calibrators).
        percentile: for ``percentile``, the kept percentile of |activation| (ORT default 99.999).
        per_channel: per-output-channel weight scales (Conv axis 0, MatMul/Gemm last axis).
        op_types: op types that get Q/DQ (:data:`OP_TYPES_TO_QUANTIZE`); everything else stays float.
        exclude_first_last: keep the first and last quantisable node in float (input/output-facing layers).
        exclude_nodes: further node names kept in float.
        pre_process: run ``quant_pre_process`` (shape inference, basic fusions) first; skipped with a log line
            when it fails on a graph.
        batch_size: calibration batch size (rows per ``get_next``).
    """

    method: str = "percentile"
    percentile: float = 99.999
    per_channel: bool = True
    op_types: tuple[str, ...] = OP_TYPES_TO_QUANTIZE
    exclude_first_last: bool = True
    exclude_nodes: tuple[str, ...] = ()
    pre_process: bool = True
    batch_size: int = 8

    def __post_init__(self):
        if self.method not in CALIBRATION_METHODS:
            raise UsageError(f"method must be one of {CALIBRATION_METHODS}, got {self.method!r}")


def quantized_path(bundle: Bundle, graph: str, mode: str = "int8") -> Path:
    """``BUNDLE/onnx/<graph>.<mode>.onnx``: the name ``glad_runtime.engines.trt.onnx_source`` and ``OrtEngines`` look for."""
    if mode not in ("int8", "fp8"):
        raise UsageError(f"mode must be 'int8' or 'fp8', got {mode!r}")
    return bundle.file(f"onnx/{graph}.{mode}.onnx")


def nodes_to_exclude(model, op_types: Sequence[str] = OP_TYPES_TO_QUANTIZE, first_last: bool = True,
                     extra: Sequence[str] = ()) -> list[str]:
    """Names of the nodes kept in float: with ``first_last`` the first and the last node (graph order, which is
    topological after export) whose op type is in ``op_types``, plus ``extra``. Unnamed nodes cannot be excluded
    by name and are skipped.

    Args:
        model: an ``onnx.ModelProto``.
    Returns:
        sorted unique node names.
    """
    names = [n.name for n in model.graph.node if n.op_type in set(op_types) and n.name]
    out = set(extra)
    if first_last and names:
        out.update({names[0], names[-1]})
    return sorted(out)


def is_qdq(model) -> bool:
    """True when the graph has both QuantizeLinear and DequantizeLinear nodes (a Q/DQ graph)."""
    ops = {n.op_type for n in model.graph.node}
    return "QuantizeLinear" in ops and "DequantizeLinear" in ops


def _ort_method(settings: QuantSettings):
    from onnxruntime.quantization import CalibrationMethod

    return {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile}[settings.method]


def quantize_graph(src: str | os.PathLike, dst: str | os.PathLike, feeds: Mapping[str, np.ndarray],
                   settings: QuantSettings | None = None) -> dict:
    """ONNX Runtime static INT8 quantisation of one fp32 graph into a Q/DQ graph.

    Args:
        src: the fp32 ``.onnx`` (``glad export``).
        dst: output path (``<graph>.int8.onnx``); its metadata gets ``glad.precision = int8``.
        feeds: recorded inputs ``{input_name: array [N, ...]}`` (:meth:`CalibrationSet.split`).
        settings: :class:`QuantSettings` (default percentile, per-channel, Conv/MatMul/Gemm, first/last excluded).
    Returns:
        ``{"excluded": [...], "pre_processed": bool, "seconds": float, "qdq_nodes": int}``.
    Raises:
        QuantizationError: the quantiser failed (message kept) or produced no Q/DQ node.
    """
    import onnx
    from onnxruntime.quantization import QuantFormat, QuantType, quant_pre_process, quantize_static

    s = settings or QuantSettings()
    src, dst = Path(src), Path(dst)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        model_in, pre = src, False
        if s.pre_process:
            pp = Path(tmp) / "pre.onnx"
            try:
                quant_pre_process(str(src), str(pp), skip_optimization=True, skip_symbolic_shape=True)
                model_in, pre = pp, True
            except Exception as e:  # noqa: BLE001 - the pre-processor raises many types; quantising still works
                log.info("quant_pre_process failed on %s (%s: %s); quantising the exported graph", src.name,
                         type(e).__name__, e)
        model = onnx.load(str(model_in))
        excluded = nodes_to_exclude(model, s.op_types, s.exclude_first_last, s.exclude_nodes)
        # Q/DQ on the inputs of the quantised ops only (TensorRT's explicit-quantisation pattern): quantising their
        # outputs too propagates Q/DQ through Unsqueeze/Reshape and breaks on the UNet time embedding (ORT 1.32
        # writes a uint8 zero point for an int8 QuantizeLinear there)
        extra = {"ActivationSymmetric": True, "WeightSymmetric": True,
                 "OpTypesToExcludeOutputQuantization": list(s.op_types)}
        if s.method == "percentile":
            extra["CalibPercentile"] = float(s.percentile)
        out = Path(tmp) / "q.onnx"
        try:
            quantize_static(str(model_in), str(out), GraphDataReader(feeds, s.batch_size),
                            quant_format=QuantFormat.QDQ, op_types_to_quantize=list(s.op_types),
                            per_channel=s.per_channel, activation_type=QuantType.QInt8,
                            weight_type=QuantType.QInt8, nodes_to_exclude=excluded,
                            calibrate_method=_ort_method(s), extra_options=extra)
        except Exception as e:  # noqa: BLE001
            raise QuantizationError(f"{src.name}: quantize_static failed: {type(e).__name__}: {e}") from e
        q = onnx.load(str(out))
        if not is_qdq(q):
            raise QuantizationError(f"{src.name}: quantisation produced no QuantizeLinear/DequantizeLinear node")
        meta = {p.key: p.value for p in onnx.load(str(src), load_external_data=False).metadata_props}
        meta |= {"glad.precision": "int8", "glad.quant_tool": "onnxruntime", "glad.calibration": s.method}
        del q.metadata_props[:]
        for k, v in meta.items():
            q.metadata_props.add(key=k, value=str(v))
        onnx.save(q, str(dst))
    qdq = sum(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in q.graph.node)
    return {"excluded": excluded, "pre_processed": pre, "seconds": round(time.perf_counter() - t0, 2),
            "qdq_nodes": int(qdq)}


def quantize_graph_modelopt(src: str | os.PathLike, dst: str | os.PathLike, feeds: Mapping[str, np.ndarray], *,
                            mode: str = "int8", method: str = "entropy", exclude: Sequence[str] = (),
                            op_types_to_exclude: Sequence[str] = (), calibration_eps: Sequence[str] = ("trt",
                                                                                                      "cuda:0", "cpu")
                            ) -> dict:
    """NVIDIA ModelOpt ONNX PTQ (``modelopt.onnx.quantization.quantize``): a TensorRT-rules Q/DQ graph for INT8
    or FP8 (FP8 needs Hopper/Ada TensorRT) from the same recorded inputs. Meant for a GPU machine (calibration on
    TensorRT/CUDA execution providers, CPU last).

    Args:
        src, dst: fp32 graph and output (``<graph>.int8.onnx`` / ``<graph>.fp8.onnx``).
        feeds: ``{input_name: array [N, ...]}``.
        mode: ``int8`` or ``fp8``. method: ``entropy`` or ``max`` (ModelOpt's int8/fp8 calibrators).
        exclude: node names kept in float (:func:`nodes_to_exclude`); op_types_to_exclude: op types kept in float.
    Returns:
        ``{"tool": "modelopt", "version": ..., "seconds": ...}``.
    Raises:
        QuantizationError: ModelOpt not installed (``pip install nvidia-modelopt[onnx]``), a bad mode/method, or
            ModelOpt failed.
    """
    if mode not in ("int8", "fp8"):
        raise QuantizationError(f"modelopt mode must be int8 or fp8, got {mode!r}")
    if method not in ("entropy", "max"):
        raise QuantizationError(f"modelopt calibration method must be 'entropy' or 'max', got {method!r}")
    try:
        import modelopt
        from modelopt.onnx.quantization import quantize as mo_quantize
    except ImportError as e:
        raise QuantizationError("NVIDIA ModelOpt is not installed: `pip install \"nvidia-modelopt[onnx]\"` on the "
                                "GPU machine (or use the ONNX Runtime quantiser: --quant-tool ort, int8 only)") from e
    t0 = time.perf_counter()
    try:
        mo_quantize(str(src), quantize_mode=mode, calibration_data={k: np.asarray(v) for k, v in feeds.items()},
                    calibration_method=method, calibration_eps=list(calibration_eps),
                    nodes_to_exclude=list(exclude) or None, op_types_to_exclude=list(op_types_to_exclude) or None,
                    output_path=str(dst))
    except Exception as e:  # noqa: BLE001
        raise QuantizationError(f"{Path(src).name}: modelopt quantize ({mode}) failed: {type(e).__name__}: {e}") from e
    return {"tool": "modelopt", "version": getattr(modelopt, "__version__", "?"),
            "seconds": round(time.perf_counter() - t0, 2)}


def write_trt_calibration_table(src: str | os.PathLike, feeds: Mapping[str, np.ndarray], out_dir: str | os.PathLike,
                                settings: QuantSettings | None = None) -> list[Path]:
    """Per-tensor activation ranges of an fp32 graph as ONNX Runtime's TensorRT-EP INT8 calibration table
    (``calibration.flatbuffers``, ``calibration.cache``, ``calibration.json`` in ``out_dir``; set
    ``trt_int8_calibration_table_name`` to use it with the fp32 graph). The Q/DQ graphs do not need it.

    Raises:
        QuantizationError: the calibrator failed.
    """
    from onnxruntime.quantization import create_calibrator, write_calibration_table

    s = settings or QuantSettings()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        try:
            cal = create_calibrator(str(src), augmented_model_path=str(Path(tmp) / "aug.onnx"),
                                    calibrate_method=_ort_method(s))
            cal.collect_data(GraphDataReader(feeds, s.batch_size))
            write_calibration_table(cal.compute_data(), dir=str(out_dir))
        except Exception as e:  # noqa: BLE001
            raise QuantizationError(f"{Path(src).name}: calibration table failed: {type(e).__name__}: {e}") from e
    return [out_dir / n for n in ("calibration.flatbuffers", "calibration.cache", "calibration.json")]


def graph_errors(fp32: str | os.PathLike, quant: str | os.PathLike, feeds: Mapping[str, np.ndarray]) -> dict:
    """Quantised vs fp32 outputs of one graph on ``feeds`` (ONNX Runtime CPU).

    Returns:
        ``{"max_rel_err": max |q - f| / max |f|, "mean_rel_err": mean |q - f| / mean |f|, "cosine": min over
        samples and outputs of the cosine similarity of flattened outputs}``.
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    outs = []
    for p in (fp32, quant):
        sess = ort.InferenceSession(str(p), opts, providers=["CPUExecutionProvider"])
        outs.append(sess.run(None, {k: np.ascontiguousarray(v) for k, v in feeds.items()}))
    mx, mean, cos = 0.0, 0.0, 1.0
    for f, q in zip(*outs):
        f, q = f.astype(np.float64), q.astype(np.float64)
        d = np.abs(q - f)
        mx = max(mx, float(d.max() / max(np.abs(f).max(), 1e-12)))
        mean = max(mean, float(d.mean() / max(np.abs(f).mean(), 1e-12)))
        ff, qq = f.reshape(len(f), -1), q.reshape(len(q), -1)
        c = (ff * qq).sum(1) / np.maximum(np.linalg.norm(ff, axis=1) * np.linalg.norm(qq, axis=1), 1e-12)
        cos = min(cos, float(c.min()))
    return {"max_rel_err": mx, "mean_rel_err": mean, "cosine": cos}


# ---------------------------------------------------------------------------------------------- accuracy gate
#: Metrics the gate checks when present in the fp32 results.
GATE_METRICS = ("I-AUROC", "AUPRO")


@dataclass
class GateResult:
    """Outcome of :func:`accuracy_gate`.

    Attributes:
        accepted: True when no gated metric dropped by more than ``max_delta``.
        max_delta: the allowed drop (absolute, metric units in [0, 1]).
        deltas: ``{metric: quant - fp32}`` for each gated metric (negative = worse).
        reasons: one line per failed metric (empty when accepted).
    """

    accepted: bool
    max_delta: float
    deltas: dict[str, float]
    reasons: list[str]


def accuracy_gate(fp32: Mapping[str, float], quant: Mapping[str, float], max_delta: float = 0.02,
                  metrics: Sequence[str] = GATE_METRICS) -> GateResult:
    """Accept a quantised model when each gated metric is at most ``max_delta`` below fp32.

    The rule is one-sided: ``quant[m] >= fp32[m] - max_delta`` for every ``m`` in ``metrics`` that ``fp32`` has
    (AUPRO only exists with masks); an improvement is accepted and reported. A metric fp32 has but the quantised
    result lacks, or a non-finite value, rejects.

    Args:
        fp32, quant: metric dicts (``training.metrics.image_metrics`` / ``pixel_metrics`` keys).
        max_delta: allowed drop, >= 0.
    Raises:
        UsageError: negative ``max_delta``, or fp32 has none of the gated metrics.
    """
    if not max_delta >= 0:
        raise UsageError(f"max_delta must be >= 0, got {max_delta}")
    gated = [m for m in metrics if m in fp32]
    if not gated:
        raise UsageError(f"fp32 results have none of the gated metrics {list(metrics)}")
    deltas, reasons = {}, []
    for m in gated:
        f, q = float(fp32[m]), quant.get(m)
        if q is None or not np.isfinite(float(q)) or not np.isfinite(f):
            reasons.append(f"{m}: quantised value missing or not finite ({q})")
            continue
        deltas[m] = float(q) - f
        if deltas[m] < -max_delta - 1e-12:
            reasons.append(f"{m}: {float(q):.4f} is {-deltas[m]:.4f} below fp32 {f:.4f} (allowed {max_delta:g})")
    return GateResult(not reasons, float(max_delta), deltas, reasons)


def evaluate_engines(engines, config: GladConfig, data_root: str | os.PathLike, *, batch_size: int = 4,
                     max_test: int = 0, progress: Callable[[str], None] | None = None) -> dict:
    """I-AUROC (I-AP, I-F1max; AUPRO and P-AUROC with masks) and seconds per image of the pipeline on
    ``DATA/test``.

    Args:
        engines: any backend. data_root: MVTec-format category. max_test: at most this many test images, taken
            evenly from the sorted list (0 = all), the same subset for every call.
    Returns:
        metrics dict plus ``seconds_per_image``, ``test_images`` and ``scores`` (list, for score-shift checks).
    """
    from glad_runtime.detector import Detector
    from training.evaluate import score_category
    from training.metrics import image_metrics, pixel_metrics

    start = time.perf_counter()
    _, paths, labels, dets, masks = score_category(Detector(engines, config), data_root, max_test=max_test,
                                                   batch_size=batch_size, progress=bool(progress))
    seconds = (time.perf_counter() - start) / len(paths)
    scores = np.array([d.score for d in dets], np.float64)
    out = image_metrics(labels, scores)
    if masks is not None:
        out |= pixel_metrics(masks, np.stack([d.anomaly_map for d in dets]))
    return out | {"seconds_per_image": seconds, "test_images": len(paths), "scores": scores.tolist()}


def format_gate_table(report: dict) -> list[str]:
    """Printable lines: fp32 vs quantised I-AUROC, AUPRO, s/image, graph MB, and the verdict."""
    ev = report.get("evaluation") or {}
    f, q = ev.get("fp32", {}), ev.get("quant", {})
    prec = report.get("mode", "int8")

    def cell(d, k, fmt):
        return format(d[k], fmt) if k in d else "-"

    lines = [f"{'':<14} {'fp32':>10} {prec:>10} {'delta':>9}"]
    for k in ("I-AUROC", "AUPRO"):
        if k in f or k in q:
            dl = f"{q[k] - f[k]:+9.4f}" if k in f and k in q else f"{'-':>9}"
            lines.append(f"{k:<14} {cell(f, k, '10.4f'):>10} {cell(q, k, '10.4f'):>10} {dl}")
    if "seconds_per_image" in f:
        lines.append(f"{'s/image':<14} {f['seconds_per_image']:10.3f} {q['seconds_per_image']:10.3f} "
                     f"{q['seconds_per_image'] / f['seconds_per_image']:8.2f}x")
    sizes = report.get("sizes_mb", {})
    if sizes:
        lines.append(f"{'graphs MB':<14} {sizes.get('fp32', 0):10.2f} {sizes.get('quant', 0):10.2f} "
                     f"{sizes.get('quant', 0) / max(sizes.get('fp32', 1e-9), 1e-9):8.2f}x")
    for g, r in report.get("graphs", {}).items():
        lines.append(f"  {g:<12} {r['fp32_mb']:8.2f} MB -> {r['quant_mb']:6.2f} MB  max rel err "
                     f"{r['errors']['max_rel_err']:.3g}, mean rel err {r['errors']['mean_rel_err']:.3g}, "
                     f"cosine {r['errors']['cosine']:.4f}")
    gate = report.get("gate")
    if gate:
        verdict = "ACCEPTED" if gate["accepted"] else "REJECTED"
        lines.append(f"gate (max drop {gate['max_delta']:g}): {verdict}" +
                     ("" if gate["accepted"] else "; " + "; ".join(gate["reasons"])))
    return lines


# ---------------------------------------------------------------------------------------------- whole bundle
def quantize_bundle(bundle: Bundle, images: Iterable[np.ndarray], *, names: Sequence[str] = (),
                    graphs: Sequence[str] | None = None, mode: str = "int8", tool: str = "ort",
                    settings: QuantSettings | None = None, eval_data: str | os.PathLike | None = None,
                    max_delta: float = 0.02, eval_max: int = 0, batch_size: int = 4, threads: int = 0,
                    save_calibration: str | os.PathLike | None = None,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Record calibration inputs, quantise the chosen graphs into the bundle, check them, gate them.

    Args:
        bundle: an exported bundle (``glad export``, fp32 graphs).
        images: preprocessed normal-image batches ``[b,3,R,R]`` (not the test set).
        names: their file names (recorded in the report).
        graphs: graphs to quantise (default all the bundle uses); the others stay fp32.
        mode: ``int8`` (ONNX Runtime or ModelOpt) or ``fp8`` (ModelOpt only).
        tool: ``ort`` (ONNX Runtime ``quantize_static``, runs anywhere) or ``modelopt`` (NVIDIA, GPU machine).
        settings: ORT :class:`QuantSettings` (its ``method`` maps to ModelOpt ``max``/``entropy`` for modelopt).
        eval_data: MVTec-format category: run the accuracy gate on its test split (fp32 vs quantised pipeline).
        max_delta: allowed drop of I-AUROC / AUPRO.
        eval_max: at most this many test images for the gate (0 = all).
        save_calibration: folder for the recorded inputs (``<graph>.npz``), e.g. for ModelOpt on another machine.
    Returns:
        the report (also ``onnx/quantize.json``, recorded in the manifest): settings, per-graph excluded nodes,
        errors and sizes, the evaluation and the gate. When the gate rejects, the quantised files are deleted and
        ``report["gate"]["accepted"]`` is False (the caller exits non-zero).
    Raises:
        BundleError: the bundle fails its checksums or lacks fp32 graphs.
        QuantizationError: bad mode/tool/graph names, no images, a quantiser failure (nothing is kept then).
    """
    from glad_runtime.engines import exported_graphs as graph_names
    from glad_runtime.engines.ort import OrtEngines

    say = progress or (lambda m: None)
    s = settings or QuantSettings()
    cfg = bundle.config
    if mode not in ("int8", "fp8"):
        raise QuantizationError(f"mode must be int8 or fp8, got {mode!r}")
    if tool not in ("ort", "modelopt"):
        raise QuantizationError(f"tool must be 'ort' or 'modelopt', got {tool!r}")
    if mode == "fp8" and tool != "modelopt":
        raise QuantizationError("fp8 Q/DQ graphs come from NVIDIA ModelOpt: use --quant-tool modelopt (GPU machine)")
    available = graph_names(cfg)
    wanted = list(graphs or available)
    unknown = [g for g in wanted if g not in available]
    if unknown:
        raise QuantizationError(f"unknown graphs {unknown}; this bundle uses {available}")
    # verify everything but the files this run replaces (a modified weight or graph is refused, never re-hashed)
    ours = [f"onnx/{g}.{mode}.onnx" for g in available] + [QUANT_REPORT]
    bundle.verify(exclude=tuple(ours))
    fp32 = OrtEngines(bundle, "fp32", intra_op_threads=threads, verify=False)
    say(f"recording calibration inputs (fp32 graphs {fp32.graphs})")
    t0 = time.perf_counter()
    cset = record_calibration(fp32, cfg, images, names=names, progress=say)
    record_s = time.perf_counter() - t0
    if save_calibration:
        cset.save(save_calibration)
    if not graphs:  # default: the graphs this config's loop calls (dino_ads only with ADS on)
        wanted = [g for g in available if cset.samples(g) > 0]
    # previous quantised files of this mode are replaced as a set
    for g in available:
        quantized_path(bundle, g, mode).unlink(missing_ok=True)
    bundle.update_manifest([f"onnx/{g}.{mode}.onnx" for g in available])  # drop the removed files' entries
    report = {"mode": mode, "tool": tool, "settings": asdict(s), "graphs_requested": wanted,
              "calibration": {"images": len(cset.images), "samples": {g: cset.samples(g) for g in cset.feeds},
                              "calls": cset.calls, "record_s": round(record_s, 1)},
              "graphs": {}, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    written: list[Path] = []
    try:
        for g in wanted:
            if cset.samples(g) == 0:
                raise QuantizationError(f"{g}: the loop never called it on the calibration images")
            calib, check = cset.split(g)
            src, dst = bundle.file(f"onnx/{g}.onnx"), quantized_path(bundle, g, mode)
            say(f"quantising {g} ({tool} {mode}, {s.method}, {len(next(iter(calib.values())))} samples)")
            if tool == "ort":
                info = quantize_graph(src, dst, calib, s)
            else:
                import onnx

                excl = nodes_to_exclude(onnx.load(str(src), load_external_data=False), s.op_types,
                                        s.exclude_first_last, s.exclude_nodes)
                info = quantize_graph_modelopt(src, dst, calib, mode=mode, exclude=excl,
                                               method="max" if s.method == "minmax" else "entropy")
                info["excluded"] = excl
            written.append(dst)
            check = check if check and len(next(iter(check.values()))) else calib
            errs = graph_errors(src, dst, check) if mode == "int8" or tool == "ort" else {}
            report["graphs"][g] = info | {"file": f"onnx/{dst.name}", "errors": errs,
                                          "fp32_mb": round(src.stat().st_size / 1e6, 3),
                                          "quant_mb": round(dst.stat().st_size / 1e6, 3)}
            log.info("%s: %s", g, report["graphs"][g])
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    all_fp32 = sum(bundle.file(f"onnx/{g}.onnx").stat().st_size for g in available)
    mixed = sum((quantized_path(bundle, g, mode) if g in wanted else bundle.file(f"onnx/{g}.onnx")).stat().st_size
                for g in available)
    report["sizes_mb"] = {"fp32": round(all_fp32 / 1e6, 3), "quant": round(mixed / 1e6, 3)}
    bundle.update_manifest([f"onnx/{p.name}" for p in written])
    if eval_data is not None and mode == "int8":
        say("gate: evaluating fp32")
        ev32 = evaluate_engines(fp32, cfg, eval_data, batch_size=batch_size, max_test=eval_max, progress=say)
        q = OrtEngines(bundle, "int8", intra_op_threads=threads)
        say(f"gate: evaluating int8 ({q.graph_precisions})")
        evq = evaluate_engines(q, cfg, eval_data, batch_size=batch_size, max_test=eval_max, progress=say)
        s32, sq = np.asarray(ev32.pop("scores")), np.asarray(evq.pop("scores"))
        gate = accuracy_gate(ev32, evq, max_delta)
        report["evaluation"] = {"data": str(Path(eval_data).resolve()), "fp32": ev32, "quant": evq,
                                "graph_precisions": q.graph_precisions,
                                "score_shift": {"mean_abs": float(np.abs(sq - s32).mean()),
                                                "mean_rel": float(np.abs(sq - s32).mean() / max(np.abs(s32).mean(),
                                                                                                1e-12))}}
        report["gate"] = asdict(gate)
        if not gate.accepted:
            for p in written:
                p.unlink(missing_ok=True)
            report["rejected_files"] = [f"onnx/{p.name}" for p in written]
            bundle.update_manifest([f"onnx/{p.name}" for p in written])  # drops their entries
    elif eval_data is not None:
        report["gate"] = None
        report["note"] = "fp8 graphs are checked on the GPU (glad build --precision fp8, then glad eval --engine tensorrt)"
    path = bundle.file(QUANT_REPORT)
    path.write_text(json.dumps(report, indent=2, default=float))
    bundle.update_manifest([QUANT_REPORT])
    return report
