"""Generate a Triton model repository from a GLAD bundle (``glad serve BUNDLE --repo DIR``).

Per bundle, under a model-name prefix (default :func:`glad_runtime.engines.triton.default_model_prefix`, so several
categories share one server), the repository gets:

======================================  ==========================================================================
model                                   what
======================================  ==========================================================================
``<p>_unet``, ``<p>_vae_encoder``,      one model per exported network. ``target="cpu"``: python backend running
``<p>_vae_decoder``, ``<p>_dino``,      ONNX Runtime on the graph (``python/ort_model.py``; Triton's native ORT
``<p>_dino_ads`` (ADS at another size)  backend is not shipped for CPU); ``target="gpu"``: ``onnxruntime_onnx``, or
                                        ``tensorrt_plan`` where ``glad build`` stored an engine of the precision.
                                        Inputs/outputs, dtypes and dims are read from the exported ONNX graphs.
``<p>_glad``                            python-backend BLS model: the whole ADS/SAFF loop server-side
                                        (``python/glad_model.py``), one request per batch of images.
``<p>_glad_inflight``                   decoupled python-backend model (``python/glad_inflight_model.py``):
                                        the same contract, requests joining one step-level in-flight pool
                                        (``inflight=False``: not written).
======================================  ==========================================================================

Files: the graph goes into the version directory as ``model.onnx`` (``model.plan``), as a **hard link** to the
bundle's file when the repository is on the same file system (no extra disk, identical bytes), otherwise a copy;
the repository is self-contained either way (the bundle can move; regenerate after re-exporting). External
weights (``<graph>.onnx.data``) are linked beside it under their own name.

Batching: ``max_batch`` is the number of images of one ``<p>_glad`` request; the network models take
``2 * max_batch`` because ADS decodes and featurises both estimates of every undecided image in one call. Every
network model has dynamic batching (``max_queue_delay_microseconds``, ``preferred_batch_size``, and a
``default_queue_policy`` that rejects requests whose timeout passed in the queue, :func:`queue_policy`) and an
``instance_group``. ``parameters`` of every model carry ``bundle_checksum`` (:meth:`Bundle.checksum`),
``model_version`` (the version directory), ``glad_version``, ``preset`` and the graph's ``sha256``.

Versions (issue 16, rollouts): re-serving a *different* bundle under a prefix writes a new version directory
``N+1`` beside ``N`` instead of rewriting ``N`` in place (:func:`next_version`; the same bundle again rewrites its
own version); directories older than ``N`` are removed. Network models keep the two newest versions loaded
(``version_policy: { latest { num_versions: 2 } }``), the BLS model and the ensemble serve the newest one, and the
BLS model of version ``N`` calls the network models of version ``N`` (pinned, as the ensemble's steps are), so
during a rollout (:func:`triton_models.server.rollout`) an image never mixes networks of two bundles. The
config.pbtxt is per model, not per version: a new version must keep the tensor shapes (same preset); another
preset needs another prefix. Network models get a ``model_warmup`` (zero inputs, batch 1 and the full batch), so
the first request after a load does not pay ONNX Runtime's first-run cost.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from glad_runtime.core.bundle import Bundle, BundleError, sha256_file
from glad_runtime.engines import network_graphs
from glad_runtime.serving import protocol
from glad_runtime.serving.protocol import TensorSpec
from glad_runtime.engines.triton import default_model_prefix
from glad_runtime.errors import UsageError

__all__ = ["TensorSpec", "onnx_io", "generate_repository", "model_names", "queue_policy", "next_version",
           "served_versions", "TARGETS", "PYTHON_MODELS"]

TARGETS = ("cpu", "gpu")
#: The python-backend model sources copied into the repository as ``model.py``.
PYTHON_MODELS = Path(__file__).parent / "python"
#: Models earlier generators wrote under a prefix and nothing called at run time (issue 29, item 6: the
#: ``recon_features`` ensemble, latents -> decoder -> ``resize`` -> dino, and its python resize step); removed from
#: a repository when it is regenerated.
RETIRED_MODELS = ("recon_features", "resize")

_ONNX_TYPES = {1: "TYPE_FP32", 2: "TYPE_UINT8", 3: "TYPE_INT8", 6: "TYPE_INT32", 7: "TYPE_INT64", 9: "TYPE_BOOL",
               10: "TYPE_FP16", 11: "TYPE_FP64"}


def onnx_io(path: str | os.PathLike) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Inputs and outputs of an ONNX graph as Triton tensor specs (weights are not loaded).

    Raises:
        BundleError: the first dimension of a tensor is not a dynamic batch, or an unsupported element type.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}

    def spec(v) -> TensorSpec:
        t = v.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in t.shape.dim]
        if not dims or dims[0] != -1:
            raise BundleError(f"{path}: {v.name} has no dynamic batch dimension ({dims}); re-export with glad export")
        if t.elem_type not in _ONNX_TYPES:
            raise BundleError(f"{path}: {v.name} has unsupported element type {t.elem_type}")
        return TensorSpec(v.name, _ONNX_TYPES[t.elem_type], tuple(dims[1:]))

    return [spec(v) for v in model.graph.input if v.name not in inits], [spec(v) for v in model.graph.output]


def served_versions(repo: str | os.PathLike, model: str) -> dict[int, str | None]:
    """``{version: bundle_checksum or None}`` of the version directories of ``model`` in ``repo`` (the checksum
    each version was generated from, read from its ``version.json``; None for repositories older than that)."""
    out: dict[int, str | None] = {}
    mdir = Path(repo) / model
    if not mdir.is_dir():
        return out
    for d in mdir.iterdir():
        if d.is_dir() and d.name.isdigit():
            try:
                out[int(d.name)] = json.loads((d / "version.json").read_text()).get("bundle_checksum")
            except (OSError, ValueError):
                out[int(d.name)] = None
    return out


def next_version(repo: str | os.PathLike, prefix: str, checksum: str) -> int:
    """The version to write a bundle with ``checksum`` under ``prefix``: the version already generated from the
    same bundle (regenerated in place), else one above the newest (1 for a new prefix)."""
    versions = served_versions(repo, protocol.model_name(prefix))
    same = [v for v, c in versions.items() if c == checksum]
    if same:
        return max(same)
    return max(versions, default=0) + 1


def _warmup(specs: list[TensorSpec], batch: int) -> str:
    """``model_warmup`` with zero inputs at batch 1 and ``batch`` (empty when a dimension is dynamic)."""
    if any(d < 0 for s in specs for d in s.dims):
        return ""
    sizes = sorted({1, int(batch)})
    blocks = []
    for n in sizes:
        ins = "".join(f'    inputs {{ key: "{s.name}" value: {{ data_type: {s.data_type} '
                      f'dims: {list(s.dims) if s.dims else [1]} zero_data: true }} }}\n' for s in specs)
        blocks.append(f'  {{ name: "zeros_b{n}" batch_size: {n}\n{ins}  }}')
    return "model_warmup [\n" + ",\n".join(blocks) + "\n]\n"


def _version_policy(keep: int) -> str:
    return f"version_policy: {{ latest {{ num_versions: {int(keep)} }} }}\n"


def _graphs(bundle: Bundle) -> list[str]:
    """The networks served for a bundle (the graphs ``glad export`` writes; ``dino_ads`` only when ADS runs at
    another size; ``ads_check``, the fused ADS check, with ADS on when the bundle has it: a client-side loop then
    receives one distance map per check instead of two decodes and their tokens)."""
    config = bundle.config
    names = network_graphs(config)
    if config.ads_enabled and bundle.file("onnx/ads_check.onnx").is_file():
        names.append("ads_check")
    return names


def model_names(bundle: Bundle, prefix: str | None = None, inflight: bool = True) -> list[str]:
    """The model names :func:`generate_repository` writes for ``bundle`` (prefix default from its folder;
    ``inflight``: with ``<prefix>_glad_inflight``)."""
    p = prefix or default_model_prefix(bundle)
    extra = [protocol.GLAD_MODEL] + ([protocol.INFLIGHT_MODEL] if inflight else [])
    return [f"{p}_{n}" for n in _graphs(bundle) + extra]


def _params(d: dict[str, object]) -> str:
    items = [f'  {{ key: "{k}" value: {{ string_value: {json.dumps(str(v))} }} }}' for k, v in d.items()]
    return "parameters [\n" + ",\n".join(items) + "\n]\n"


def _io(kind: str, specs: list[TensorSpec], batched: bool = True) -> str:
    return f"{kind} [\n" + ",\n".join("  " + s.pbtxt(batched) for s in specs) + "\n]\n"


def _link(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists():
        dst.unlink()
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def queue_policy(timeout_us: int = 0) -> str:
    """The ``default_queue_policy`` block of every generated dynamic batcher (issue 16, deadlines).

    A request still queued when its timeout passes is rejected there (``timeout_action: REJECT``: the client
    gets UNAVAILABLE "Request timeout expired", no work is done for it); each request may bring its own timeout
    (``allow_timeout_override``: Triton's request timeout, gRPC ``infer(..., timeout=microseconds)``), and
    ``timeout_us`` is the timeout of requests that bring none (0: none, they wait as long as it takes).
    """
    return ("  default_queue_policy {\n    timeout_action: REJECT\n"
            f"    default_timeout_microseconds: {int(timeout_us)}\n    allow_timeout_override: true\n  }}\n")


def _batching(max_batch: int, delay_us: int, timeout_us: int = 0) -> str:
    preferred = sorted({b for b in (max_batch // 2, max_batch) if b >= 1})
    return (f"dynamic_batching {{\n  preferred_batch_size: {preferred}\n"
            f"  max_queue_delay_microseconds: {int(delay_us)}\n" + queue_policy(timeout_us) + "}\n")


def _instances(count: int, kind: str) -> str:
    return f"instance_group [ {{ count: {int(count)} kind: {kind} }} ]\n"


def _plan_for(bundle: Bundle, graph: str, precision: str, max_batch: int) -> Path | None:
    """A stored TensorRT engine of this graph / precision admitting ``max_batch`` (largest batch wins)."""
    from glad_runtime.engines.trt import stored_keys

    fits = [(p, k) for p, k in stored_keys(bundle) if k.graph == graph and k.precision == precision
            and k.max_batch >= max_batch]
    return max(fits, key=lambda pk: pk[1].max_batch)[0] if fits else None


def generate_repository(bundle: Bundle | str | os.PathLike, repo: str | os.PathLike, *, target: str = "cpu",
                        prefix: str | None = None, max_batch: int = 8, instances: int = 1, glad_instances: int = 2,
                        queue_delay_us: int = 500, precision: str = "fp32", version: int | None = None,
                        intra_op_threads: int = 0, queue_timeout_us: int = 0, warmup: bool = True,
                        inflight: bool = True, inflight_max_active: int | None = None,
                        inflight_max_queue: int | None = None, inflight_overlap: bool | None = None,
                        max_image_pixels: int | None = None) -> list[str]:
    """Write (or replace) the models of one bundle in a Triton model repository.

    Args:
        bundle: an exported bundle (``glad export``); its ``onnx/`` and config are verified against the manifest.
        repo: the repository folder (created; models of other prefixes in it are left alone).
        target: ``"cpu"`` (python backend + ONNX Runtime, runs with the ``nvidia-pytriton`` server) or ``"gpu"``
            (native ``onnxruntime_onnx`` / ``tensorrt_plan`` models, for a full Triton install).
        prefix: model-name prefix (default from the bundle folder name).
        max_batch: images per entry-model request (the ``max_images`` parameter: more is refused whole); the
            network models take twice as many per call.
        instances: instances per network model; glad_instances: instances of the BLS model (default 2: each
            request is one execution, so two requests run side by side and their network calls batch together).
        max_image_pixels: the entry models' pixel limit per image (default the bundle's ``max_image_pixels``).
        queue_delay_us: dynamic batcher ``max_queue_delay_microseconds`` of every model.
        precision: ``fp32`` or ``fp16`` graphs (``onnx/<g>.fp16.onnx``; fp32 I/O either way).
        version: the model version directory (also in ``parameters``); None (default): :func:`next_version`,
            a new version beside the served one for a different bundle, the same one for the same bundle.
        intra_op_threads: ONNX Runtime threads per instance (cpu target); 0 (default): the cores the server process
            may use divided among the model's instances, computed where the model loads
            (:func:`glad_runtime.core.cpus.threads_for`). Measured on 2 cores (tiny bundle, ADS on): the per-batch
            model's capacity 1.87-1.94 images/s with 0 (2 threads, not spinning) against 1.20 with 1.
        queue_timeout_us: ``default_timeout_microseconds`` of every model's queue policy (:func:`queue_policy`):
            the timeout of requests that send none (0: none); a request's own timeout always applies.
        warmup: give the network models a ``model_warmup`` (zero inputs at batch 1 and the full batch).
        inflight: also write ``<prefix>_glad_inflight`` (issue 17), with ``inflight_max_active`` images in flight
            (default and upper bound ``max_batch``: an ADS check sends two images per undecided one to the
            network models) and ``inflight_max_queue`` waiting (default ``4 * max_batch``); past both, requests
            are refused at once (UNAVAILABLE, retryable). ``inflight_overlap``: its ticks admit and finish images
            beside the denoising step (``StepScheduler(overlap=True)``); None (default): only when the network
            models run one thread each (``intra_op_threads=1``), where the overlap puts the other cores to work
            (measured on 2 cores at 70% load, p99 against the per-batch model: 0.66x with one thread, overlap on;
            with threads from the cores, 1.34x with overlap, 1.22x without).
    Returns:
        the model names written.
    Raises:
        BundleError: graphs missing (run ``glad export``) or modified since export, or not batchable.
        UsageError: unknown target / precision, max_batch < 1, bad in-flight limits or version.
    """
    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    if target not in TARGETS:
        raise UsageError(f"target must be one of {TARGETS}, got {target!r}")
    if precision not in ("fp32", "fp16"):
        raise UsageError(f"precision must be fp32 or fp16, got {precision!r}")
    if max_batch < 1:
        raise UsageError("max_batch must be >= 1")
    if queue_timeout_us < 0:
        raise UsageError("queue_timeout_us must be >= 0")
    overlap = intra_op_threads == 1 if inflight_overlap is None else bool(inflight_overlap)
    max_active = max_batch if inflight_max_active is None else int(inflight_max_active)
    max_queue = 4 * max_batch if inflight_max_queue is None else int(inflight_max_queue)
    if not 1 <= max_active <= max_batch or max_queue < 0:
        raise UsageError(f"inflight_max_active must be in [1, max_batch={max_batch}] and inflight_max_queue >= 0, "
                         f"got {max_active}, {max_queue}")
    cfg = b.config
    p = prefix or default_model_prefix(b)
    graphs = _graphs(b)
    suffix = "" if precision == "fp32" else ".fp16"
    sources = {g: b.file(f"onnx/{g}{suffix}.onnx") for g in graphs}
    absent = [s.name for s in sources.values() if not s.is_file()]
    if absent:
        raise BundleError(f"{b.path}: no exported graphs {absent}; run `glad export {b.path}` first")
    rel = [f"onnx/{s.name}" for s in sources.values()]
    rel += [r + ".data" for r in rel if b.file(r + ".data").is_file()]
    b.verify(prefix="onnx/", required=rel)
    b.verify(prefix="config.json")
    from glad_runtime import __version__

    checksum = b.checksum()
    if version is None:
        version = next_version(repo, p, checksum)
    if version < 1:
        raise UsageError("version must be >= 1")
    common = {"bundle_checksum": checksum, "model_version": version, "glad_version": __version__,
              "preset": cfg.preset}
    repo = Path(repo)
    repo.mkdir(parents=True, exist_ok=True)
    for name in model_names(b, p, inflight):  # keep the version before this one (still serving during a rollout)
        for v in served_versions(repo, name):
            if v == version or v < version - 1:
                shutil.rmtree(repo / name / str(v), ignore_errors=True)
    for retired in RETIRED_MODELS:  # an older generator's models: their ensemble would outlive its steps' versions
        shutil.rmtree(repo / f"{p}_{retired}", ignore_errors=True)

    def new_version_dir(name: str) -> Path:
        d = repo / name / str(version)
        d.mkdir(parents=True)
        (d / "version.json").write_text(json.dumps({"bundle_checksum": checksum, "version": version,
                                                    "bundle": str(b.path)}) + "\n")
        return d
    net_batch = 2 * max_batch
    io = {g: onnx_io(src) for g, src in sources.items()}
    written = []
    for g in graphs:
        name = f"{p}_{g}"
        vdir = new_version_dir(name)
        ins, outs = io[g]
        params = dict(common, graph=g, precision=precision, sha256=sha256_file(sources[g]))
        data_file = sources[g].with_name(sources[g].name + ".data")
        if data_file.is_file():
            params["sha256_data"] = sha256_file(data_file)
        plan = _plan_for(b, g, precision, net_batch) if target == "gpu" else None
        if target == "cpu":
            head = f'name: "{name}"\nbackend: "python"\n'
            params["intra_op_threads"] = intra_op_threads
            shutil.copy(PYTHON_MODELS / "ort_model.py", vdir / "model.py")
            kind = "KIND_CPU"
        elif plan is not None:
            head = f'name: "{name}"\nplatform: "tensorrt_plan"\ndefault_model_filename: "model.plan"\n'
            params["engine"] = plan.name
            kind = "KIND_GPU"
        else:
            head = f'name: "{name}"\nplatform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"\n'
            kind = "KIND_GPU"
        if plan is not None:
            _link(plan, vdir / "model.plan")
        else:
            _link(sources[g], vdir / "model.onnx")
            data = sources[g].with_name(sources[g].name + ".data")
            if data.is_file():
                _link(data, vdir / data.name)
        ins = [TensorSpec(s.name, s.data_type, s.dims, reshape=not s.dims) for s in ins]
        text = (head + f"max_batch_size: {net_batch}\n" + _version_policy(2) + _io("input", ins)
                + _io("output", outs) + _instances(instances, kind)
                + _batching(net_batch, queue_delay_us, queue_timeout_us)
                + (_warmup(ins, net_batch) if warmup else "") + _params(params))
        (repo / name / "config.pbtxt").write_text(text)
        written.append(name)

    # the entry models: the whole loop server-side, per dynamic batch (BLS) and in flight (decoupled)
    cal = b.calibration()
    d, r = cfg.dino_resolution, cfg.resolution
    bls_params = dict(common, model_prefix=p, network_max_batch=net_batch, resolution=r, dino_resolution=d,
                      served_graphs=",".join(graphs),
                      calibrated="true" if cal is not None else "false",
                      threshold="" if cal is None else cal.image_threshold,
                      calibration=protocol.calibration_parameter(cal), max_images=max_batch,
                      max_image_pixels=max_image_pixels or cfg.max_image_pixels)
    # max_batch_size 0 (issue 27): a batching python-backend model crashes the server on a request of zero images
    # (see glad_model.py); each request is one execution, its images one pipeline call (up to max_images)
    entries = [(protocol.GLAD_MODEL, "glad_model.py",
                _instances(glad_instances, "KIND_CPU") + "dynamic_batching {\n" + queue_policy(queue_timeout_us) + "}\n",
                {})]
    if inflight:
        entries.append((protocol.INFLIGHT_MODEL, "glad_inflight_model.py",
                        "model_transaction_policy { decoupled: true }\n" + _instances(1, "KIND_CPU"),
                        {"max_active": max_active, "max_queue": max_queue,
                         "overlap": "true" if overlap else "false"}))
    for suffix, source, scheduling, extra in entries:
        name = protocol.model_name(p, suffix)
        vdir = new_version_dir(name)
        shutil.copy(PYTHON_MODELS / source, vdir / "model.py")
        shutil.copy(PYTHON_MODELS / "glad_bls.py", vdir / "glad_bls.py")
        shutil.copy(b.file("config.json"), vdir / "config.json")
        if cal is not None:
            shutil.copy(b.file("calibration.json"), vdir / "calibration.json")
        text = (f'name: "{name}"\nbackend: "python"\nmax_batch_size: 0\n'
                + _io("input", protocol.glad_inputs(r), False) + _io("output", protocol.glad_outputs(), False)
                + scheduling + _params(dict(bls_params, **extra)))
        (repo / name / "config.pbtxt").write_text(text)
        written.append(name)
    return written
