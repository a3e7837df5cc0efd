"""What several ``glad`` commands share: the BUNDLE argument, the engine options (made from the backend table,
:data:`glad_runtime.engines.BACKENDS`, into one :class:`~glad_runtime.engines.EngineSpec`), the typed
``--set KEY=VALUE`` option, and :func:`open_detector` (``Detector.open`` plus the mixed-precision line).

Only click, pathlib, the config module and the (pure Python) backend table are imported here; engines, pipeline
and detector are imported when a bundle is opened, so ``glad --help`` stays fast.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable

import click

from glad_runtime.engines.registry import BACKENDS, DEFAULT_BACKEND, SETTINGS, EngineSpec
from glad_runtime.errors import ConfigError, EngineSpecError, GladError, UsageError

__all__ = ["bundle_argument", "engine_options", "set_option", "open_detector", "error_line", "missing_extra_line",
           "EXTRA_OF_MODULE"]

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


def _choices(setting: str) -> list[str]:
    return list(dict.fromkeys(v for row in BACKENDS.values() for v in getattr(row, f"{setting}s")))


def _per_backend(setting: str) -> str:
    return "; ".join(f"{row.name}: {'|'.join(getattr(row, f'{setting}s'))}" for row in BACKENDS.values()
                     if getattr(row, f"{setting}s"))


def _option_dest(backend: str, name: str) -> str:
    return f"engine_option__{backend}__{name}"


def engine_options(fn: Callable) -> Callable:
    """The options that choose where the networks run (detect, eval, calibrate), made from the backend table
    (:data:`glad_runtime.engines.BACKENDS`): ``--engine`` (its choices and help), ``--device``, ``--precision``,
    ``--provider`` (each backend's accepted values; default: the backend's first), ``--threads``, and every
    backend option that has a flag (``triton``: ``--server``, ``--model-prefix``, ``--shared-memory``).

    The command receives them as one ``engine``: a checked :class:`~glad_runtime.engines.EngineSpec`. Without
    ``--engine``, a backend option marked ``selects`` picks its backend (``--server``: ``triton``), else
    ``torch``. A value the backend does not accept, or an option of another backend, is an
    :class:`~glad_runtime.errors.EngineSpecError` (exit code 2) before the command runs.
    """
    names = list(BACKENDS)
    opts = [
        click.option("--engine", "engine_backend", type=click.Choice(names), default=None,
                     help="; ".join(f"{row.name}: {row.help}" for row in BACKENDS.values())
                     + f". Default: {DEFAULT_BACKEND}"
                     + "".join(f"; {o.flag} selects {row.name}" for row in BACKENDS.values() for o in row.options
                               if o.selects and o.flag) + "."),
        click.option("--device", "engine_device", default=None,
                     help="Where the networks run; " + _per_backend("device") + " (cuda:N: GPU N). Default: the "
                     "backend's first."),
        click.option("--precision", "engine_precision", type=click.Choice(_choices("precision")), default=None,
                     help="Network precision; " + _per_backend("precision") + ". Default: the backend's first."),
        click.option("--provider", "engine_provider", type=click.Choice(_choices("provider")), default=None,
                     help="Execution provider; " + _per_backend("provider") + ". Default: the backend's first."),
        click.option("--threads", "engine_threads", default=0, show_default=True, type=click.IntRange(0),
                     help="Threads of " + ", ".join(r.name for r in BACKENDS.values() if r.threads) + ". 0 = the "
                     "cores this process may use (CPU affinity capped by the cgroup quota; GLAD_CPU_CORES "
                     "overrides)."),
    ]
    for row in BACKENDS.values():
        for o in row.options:
            if o.flag:
                kind = dict(is_flag=True) if o.type is bool else dict(type=o.type, metavar=o.metavar)
                opts.append(click.option(o.flag, _option_dest(row.name, o.name), default=None, **kind,
                                         help=f"{row.name}: {o.help}."))

    @functools.wraps(fn)
    def command(*args: Any, **kwargs: Any):
        kwargs["engine"] = _engine_spec(kwargs)
        return fn(*args, **kwargs)

    command.__click_params__ = list(getattr(fn, "__click_params__", []))  # type: ignore[attr-defined]
    for opt in reversed(opts):
        command = opt(command)
    return command


def _engine_spec(kwargs: dict) -> EngineSpec:
    """The :class:`EngineSpec` of :func:`engine_options`' values (popped from ``kwargs``)."""
    backend = kwargs.pop("engine_backend")
    settings = {k: kwargs.pop(f"engine_{k}") for k in (*SETTINGS, "threads")}
    given: dict[str, dict[str, Any]] = {}
    flags: dict[str, list[str]] = {}
    selected = []
    for row in BACKENDS.values():
        for o in row.options:
            if not o.flag:
                continue
            value = kwargs.pop(_option_dest(row.name, o.name), None)
            if value is None or (o.type is bool and value is False):
                continue
            given.setdefault(row.name, {})[o.name] = value
            flags.setdefault(row.name, []).append(o.flag)
            if o.selects:
                selected.append(row.name)
    chosen = backend is not None
    if backend is None:
        # `glad calibrate --quantize` runs ONNX Runtime (its --threads are ONNX Runtime's), not the default torch
        backend = (selected[0] if len(set(selected)) == 1 else
                   "ort" if kwargs.get("quantize_mode") else DEFAULT_BACKEND)
    others = [f"{flag} ({name})" for name, fl in flags.items() if name != backend for flag in fl]
    if others:
        against = f"--engine {backend}" if chosen else f"the default engine {backend}"
        raise EngineSpecError(f"{', '.join(others)}: an option of another backend than {against}")
    return EngineSpec(backend, **settings, options=given.get(backend, {}))


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


def open_detector(bundle: Path, engine: EngineSpec, max_batch: int = 16, config_changes: dict | None = None, *,
                  calibrated: bool = True, threshold: float | None = None):
    """Open a bundle as a :class:`~glad_runtime.detector.Detector` with :meth:`Detector.open
    <glad_runtime.detector.Detector.open>` (the one way engines are opened), ``max_batch`` images per network call;
    mixed per-graph precisions are said on stderr.

    Args:
        bundle: the bundle folder. engine: the :func:`engine_options` value. config_changes: ``--set`` / ``--seed``.
        calibrated: load the bundle's calibration. threshold: a raw image threshold overriding it, or None.
    Returns:
        ``(Bundle, Detector)``.
    Raises:
        what :meth:`Detector.open <glad_runtime.detector.Detector.open>` raises (all GladErrors).
    """
    from glad_runtime.detector import Detector

    detector = Detector.open(bundle, engine.replace(max_batch=max_batch), config_changes=config_changes,
                             threshold=threshold, calibrated=calibrated)
    per_graph = getattr(detector.engines, "graph_precisions", None)
    if per_graph and len(set(per_graph.values())) > 1:  # mixed precisions are said, never silent
        click.echo("graph precisions: " + ", ".join(f"{g}={p}" for g, p in per_graph.items()), err=True)
    return detector.bundle, detector


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
