"""``glad export``: the four deployment graphs of a bundle as ONNX, fp32 and fp16, checked against torch.

Graphs written into ``BUNDLE/onnx/`` (batch dynamic, spatial sizes fixed by the bundle's config):

=================  ====================================================  ==========================================
graph              inputs                                                outputs
=================  ====================================================  ==========================================
``unet``           ``latents f32 [B,C,h,w]``, ``timesteps int64 [B]``    ``noise_pred f32 [B,C,h,w]`` (guided; the
                                                                         conditioning and guidance scale baked in)
``vae_encoder``    ``images f32 [B,3,H,W]`` in [-1, 1]                   ``latents f32 [B,C,h,w]`` (posterior mean,
                                                                         scaled)
``vae_decoder``    ``latents f32 [B,C,h,w]``                             ``images f32 [B,3,H,W]``
``dino``           ``images f32 [B,3,S,S]`` in [-1, 1], S = dino size    ``tokens_<layer> f32 [B,S/p,S/p,D]`` per
                                                                         scoring layer
``dino_ads``       the same at the ADS size (when it differs from the      the same
                   scoring size)
=================  ====================================================  ==========================================

ImageNet normalisation is inside the feature graphs; position embeddings are resampled once at trace time for the
graph's size and constant-folded, so a feature graph accepts exactly one spatial size (ONNX Runtime refuses other
sizes with an invalid-argument error; :class:`glad_runtime.engines.ort.OrtEngines` refuses them first, by name).

Conventions follow TensorRT's demoDiffusion and optimum (deployment-anchors.md sections 1, 3): the dynamo exporter
(``torch.onnx.export(dynamo=True)``) at opset 21 by default, so LayerNorm and GroupNorm stay single
``LayerNormalization`` / ``GroupNormalization`` ops (TensorRT 10.x parses opset <= 20 or 22 depending on the
release: use ``opset=17`` with ``exporter="torchscript"`` for older parsers, GroupNorm then becomes the
InstanceNormalization pattern); clean-up with onnx-graphsurgeon and constant folding with polygraphy; graphs over
2 GB saved with external data (``<graph>.onnx.data``). fp16 variants are converted with ONNX Runtime's maintained
``float16`` converter, fp32 I/O kept and normalisations / softmax left in fp32.

Every graph is run in ONNX Runtime on real inputs (real images through the bundle's own encoder, their latents
noised at the bundle's timesteps) and compared with the torch module; a non-finite output refuses the graph
(:class:`ExportError`) and the measured errors go to ``onnx/export.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import GladConfig
from glad_runtime.core.schedule import NoiseSchedule
from glad_runtime.engines import exported_graphs as graph_names

from .onnx_tools import TWO_GB, convert_fp16, io_shapes, op_counts, optimize_graph, ort_run, save_model
from glad_runtime.errors import ExportError, UsageError  # noqa: F401 (re-exported)

__all__ = ["ExportError", "GraphReport", "export_bundle", "graph_names", "DEFAULT_OPSET", "export_graph",
           "example_inputs", "MAX_REL_ERR"]

DEFAULT_OPSET = 21
#: Ops kept in fp32 by the fp16 conversion (numerically fragile: reductions over many values, exponentials).
#: Real images shipped with scikit-image, used when the caller gives none (natural statistics, no download).
DEFAULT_IMAGES = ("astronaut", "coffee", "chelsea", "rocket")


@dataclass
class GraphReport:
    """What ``glad export`` measured for one graph and precision (written to ``onnx/export.json``)."""

    graph: str
    precision: str
    file: str
    bytes: int
    export_s: float
    inputs: dict[str, list]
    outputs: dict[str, list]
    max_abs_err: float
    max_rel_err: float  # max |ort - torch| / max |torch|
    ops: dict[str, int] = field(default_factory=dict)


def _io_spec(name: str, config: GladConfig) -> tuple[list[str], list[str]]:
    if name == "unet":
        return ["latents", "timesteps"], ["noise_pred"]
    if name == "vae_encoder":
        return ["images"], ["latents"]
    if name == "vae_decoder":
        return ["latents"], ["images"]
    if name == "ads_check":
        return ["pred_original_sample", "input_anchored"], ["distance"]
    return ["images"], [f"tokens_{layer}" for layer in config.feature_layers]


def _module(modules, name: str, config: GladConfig) -> torch.nn.Module:
    if name == "ads_check":
        from export.models import AdsCheck

        return AdsCheck(modules.decoder, modules.features, config).eval()
    return {"unet": modules.unet, "vae_encoder": modules.encoder, "vae_decoder": modules.decoder,
            "dino": modules.features, "dino_ads": modules.features}[name]


# ---------------------------------------------------------------------------------------------- real inputs
def _load_images(images: Sequence[str | Path | np.ndarray] | None, config: GladConfig, count: int) -> np.ndarray:
    """``[N,3,R,R]`` float32 in [-1, 1] from paths, uint8 arrays, or scikit-image's bundled photos, through the
    config's :class:`~glad_runtime.core.images.Preprocessor` (as the pipeline gets them)."""
    from PIL import Image

    from glad_runtime.core.images import Preprocessor, load_image

    pre = Preprocessor.from_config(config)

    out = []
    if images is None:
        from training.synth import skimage_image

        images = [skimage_image(n) for n in DEFAULT_IMAGES]
    for src in list(images)[:count]:
        if isinstance(src, np.ndarray):
            arr = src if src.ndim == 3 else np.repeat(src[..., None], 3, axis=-1)
            rgb = np.asarray(Image.fromarray(arr.astype(np.uint8)).convert("RGB"), dtype=np.uint8)
        else:
            rgb = load_image(src).pixels
        out.append(pre(rgb))
    if not out:
        raise ExportError("no images to export with")
    return np.stack(out).astype(np.float32)


