"""What several ``glad`` commands share: the BUNDLE argument, the engine options, the typed ``--set KEY=VALUE``
option, and the one helper that opens a bundle's engines (:func:`open_pipeline`, :func:`open_detector`).

Only click, pathlib and the config module are imported here; engines, pipeline and detector are imported when a
bundle is opened, so ``glad --help`` stays fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Callable

import click

from glad_runtime.errors import ConfigError, GladError, UsageError

__all__ = ["bundle_argument", "engine_options", "engine_settings", "set_option", "open_pipeline", "open_detector",
           "error_line", "missing_extra_line", "EXTRA_OF_MODULE"]

#: The pyproject extra that installs each optional top-level module. A client-only install (``glad-toolkit[client]``:
#: numpy, Pillow, click, tqdm, tritonclient's gRPC client) has none of the others; a command that needs one is
#: refused in one line naming the extra (:func:`missing_extra_line`), never with a traceback.
EXTRA_OF_MODULE = {
    "scipy": "runtime", "skimage": "runtime",
    "onnx": "onnx", "onnxruntime": "onnx",
    "torch": "torch", "torchvision": "torch", "diffusers": "torch", "timm": "torch", "accelerate": "torch",
    "safetensors": "torch", "transformers": "torch",
    "openvino": "openvino",
    "onnxscript": "export", "onnx_graphsurgeon": "export", "polygraphy": "export",
    "tensorrt": "tensorrt",
    "sklearn": "eval", "matplotlib": "eval", "albumentations": "eval",
    "elpv_dataset": "data",
    "tritonclient": "client", "grpc": "client", "google": "client", "rapidjson": "client",
    "pytriton": "serve",
}


def bundle_argument(exists: bool = True) -> Callable:
    """The ``BUNDLE`` argument (a model bundle folder, as a :class:`~pathlib.Path`).

    Args:
        exists: the folder must exist (every command but ``init``, which creates it).
    """
    return click.argument("bundle", type=click.Path(exists=exists, file_okay=False, path_type=Path))


def engine_options(fn: Callable) -> Callable:
    """The options that choose where the networks run (shared by detect, eval, calibrate).

    The command receives ``backend``, ``device``, ``precision``, ``provider``, ``threads``, ``server`` and
    ``model_prefix``; :func:`engine_settings` gathers them for :func:`open_pipeline`.
    """
    opts = [
        click.option("--engine", "backend", type=click.Choice(["torch", "ort", "openvino", "mix", "tensorrt", "triton"]),
                     default="torch", show_default=True, help="torch: reference (needs torch); ort: ONNX Runtime on "
                     "the graphs of `glad export` (no torch); openvino: OpenVINO on the CPU, same graphs (no torch); "
                     "mix: each graph on its fastest CPU configuration (ort / openvino f32 / bf16), measured on this "
                     "machine by `python -m bench.cpu_mix BUNDLE`; tensorrt: engines of `glad build` (GPU); triton: the network models of a `glad serve` server "
                     "(--server)."),
        click.option("--device", default="cpu", show_default=True, help="torch: cpu, cuda, cuda:N or auto."),
        click.option("--precision", type=click.Choice(["fp32", "fp16", "int8", "fp8", "bf16"]), default="fp32",
                     show_default=True, help="ort: fp32|fp16 graphs, int8 the quantised graphs (`glad calibrate --quantize`) "
                     "with fp32 for the others; openvino: fp32|bf16 (bf16 on CPUs with bf16 support); tensorrt: the "
                     "engine precision."),
        click.option("--provider", type=click.Choice(["cpu", "cuda", "tensorrt"]), default="cpu", show_default=True,
                     help="ort: execution provider (cuda/tensorrt need onnxruntime-gpu)."),
        click.option("--threads", default=0, show_default=True,
                     help="ort: intra-op threads; openvino: inference threads. 0 = the cores this process may use "
                          "(CPU affinity capped by the cgroup quota; GLAD_CPU_CORES overrides)."),
        click.option("--server", metavar="HOST:PORT", default=None,
                     help="Run the networks on this Triton server (gRPC URL of `glad serve --start`); implies "
                     "--engine triton. The ADS/SAFF loop stays here; results equal the in-process engines'."),
        click.option("--model-prefix", default=None, metavar="PREFIX",
                     help="triton: the bundle's model prefix on the server (default: from the bundle folder name)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def engine_settings(backend: str = "torch", device: str = "cpu", precision: str = "fp32", provider: str = "cpu",
                    threads: int = 0, server: str | None = None, model_prefix: str | None = None) -> dict[str, Any]:
    """The values of :func:`engine_options` as the ``engine`` dict :func:`open_pipeline` takes."""
    return dict(backend=backend, device=device, precision=precision, provider=provider, threads=threads,
                server=server, model_prefix=model_prefix)


def _parse_set(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, Any]:
    from glad_runtime.core.config import parse_overrides

    try:
        return parse_overrides(value or ())
    except ConfigError as e:
        raise ConfigError(f"--set: {e}") from e


def set_option(help: str) -> Callable:
    """The repeatable ``--set KEY=VALUE`` option; the command receives ``overrides``, a ``{field: typed value}``
    dict (:func:`glad_runtime.core.config.parse_overrides`).

    An unknown key or a value that does not parse raises :class:`~glad_runtime.errors.ConfigError` (``--set: ...``,
    exit code 2) while the arguments are parsed, before the command runs.
    """
    return click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=help, callback=_parse_set)


def open_pipeline(bundle: Path, engine: dict, max_batch: int = 16, **config_changes: Any):
    """The one way a command opens a bundle's networks: ``(Bundle, engines, GladPipeline)``.

    Args:
        bundle: the bundle folder.
        engine: the values of :func:`engine_options` (``backend``, ``device``, ``precision``, ``provider``,
            ``threads``, ``server``, ``model_prefix``; a ``server`` selects the ``triton`` backend), passed to
            :func:`glad_runtime.engines.load_engines`.
        max_batch: images per network call.
        config_changes: config fields replaced for this run (``--set`` values, ``seed``).
    Returns:
        the :class:`~glad_runtime.core.bundle.Bundle`, its engines and a pipeline on the (changed) config. Mixed
        per-graph precisions are said on stderr.
    Raises:
        BundleError: the folder is not a bundle (exit code 1).
        ConfigError: a config change the config refuses (``--set: ...``).
        UsageError: the files the backend loads are missing or modified (checked against the manifest first; a
            ``BundleError`` from the backend becomes a UsageError, exit code 2), an option the backend cannot
            honour, or the backend's extra is not installed.
        EngineError: the server or its models are unreachable; TensorRTUnavailable: no GPU / TensorRT (exit 1).
    """
    from glad_runtime.core.bundle import Bundle, BundleError
    from glad_runtime.engines import load_engines
    from glad_runtime.pipeline.batch import GladPipeline

    b = Bundle(bundle)
    try:
        cfg = b.config.replace(**config_changes) if config_changes else b.config
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--set: {e}") from e
    backend = "triton" if engine.get("server") else engine.get("backend", "torch")
    try:
        engines = load_engines(b, backend, device=engine.get("device", "cpu"),
                               precision=engine.get("precision", "fp32"), provider=engine.get("provider", "cpu"),
                               threads=engine.get("threads", 0), max_batch=max_batch, url=engine.get("server"),
                               model_prefix=engine.get("model_prefix"))
    except BundleError as e:  # the chosen engine's files are missing or modified: a usage error (exit 2, as before)
        raise UsageError(str(e)) from e
    except GladError:
        raise
    except ValueError as e:  # an option the backend cannot honour
        raise UsageError(str(e)) from e
    except ImportError as e:  # an extra that is not installed
        raise UsageError(f"{backend} engine: {e}; install the matching extra (pip install -e '.[serve]' for "
                         "triton, '.[onnx]' for ort, '.[torch]' for torch)") from e
    per_graph = getattr(engines, "graph_precisions", None)
    if per_graph and len(set(per_graph.values())) > 1:  # mixed precisions are said, never silent
        click.echo("graph precisions: " + ", ".join(f"{g}={p}" for g, p in per_graph.items()), err=True)
    return b, engines, GladPipeline(engines, cfg)


def _pipeline_opener() -> Callable:
    # The patch point: tests replace ``glad_cli.main._open_pipeline`` (e.g. with stub engines); the commands look
    # it up here at call time. Under ``python -m glad_cli.main`` that module is ``__main__`` and this is
    # open_pipeline itself.
    main = sys.modules.get("glad_cli.main")
    return getattr(main, "_open_pipeline", open_pipeline) if main is not None else open_pipeline


def open_detector(bundle: Path, engine: dict, max_batch: int = 16, config_changes: dict | None = None, *,
                  calibration=None, threshold: float | None = None):
    """Open a bundle as a :class:`~glad_runtime.detector.Detector`: ``(Bundle, Detector)``.

    Args:
        bundle, engine, max_batch, config_changes: as for :func:`open_pipeline` (which opens the engines).
        calibration: the :class:`~glad_runtime.core.calibration.Calibration` that labels the detections, or None.
        threshold: a raw image threshold overriding the calibration's for this run, or None.
    Raises:
        the errors of :func:`open_pipeline`; CalibrationError: a non-finite ``threshold``.
    """
    from glad_runtime.detector import Detector

    b, _, pipeline = _pipeline_opener()(bundle, engine, max_batch, **(config_changes or {}))
    return b, Detector(pipeline.engines, pipeline.config, calibration, threshold, bundle=b)


def missing_extra_line(error: ModuleNotFoundError, command: str | None = None) -> str | None:
    """The one-line refusal of a command whose optional dependency is not installed, or None when ``error`` names
    no module of :data:`EXTRA_OF_MODULE` (a real bug: let it raise).

    Example: ``glad detect needs scipy, which this install does not have: install the 'runtime' extra (pip install
    'glad-toolkit[runtime]', or the wheel file with [runtime]); a client-only install runs glad detect BUNDLE
    IMAGES --out DIR --server HOST:PORT --stream``.
    """
    name = getattr(error, "name", None) or ""
    extra = EXTRA_OF_MODULE.get(name.split(".")[0])
    if extra is None:
        return None
    who = f"glad {command}" if command else "this command"
    hint = "" if extra == "client" else ("; a client-only install runs glad detect BUNDLE IMAGES --out DIR --server "
                                         "HOST:PORT --stream")
    return (f"{who} needs {name.split('.')[0]}, which this install does not have: install the '{extra}' extra (pip "
            f"install 'glad-toolkit[{extra}]', or the wheel file with [{extra}]){hint}")


def error_line(error: BaseException) -> str:
    """The one-line form of an error's message (lines joined with `` | ``; the class name when it is empty)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return " | ".join(lines) or type(error).__name__


def exit_code(error: GladError) -> int:
    """2 for a :class:`~glad_runtime.errors.UsageError` (and its subclasses), 1 for any other GladError."""
    return 2 if isinstance(error, UsageError) else 1
