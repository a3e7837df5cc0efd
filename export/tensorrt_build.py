"""``glad build``: TensorRT 10 engines from a bundle's ONNX graphs, keyed, timing-cached and refittable.

Follows TensorRT's demoDiffusion (deployment-anchors.md 1b): strongly typed networks (the precision comes from the
ONNX graph: ``<g>.fp16.onnx`` for fp16, Q/DQ graphs for int8 / fp8), builder optimisation level 3, one optimisation
profile per engine, static shapes by default (fastest; the batch is fixed too unless a ``min:opt:max`` batch range
is given), a timing cache file reused across builds on the same GPU model, and refittable engines so that a new
category's weights (same architecture, new ``glad export``) refit an existing engine instead of rebuilding it.

Engines go to ``BUNDLE/engines/<slug>.plan`` with a JSON sidecar holding the
:class:`~glad_runtime.engines.trt.EngineKey`; ``glad_runtime.engines.trt.find_engine`` refuses an engine built for
another GPU model, TensorRT version, precision or graph structure.

The pure logic (profiles, keys, graph signatures, refit plans) runs anywhere and is tested on CPU; building and
refitting need a CUDA GPU and ``pip install -e .[tensorrt]``.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from glad_runtime.core.bundle import Bundle
from glad_runtime.engines.trt import (EngineKey, GpuInfo, PRECISIONS, TensorRTUnavailable, current_gpu, onnx_source,
                                     optimization_profile, tensorrt_version)
from glad_runtime.errors import ExportError, RefitError, UsageError  # noqa: F401 (re-exported)

__all__ = ["graph_signature", "refit_plan", "RefitError", "BuildResult", "build_engine", "build_bundle",
           "refit_engine", "parse_batch"]


def parse_batch(text: str | int) -> tuple[int, int, int]:
    """``"8"`` -> (8, 8, 8) static; ``"1:4:16"`` -> (1, 4, 16) dynamic.

    Raises:
        UsageError: malformed text or min <= opt <= max violated.
    """
    try:
        parts = [int(p) for p in str(text).split(":")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts *= 3
    if len(parts) != 3 or not 1 <= parts[0] <= parts[1] <= parts[2]:
        raise UsageError(f"batch must be N or MIN:OPT:MAX with 1 <= MIN <= OPT <= MAX, got {text!r}")
    return parts[0], parts[1], parts[2]


def _structure(model) -> tuple[list, dict]:
    import onnx

    nodes = []
    for n in model.graph.node:
        attrs = sorted((a.name, onnx.helper.get_attribute_value(a) if a.type != onnx.AttributeProto.TENSOR
                        else ("tensor", tuple(a.t.dims), a.t.data_type)) for a in n.attribute)
        nodes.append((n.op_type, tuple(n.input), tuple(n.output), repr(attrs)))
    inits = {i.name: (tuple(i.dims), i.data_type) for i in model.graph.initializer}
    return nodes, inits


def graph_signature(model) -> str:
    """sha256 (16 hex) of a graph's structure: nodes (op, edges, attributes), initializer names, shapes and dtypes,
    graph inputs/outputs; weight values excluded. Equal signatures mean an engine can be refitted with the other
    graph's weights. Accepts an ``onnx.ModelProto`` or a path (external data is not loaded)."""
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    nodes, inits = _structure(model)
    io = [(v.name, str(v.type)) for v in list(model.graph.input) + list(model.graph.output)]
    blob = json.dumps([nodes, sorted(inits.items()), io], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def refit_plan(old, new) -> list[str]:
    """Initializers whose values differ between the engine's source graph and a new export of the same architecture.

    Args:
        old, new: ``onnx.ModelProto`` (with weights loaded) or paths.
    Returns:
        sorted names of the initializers to refit (empty: nothing changed).
    Raises:
        RefitError: the structures differ (another architecture, opset, exporter or resolution), naming the first
            differences; the engine must be rebuilt.
    """
    import numpy as np
    import onnx
    from onnx import numpy_helper

    if not isinstance(old, onnx.ModelProto):
        old = onnx.load(str(old))
    if not isinstance(new, onnx.ModelProto):
        new = onnx.load(str(new))
    (n_old, i_old), (n_new, i_new) = _structure(old), _structure(new)
    problems = []
    if len(n_old) != len(n_new) or n_old != n_new:
        diff = next((k for k, (a, b) in enumerate(zip(n_old, n_new)) if a != b), min(len(n_old), len(n_new)))
        problems.append(f"graph nodes differ (counts {len(n_old)} vs {len(n_new)}, first difference at node {diff})")
    for name in sorted(set(i_old) ^ set(i_new))[:5]:
        problems.append(f"initializer {name!r} only in the {'old' if name in i_old else 'new'} graph")
    for name in sorted(set(i_old) & set(i_new)):
        if i_old[name] != i_new[name]:
            problems.append(f"initializer {name!r}: shape/dtype {i_old[name]} -> {i_new[name]}")
            if len(problems) > 8:
                break
    if problems:
        raise RefitError("cannot refit, rebuild the engine: " + "; ".join(problems))
    old_vals = {i.name: i for i in old.graph.initializer}
    return sorted(i.name for i in new.graph.initializer
                  if not np.array_equal(numpy_helper.to_array(i), numpy_helper.to_array(old_vals[i.name])))


@dataclass
class BuildResult:
    """One built (or reused) engine."""

    graph: str
    path: Path
    key: EngineKey
    seconds: float
    reused: bool


def _logger():
    import tensorrt as trt

    return trt.Logger(trt.Logger.WARNING)


def build_engine(onnx_path: Path, profile: dict, *, refittable: bool = True, timing_cache: Path | None = None,
                 workspace_gb: float = 8.0, optimization_level: int = 3) -> bytes:
    """Build a serialized TensorRT engine from an ONNX file (TensorRT 10 Python API).

    Strongly typed network (precisions from the graph), one optimisation profile, ``REFIT`` when ``refittable``,
    a timing cache loaded from and saved back to ``timing_cache``.

    Raises:
        TensorRTUnavailable: no TensorRT.
        ExportError: the parser errors (each listed) or a failed build.
    """
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed: `pip install -e .[tensorrt]` on a GPU machine") from e
    logger = _logger()
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ExportError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    config.builder_optimization_level = int(optimization_level)
    if refittable:
        config.set_flag(trt.BuilderFlag.REFIT)
    opt_profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in profile.items():
        opt_profile.set_shape(name, lo, opt, hi)
    config.add_optimization_profile(opt_profile)
    cache = None
    if timing_cache is not None:
        blob = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(blob)
        config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise ExportError(f"TensorRT build failed for {onnx_path} (see the log above)")
    if cache is not None:
        Path(timing_cache).parent.mkdir(parents=True, exist_ok=True)
        Path(timing_cache).write_bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(plan)


def build_bundle(bundle: Bundle, precision: str = "fp16", *, batch: tuple[int, int, int] = (1, 1, 1),
                 graphs: Sequence[str] | None = None, refittable: bool = True, timing_cache: Path | None = None,
                 workspace_gb: float = 8.0, gpu_index: int = 0, force: bool = False,
                 refit_from: Bundle | None = None,
                 progress: Callable[[str], None] | None = None) -> list[BuildResult]:
    """Build (or reuse) one engine per graph of the bundle for this GPU and TensorRT version.

    An engine with an equal key already in ``engines/`` is reused unless ``force``. With ``refit_from`` (another
    category's bundle of the same architecture), an engine there with an equal key (same graph signature, GPU,
    TensorRT, precision, profile) is copied and refitted with this bundle's weights: seconds instead of minutes. The default timing cache is
    ``BUNDLE/engines/timing-<gpu>-trt<version>.cache`` (per GPU model, as TensorRT recommends).

    Raises:
        TensorRTUnavailable: no GPU / TensorRT (clear message, before any work).
        BundleError: the ONNX graphs are missing (run ``glad export``; int8/fp8 need quantised graphs).
        UsageError: unknown precision.
    """
    import onnx

    if precision not in PRECISIONS:
        raise UsageError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    gpu: GpuInfo = current_gpu(gpu_index)
    version = tensorrt_version()
    say = progress or (lambda m: None)
    bundle.verify(prefix="onnx/")
    report = json.loads(bundle.file("onnx/export.json").read_text()) if bundle.file("onnx/export.json").is_file() \
        else {"graphs": []}
    wanted = list(graphs or sorted({g["graph"] for g in report["graphs"]}))
    edir = bundle.file("engines")
    edir.mkdir(parents=True, exist_ok=True)
    if timing_cache is None:
        slug = "".join(c if c.isalnum() else "-" for c in gpu.name.lower())
        timing_cache = edir / f"timing-{slug}-trt{version}.cache"
    results = []
    for g in wanted:
        src = onnx_source(bundle, g, precision)
        model = onnx.load(str(src), load_external_data=False)
        inputs = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.input}
        profile = optimization_profile(inputs, batch)
        key = EngineKey(graph=g, precision=precision, gpu=gpu.name, compute_capability=gpu.compute_capability,
                        trt_version=version, profile=tuple((n, *p) for n, p in profile.items()),
                        onnx_signature=graph_signature(model))
        plan_path = edir / f"{key.slug()}.plan"
        if plan_path.is_file() and not force:
            say(f"{g}: engine up to date ({plan_path.name})")
            results.append(BuildResult(g, plan_path, key, 0.0, True))
            continue
        t0 = time.perf_counter()
        donor = _refit_donor(refit_from, key) if refit_from is not None else None
        if donor is not None:
            say(f"{g}: refitting {donor.name} from {refit_from.path} with {src.name}")
            plan_path.write_bytes(donor.read_bytes())
            refit_engine(plan_path, src)
        else:
            say(f"{g}: building {precision} engine from {src.name} (batch {batch})")
            plan = build_engine(src, profile, refittable=refittable, timing_cache=timing_cache,
                                workspace_gb=workspace_gb)
            plan_path.write_bytes(plan)
        plan_path.with_suffix(".json").write_text(json.dumps(
            {"key": key.to_dict(), "source": f"onnx/{src.name}", "refittable": refittable,
             "refitted_from": str(donor) if donor is not None else None,
             "built": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, indent=2))
        results.append(BuildResult(g, plan_path, key, time.perf_counter() - t0, False))
    bundle.update_manifest([f"engines/{p.name}" for p in edir.iterdir() if p.is_file()])
    return results


def _refit_donor(other: Bundle, key: EngineKey) -> Path | None:
    """A refittable engine of ``other`` with exactly this key, if any."""
    from glad_runtime.engines.trt import stored_keys

    for path, k in stored_keys(other):
        meta = json.loads(path.with_suffix(".json").read_text())
        if k == key and meta.get("refittable"):
            return path
    return None


def refit_engine(plan_path: Path, new_onnx: Path, old_onnx: Path | None = None) -> int:
    """Refit a refittable engine in place with the weights of ``new_onnx`` (same architecture).

    With ``old_onnx`` (the engine's source graph) the structures are compared first (:func:`refit_plan`) and only
    a changed-weights count is reported; TensorRT's ``OnnxParserRefitter`` then maps initializers by name.

    Returns:
        the number of initializers that changed (from :func:`refit_plan`, or -1 when ``old_onnx`` is not given).
    Raises:
        RefitError: structures differ, the engine is not refittable, or TensorRT reports missing weights.
        TensorRTUnavailable: no GPU / TensorRT.
    """
    changed = len(refit_plan(old_onnx, new_onnx)) if old_onnx is not None else -1
    try:
        import tensorrt as trt
    except ImportError as e:
        raise TensorRTUnavailable("TensorRT is not installed: `pip install -e .[tensorrt]` on a GPU machine") from e
    logger = _logger()
    engine = trt.Runtime(logger).deserialize_cuda_engine(Path(plan_path).read_bytes())
    if engine is None:
        raise RefitError(f"{plan_path}: cannot deserialize (another GPU or TensorRT version?)")
    if not engine.refittable:
        raise RefitError(f"{plan_path}: engine was built without REFIT; rebuild with `glad build --refittable`")
    refitter = trt.Refitter(engine, logger)
    parser_refitter = trt.OnnxParserRefitter(refitter, logger)
    if not parser_refitter.refit_from_file(str(new_onnx)):
        errors = [str(parser_refitter.get_error(i)) for i in range(parser_refitter.num_errors)]
        raise RefitError(f"refit from {new_onnx} failed: {errors}")
    if not refitter.refit_cuda_engine():
        raise RefitError(f"refit of {plan_path} failed; missing weights: {refitter.get_missing_weights()}")
    Path(plan_path).write_bytes(memoryview(engine.serialize()))
    return changed