def example_inputs(modules, config: GladConfig, images: Sequence | None = None,
                   count: int = 2, seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Real inputs for every graph, as the pipeline would feed them.

    ``vae_encoder`` gets the images; ``vae_decoder`` their latents; ``unet`` the latents noised with seeded noise
    at the first and last DDIM timesteps of the config (int64 ``timesteps``); ``dino`` / ``dino_ads`` the images
    resized to the feature sizes; ``ads_check`` the latents and a copy with seeded noise added in one square.

    Args:
        modules: ``export.models.GladModules`` (eval mode).
        images: paths or uint8 arrays; default scikit-image's bundled photos (:data:`DEFAULT_IMAGES`).
        count: batch size of the examples (>= 2, so the traced graphs do not specialise the batch to 1).
    Returns:
        ``{graph: {input_name: array}}``.
    """
    count = max(2, int(count))
    x = _load_images(images, config, count)
    if len(x) < count:
        x = np.concatenate([x] * (-(-count // len(x))))[:count]
    with torch.inference_mode():
        latents = modules.encoder(torch.from_numpy(x)).numpy()
    sched = NoiseSchedule.create(config.t_max, config.num_inference_steps, beta_start=config.beta_start,
                                 beta_end=config.beta_end, num_train_timesteps=config.num_train_timesteps)
    ts = np.resize(np.array([sched.timesteps[0], sched.timesteps[-1]], dtype=np.int64), count)
    noise = np.random.default_rng(seed).standard_normal(latents.shape).astype(np.float32)
    noisy = sched.add_noise(latents, noise, ts).astype(np.float32)
    feeds = {"vae_encoder": {"images": x}, "vae_decoder": {"latents": latents},
             "unet": {"latents": noisy, "timesteps": ts},
             "dino": {"images": _resize(x, config.dino_resolution)}}
    feeds["dino_ads"] = {"images": _resize(x, config.ads_size)}
    # an ADS check's pair: the clean latents, and the latents with a patch of the noise (a local discrepancy)
    anchored = latents.copy()
    h = latents.shape[-1]
    anchored[..., h // 4:h // 2, h // 4:h // 2] += noise[..., h // 4:h // 2, h // 4:h // 2]
    feeds["ads_check"] = {"pred_original_sample": latents, "input_anchored": anchored}
    return feeds


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    if x.shape[-1] == size:
        return x
    t = torch.nn.functional.interpolate(torch.from_numpy(x), size=(size, size), mode="bilinear",
                                        align_corners=False, antialias=True)
    return t.numpy().astype(np.float32)


# ---------------------------------------------------------------------------------------------- export
def export_graph(module: torch.nn.Module, feeds: dict[str, np.ndarray], output_names: list[str], path: Path, *,
                 opset: int = DEFAULT_OPSET, exporter: str = "dynamo", metadata: dict[str, str] | None = None,
                 fallback: bool = True) -> Path:
    """Trace one module to ONNX with a dynamic batch axis, clean it up, fold constants and save it.

    Args:
        module: the torch module (eval mode, float32, CPU).
        feeds: example inputs ``{name: array}`` in the module's argument order (batch >= 2).
        output_names: names for the module's outputs (a tuple output gives several).
        path: destination ``.onnx``; external data goes to ``<path>.data`` when the graph exceeds 2 GB.
        opset: ONNX opset (>= 17 so LayerNormalization stays one op; 21 also keeps GroupNormalization).
        exporter: ``"dynamo"`` (``torch.export`` based, the maintained exporter) or ``"torchscript"``.
        metadata: string pairs stored in the model's ``metadata_props``.
        fallback: when the dynamo exporter fixes the batch dimension (the full-size SD v1-4 UNet), warn and
            re-export with the TorchScript exporter at opset 17 (recorded in ``metadata_props``).
    Raises:
        ExportError: the exporter failed (its message included) or an unknown exporter / opset < 17.
    """
    import onnx

    if opset < 17:
        raise ExportError(f"opset {opset} < 17: LayerNormalization would be decomposed; use 17 or higher")
    if exporter not in ("dynamo", "torchscript"):
        raise ExportError(f"exporter must be 'dynamo' or 'torchscript', got {exporter!r}")
    names = list(feeds)
    args = tuple(torch.from_numpy(np.ascontiguousarray(feeds[n])) for n in names)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        raw = Path(tmp) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
                warnings.simplefilter("ignore")
                if exporter == "dynamo":
                    batch = torch.export.Dim("batch", min=1, max=4096)
                    torch.onnx.export(module, args, str(raw), input_names=names, output_names=output_names,
                                      opset_version=opset, dynamo=True, external_data=True,
                                      dynamic_shapes=tuple({0: batch} for _ in names), verbose=False)
                else:
                    axes = {n: {0: "batch"} for n in names + output_names}
                    torch.onnx.export(module, args, str(raw), input_names=names, output_names=output_names,
                                      opset_version=opset, dynamo=False, dynamic_axes=axes,
                                      do_constant_folding=True)
        except Exception as e:  # the exporters raise many types; keep the message
            raise ExportError(f"{path.name}: torch.onnx.export ({exporter}) failed: {type(e).__name__}: {e}") from e
        data_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.name != raw.name)
        large = data_bytes + raw.stat().st_size >= TWO_GB
        # Over 2 GB the weights never enter this process again: the exporter's own optimiser has run, the graph
        # proto is edited without its weights and the external data file is moved (peak memory stays near the
        # torch module's; loading and re-saving 3.4 GB of UNet weights would triple it).
        model = onnx.load(str(raw), load_external_data=not large)
        static = [v.name for v in model.graph.input
                  if v.type.tensor_type.shape.dim and v.type.tensor_type.shape.dim[0].dim_value > 0]
        if static and exporter == "dynamo" and fallback:
            # seen on the full-size SD v1-4 UNet with guidance: torch.export specialises the batch. The TorchScript
            # exporter keeps it dynamic (measured: 3.44 GB, rel. error 1.4e-5, batch 1 and 3 run in ORT).
            warnings.warn(f"{path.name}: the dynamo exporter fixed the batch of {static}; re-exporting with the "
                          "TorchScript exporter at opset 17", stacklevel=2)
            meta = dict(metadata or {}, **{"glad.exporter": "torchscript (dynamo fixed the batch)",
                                           "glad.opset": "17"})
            return export_graph(module, feeds, output_names, path, opset=17, exporter="torchscript",
                                metadata=meta, fallback=False)
        if static:
            raise ExportError(f"{path.name}: the {exporter} exporter fixed the batch of {static} to the example's "
                              f"({len(next(iter(feeds.values())))}); the graph would refuse other batch sizes")
        moved = large and _move_external_data(model, Path(tmp), path)
        if large and not moved:  # one file per tensor (TorchScript exporter): gather them into one data file
            from onnx.external_data_helper import load_external_data_for_model

            load_external_data_for_model(model, tmp)
        if not large:
            model = optimize_graph(model)
        _finish(model, metadata)
        if moved:
            onnx.save(model, str(path))
        else:
            save_model(model, path)
    return path


def _finish(model, metadata: dict[str, str] | None) -> None:
    """One batch name on every graph input/output, producer name and ``metadata_props``."""
    for v in list(model.graph.input) + list(model.graph.output):  # one batch name, whatever the tracer derived
        dim0 = v.type.tensor_type.shape.dim[0]
        if dim0.dim_param or not dim0.dim_value:
            dim0.dim_param = "batch"
    model.producer_name = "glad-toolkit"
    if metadata:
        del model.metadata_props[:]
        for k, v in metadata.items():
            model.metadata_props.add(key=k, value=str(v))


def _move_external_data(model, tmp: Path, path: Path) -> bool:
    """Point every external initializer of ``model`` (loaded without its data) at ``<path>.data`` and move the
    exporter's single data file there (the dynamo exporter writes one). Returns False, changing nothing, when the
    exporter wrote one file per tensor (the TorchScript exporter): the caller then loads and re-saves them."""
    import onnx

    locations = {e.value for i in model.graph.initializer if i.data_location == onnx.TensorProto.EXTERNAL
                 for e in i.external_data if e.key == "location"}
    if len(locations) != 1:
        return False
    target = path.with_name(path.name + ".data")
    (tmp / locations.pop()).replace(target)
    for init in model.graph.initializer:
        for e in init.external_data:
            if e.key == "location":
                e.value = target.name
    return True


def _torch_run(module, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.inference_mode():
        out = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [o.numpy() for o in (out if isinstance(out, tuple) else (out,))]


#: Export-time acceptance gates on ``max |ort - torch| / max |torch|`` (real inputs): a graph beyond them is refused.
MAX_REL_ERR = {"fp32": 1e-3, "fp16": 5e-2}


def _compare(name: str, ort_out: list[np.ndarray], ref: list[np.ndarray], limit: float = float("inf")
             ) -> tuple[float, float]:
    """Max absolute and relative error of ONNX Runtime outputs against torch.

    Raises:
        ExportError: a shape differs, an output is non-finite, or the relative error exceeds ``limit`` (fp16
            conversion clamps values beyond +-65504, which shows up here rather than as Inf).
    """
    abs_err, rel_err = 0.0, 0.0
    for o, r in zip(ort_out, ref):
        if o.shape != r.shape:
            raise ExportError(f"{name}: ONNX output shape {o.shape} != torch {r.shape}")
        bad = int((~np.isfinite(o)).sum())
        if bad:
            raise ExportError(f"{name}: {bad} non-finite values on real inputs; the graph is refused (for fp16, "
                              "add the overflowing op to the fp32 block list)")
        e = float(np.abs(o.astype(np.float64) - r).max())
        abs_err = max(abs_err, e)
        rel_err = max(rel_err, e / max(float(np.abs(r).max()), 1e-12))
    if rel_err > limit:
        raise ExportError(f"{name}: relative error {rel_err:.3g} against torch exceeds {limit:g} on real inputs; "
                          "the graph is refused")
    return abs_err, rel_err


def export_bundle(bundle: Bundle, modules=None, *, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                  precisions: Sequence[str] = ("fp32", "fp16"), graphs: Sequence[str] | None = None,
                  images: Sequence | None = None, progress: Callable[[str], None] | None = None) -> list[GraphReport]:
    """Export a bundle's graphs into ``BUNDLE/onnx/``, check each against torch on real inputs, re-hash the bundle.

    Args:
        bundle: the bundle (its ``weights/`` are loaded unless ``modules`` is given).
        modules: already-built ``GladModules`` (must equal the bundle's weights).
        opset, exporter: see :func:`export_graph`.
        precisions: ``"fp32"`` and/or ``"fp16"`` (fp16 is converted from the fp32 graph).
        graphs: a subset of :func:`graph_names` (default all).
        images: real images for the checks (paths or uint8 arrays); default scikit-image's photos.
        progress: called with a short message per step.
    Returns:
        one :class:`GraphReport` per graph and precision, also written to ``onnx/export.json``.
    Raises:
        BundleError: the bundle's weights or config fail their checksums (checked first; only ``onnx/`` entries of
            the manifest are rewritten, so a modified file is never blessed).
        ExportError: an export failed or a graph gives non-finite values; nothing is recorded for that graph.
        UsageError: unknown graph or precision names.
    """
    from export.models import load_bundle_modules

    cfg = bundle.config
    wanted = list(graphs or graph_names(cfg))
    unknown = set(wanted) - set(graph_names(cfg)) - {"dino_ads"}
    bad_prec = set(precisions) - {"fp32", "fp16"}
    if unknown or bad_prec:
        raise UsageError(f"unknown graphs {sorted(unknown)} or precisions {sorted(bad_prec)}")
    say = progress or (lambda msg: None)
    bundle.verify(exclude=tuple(r for r in bundle.manifest()["files"] if r.startswith("onnx/")))
    if modules is None:
        say("loading weights")
        modules = load_bundle_modules(bundle)
    modules = modules.eval()
    feeds_all = example_inputs(modules, cfg, images)
    weights_sha = {k: v["sha256"] for k, v in bundle.manifest()["files"].items() if k.startswith("weights/")}
    weights_id = __import__("hashlib").sha256(json.dumps(weights_sha, sort_keys=True).encode()).hexdigest()[:16]
    odir = bundle.file("onnx")
    reports: list[GraphReport] = []
    for name in wanted:
        in_names, out_names = _io_spec(name, cfg)
        feeds = {k: feeds_all[name][k] for k in in_names}
        module = _module(modules, name, cfg)
        ref = _torch_run(module, feeds)
        fp32_path = odir / f"{name}.onnx"
        meta = {"glad.graph": name, "glad.preset": cfg.preset, "glad.weights_id": weights_id,
                "glad.precision": "fp32", "glad.opset": str(opset), "glad.exporter": exporter}
        say(f"export {name} (opset {opset}, {exporter})")
        t0 = time.perf_counter()
        export_graph(module, feeds, out_names, fp32_path, opset=opset, exporter=exporter, metadata=meta)
        t_fp32 = time.perf_counter() - t0
        for prec in precisions:
            path = fp32_path if prec == "fp32" else odir / f"{name}.fp16.onnx"
            t1 = time.perf_counter()
            if prec == "fp16":
                say(f"fp16 {name}")
                convert_fp16(fp32_path, path, feeds=feeds)
            say(f"check {name} {prec} against torch")
            try:
                abs_err, rel_err = _compare(f"{name} {prec}", ort_run(path, feeds), ref, MAX_REL_ERR[prec])
            except ExportError:
                for p in (path, path.with_name(path.name + ".data")):
                    p.unlink(missing_ok=True)
                raise
            ins, outs = io_shapes(path)
            size = path.stat().st_size + (path.with_name(path.name + ".data").stat().st_size
                                          if path.with_name(path.name + ".data").exists() else 0)
            reports.append(GraphReport(graph=name, precision=prec, file=f"onnx/{path.name}", bytes=size,
                                       export_s=round(t_fp32 + (time.perf_counter() - t1 if prec == "fp16" else 0), 2),
                                       inputs=ins, outputs=outs, max_abs_err=abs_err, max_rel_err=rel_err,
                                       ops=op_counts(path)))
        if "fp32" not in precisions:
            fp32_path.unlink()
    previous = _read_report(bundle)
    keep = {(r["graph"], r["precision"]): r for r in previous.get("graphs", [])}
    keep.update({(r.graph, r.precision): asdict(r) for r in reports})
    (odir / "export.json").write_text(json.dumps(
        {"opset": opset, "exporter": exporter, "torch": torch.__version__, "weights_id": weights_id,
         "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "graphs": list(keep.values())}, indent=2))
    touched = [f"onnx/{p.name}" for p in odir.iterdir() if p.is_file()]
    bundle.update_manifest(touched + [r for r in bundle.manifest()["files"] if r.startswith("onnx/")])
    return reports


def _read_report(bundle: Bundle) -> dict[str, Any]:
    p = bundle.file("onnx/export.json")
    return json.loads(p.read_text()) if p.is_file() else {}
