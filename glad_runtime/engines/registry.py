"""One engine specification and the table of backends it is checked against and opened from.

* :class:`EngineSpec`: what a caller asks for (backend, precision, provider, threads, device, max_batch and the
  backend's own options), checked when it is built: a setting the backend does not have, a value it does not
  accept, an unknown or missing option raise :class:`~glad_runtime.errors.EngineSpecError`.
* :data:`BACKENDS`: one :class:`Backend` row per backend: its factory (``"module:Class.from_spec"``, imported
  when the backend is opened), the values it accepts per setting (the first is its default), its own options
  (:class:`BackendOption`, each with the CLI flag the ``glad`` commands generate from it), the extra it needs and
  its help line. The CLI's ``--engine``, ``--precision``, ``--provider`` choices, their help and the backend
  option flags are made from this table (:func:`glad_cli.options.engine_options`).
* :func:`open_engines`: the one dispatch, ``(bundle, spec) -> Engines``, raising typed errors only.

Adding a backend: its module (an :class:`~glad_runtime.engines.Engines` with a ``from_spec(bundle, spec)``
classmethod) and one row in :data:`_TABLE`; or, from outside the project, :func:`register_backend`.

This module imports nothing heavy (no numpy): ``glad --help`` builds its options from it.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from glad_runtime.errors import (BundleError, EngineFilesError, EngineSpecError, GladError, MissingExtraError,
                                 UsageError)

__all__ = ["EngineSpec", "Backend", "BackendOption", "BACKENDS", "DEFAULT_BACKEND", "SETTINGS", "backend_row",
           "register_backend", "open_engines", "load_engines"]

#: The generic settings a :class:`Backend` may accept, with the values each row lists.
SETTINGS = ("precision", "provider", "device")
DEFAULT_BACKEND = "torch"


@dataclass(frozen=True)
class BackendOption:
    """An option of one backend only (e.g. the ``triton`` server's URL).

    Args:
        name: the key in :attr:`EngineSpec.options` (a Python identifier).
        type: the value's type (``str``, ``int``, ``float`` or ``bool``; a ``bool`` option is a CLI flag).
        help: one line for ``--help``.
        default: the value when not given.
        required: the backend cannot open without it.
        flag: the ``glad`` option made from it (e.g. ``"--server"``), or None for none.
        metavar: the CLI metavar. selects: giving the flag selects this backend when ``--engine`` is not given
            (``--server`` selects ``triton``).
    """

    name: str
    type: type = str
    help: str = ""
    default: Any = None
    required: bool = False
    flag: str | None = None
    metavar: str | None = None
    selects: bool = False


@dataclass(frozen=True)
class Backend:
    """One row of the backend table.

    Args:
        name: the backend's name (``EngineSpec.backend``, ``glad ... --engine NAME``).
        factory: ``"module:attr.attr"`` (imported when opened) or a callable; called as ``factory(bundle, spec)``
            with a :class:`~glad_runtime.core.bundle.Bundle` and a checked :class:`EngineSpec`, it returns the
            :class:`~glad_runtime.engines.Engines`.
        help: one line for ``--engine``'s help.
        extra: the ``glad-toolkit`` extra that installs what it needs (named when an import fails).
        precisions, providers, devices: the values accepted for each setting, the first being the default;
            ``()``: the backend has no such setting (giving one is an error). A device ``"cuda"`` also accepts
            ``"cuda:N"``.
        threads: the backend reads :attr:`EngineSpec.threads` (a thread count > 0 is an error otherwise).
        options: its own :class:`BackendOption` s.
    """

    name: str
    factory: str | Callable[..., Any]
    help: str
    extra: str | None = None
    precisions: tuple[str, ...] = ("fp32",)
    providers: tuple[str, ...] = ()
    devices: tuple[str, ...] = ()
    threads: bool = False
    options: tuple[BackendOption, ...] = ()

    def accepts(self, setting: str, value: str) -> bool:
        """Whether ``value`` is one of this backend's values for ``setting`` (one of :data:`SETTINGS`)."""
        allowed = getattr(self, f"{setting}s")
        return value in allowed or (setting == "device" and "cuda" in allowed
                                    and re.fullmatch(r"cuda:\d+", value) is not None)

    def option(self, name: str) -> BackendOption | None:
        """The option called ``name``, or None."""
        return next((o for o in self.options if o.name == name), None)


_THREADS = "ONNX Runtime intra-op / OpenVINO inference threads"
#: The values a backend without that setting accepts all the same (what it does anyway), so a command line that
#: spells out the defaults (``--precision fp32 --device cpu``) works with every backend.
NEUTRAL = {"precision": "fp32", "provider": "cpu", "device": "cpu"}
#: The backends, one row each (the order of ``--engine``'s choices and help).
_TABLE = (
    Backend("torch", "glad_runtime.engines.pytorch:TorchEngines.from_spec", extra="torch",
            help="reference (needs torch); fp16 on CUDA only",
            precisions=("fp32", "fp16", "bf16"), devices=("cpu", "cuda", "auto")),
    Backend("ort", "glad_runtime.engines.ort:OrtEngines.from_spec", extra="onnx",
            help="ONNX Runtime on the graphs of `glad export` (no torch); int8: the quantised graphs of `glad "
                 "calibrate --quantize`, fp32 for the others; cuda/tensorrt providers need onnxruntime-gpu",
            precisions=("fp32", "fp16", "int8"), providers=("cpu", "cuda", "tensorrt"), threads=True),
    Backend("openvino", "glad_runtime.engines.openvino:OpenVinoEngines.from_spec", extra="openvino",
            help="OpenVINO on the CPU, same graphs (no torch); bf16 on CPUs with bf16 support",
            precisions=("fp32", "bf16", "f32"), providers=("cpu",), threads=True),
    Backend("mix", "glad_runtime.engines.mix:MixedEngines.from_spec", extra="openvino",
            help="each graph on its fastest CPU configuration (ort / openvino f32 / bf16: the precisions of its "
                 "plan), measured on this machine by `python -m bench.cpu_mix BUNDLE`",
            precisions=(), providers=("cpu",), threads=True),
    Backend("tensorrt", "glad_runtime.engines.trt:TensorRTEngines.from_spec", extra="tensorrt",
            help="engines of `glad build` (GPU); --precision as built (default fp16, `glad build`'s default)",
            precisions=("fp16", "fp32", "int8", "fp8")),
    Backend("triton", "glad_runtime.engines.triton:TritonEngines.from_spec", extra="serve",
            help="the network models of a `glad serve` server (the ADS/SAFF loop stays here; results equal the "
                 "in-process engines')",
            precisions=(), options=(
                BackendOption("url", str, "the server's gRPC HOST:PORT (`glad serve --start`); selects --engine "
                              "triton", required=True, flag="--server", metavar="HOST:PORT", selects=True),
                BackendOption("model_prefix", str, "the bundle's model prefix on the server (default: from the "
                              "bundle folder name, as `glad serve` names it)", flag="--model-prefix",
                              metavar="PREFIX"),
                BackendOption("shared_memory", bool, "pass tensors through system shared memory (server on the "
                              "same host)", default=False, flag="--shared-memory"))),
)

#: ``{name: Backend}``: the table :class:`EngineSpec` is checked against and :func:`open_engines` dispatches on.
#: Add rows with :func:`register_backend`; tests swap a row's factory with ``monkeypatch.setitem``.
BACKENDS: dict[str, Backend] = {b.name: b for b in _TABLE}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend | None:
    """Add a row to :data:`BACKENDS` (a plugin's backend, a test's stub); returns the row it replaced, or None.

    ``glad``'s options are made when the CLI is imported: a row added later is open to the SDK
    (:class:`EngineSpec`, :meth:`~glad_runtime.detector.Detector.open`), and to a command only when registered
    before ``glad_cli`` is imported.

    Raises:
        EngineSpecError: a row of that name exists and ``replace`` is false, or an option is badly declared (a
            name that is not an identifier, a type other than str/int/float/bool).
    """
    if backend.name in BACKENDS and not replace:
        raise EngineSpecError(f"backend {backend.name!r} is already registered (pass replace=True)")
    for o in backend.options:
        if not o.name.isidentifier() or o.type not in (str, int, float, bool):
            raise EngineSpecError(f"backend {backend.name!r}: option {o.name!r} needs an identifier name and a "
                                  f"str/int/float/bool type, got {o.type!r}")
    old = BACKENDS.get(backend.name)
    BACKENDS[backend.name] = backend
    return old


def backend_row(name: str) -> Backend:
    """The row of backend ``name``. Raises EngineSpecError: no such backend (the known names are listed)."""
    try:
        return BACKENDS[name]
    except (KeyError, TypeError):
        raise EngineSpecError(f"backend must be one of {', '.join(BACKENDS)}; got {name!r}") from None


def _flag(o: BackendOption) -> str:
    return f" ({o.flag}{' ' + o.metavar if o.metavar else ''})" if o.flag else ""


@dataclass(frozen=True)
class EngineSpec:
    """Where and how a bundle's networks run: the one value :func:`open_engines` and
    :meth:`Detector.open <glad_runtime.detector.Detector.open>` take, checked against the backend's row when built.

    Args:
        backend: a name in :data:`BACKENDS` (default ``"torch"``).
        precision: one of the backend's ``precisions`` (None: its default, the first); backends without a precision
            setting (``mix``: its plan decides; ``triton``: the server's) keep None.
        provider: ONNX Runtime execution provider (``ort``: ``cpu``, ``cuda``, ``tensorrt``); None: the
            backend's default.
        threads: intra-op / inference threads for the backends that have a thread pool (``ort``, ``openvino``,
            ``mix``); 0 = the cores this process may use (:mod:`glad_runtime.core.cpus`), accepted by every backend.
        device: torch device (``cpu``, ``cuda``, ``cuda:N``, ``auto``); None: the backend's default.
        max_batch: images per network call, >= 1 (``triton``: the served models' ``max_batch_size`` applies).
        options: the backend's own options (:attr:`Backend.options`, e.g. ``triton``: ``url``, ``model_prefix``,
            ``shared_memory``); read-only after checking, with each option's default filled in.
    Raises:
        EngineSpecError: (a :class:`~glad_runtime.errors.UsageError`) an unknown backend; a setting the backend
            does not have or a value it does not accept; threads < 0 or max_batch < 1; an unknown option, a
            value of the wrong type, or a required option missing.
    """

    backend: str = DEFAULT_BACKEND
    precision: str | None = None
    provider: str | None = None
    threads: int = 0
    device: str | None = None
    max_batch: int = 16
    options: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        row = backend_row(self.backend)
        name = self.backend
        for setting in SETTINGS:
            value, allowed = getattr(self, setting), getattr(row, f"{setting}s")
            if value is None:
                object.__setattr__(self, setting, allowed[0] if allowed else None)
            elif not allowed:
                if value == NEUTRAL.get(setting):  # what the backend does anyway (fp32, on the CPU): no conflict
                    object.__setattr__(self, setting, None)
                    continue
                raise EngineSpecError(f"backend {name!r} has no {setting} setting; got {setting} {value!r}")
            elif not row.accepts(setting, value):
                raise EngineSpecError(f"backend {name!r} accepts {setting} {' / '.join(allowed)}; got {value!r}")
        for key, low in (("threads", 0), ("max_batch", 1)):
            v = getattr(self, key)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise EngineSpecError(f"{key} must be an integer >= {low}; got {v!r}")
        if self.threads and not row.threads:
            raise EngineSpecError(f"backend {name!r} has no thread setting; got threads {self.threads}")
        given = dict(self.options or {})
        unknown = sorted(set(given) - {o.name for o in row.options})
        if unknown:
            known = ", ".join(o.name for o in row.options) or "none"
            raise EngineSpecError(f"backend {name!r} has no option {', '.join(map(repr, unknown))} (its options: "
                                  f"{known})")
        options = {}
        for o in row.options:
            v = given.get(o.name)
            if v is None:
                if o.required:
                    raise EngineSpecError(f"backend {name!r} needs the option {o.name!r}{_flag(o)}: {o.help}")
                v = o.default
            elif not isinstance(v, o.type) or (o.type is not bool and isinstance(v, bool)):
                if o.type is float and isinstance(v, int) and not isinstance(v, bool):
                    v = float(v)
                else:
                    raise EngineSpecError(f"backend {name!r} option {o.name!r}{_flag(o)} must be a "
                                          f"{o.type.__name__}; got {v!r}")
            options[o.name] = v
        object.__setattr__(self, "options", MappingProxyType(options))

    @classmethod
    def of(cls, backend: str = DEFAULT_BACKEND, **settings: Any) -> "EngineSpec":
        """Build from flat keywords: the generic settings by name, every other keyword a backend option
        (``EngineSpec.of("triton", url="host:8001", shared_memory=True)``). Raises EngineSpecError as the
        constructor does."""
        names = {f.name for f in dataclasses.fields(cls)} - {"backend", "options"}
        generic = {k: v for k, v in settings.items() if k in names}
        options = {k: v for k, v in settings.items() if k not in names}
        return cls(backend, **generic, options=options)

    def replace(self, **changes: Any) -> "EngineSpec":
        """A copy with fields changed (checked again; the settings hold the backend's resolved defaults, so a
        spec for another backend is built anew). Raises EngineSpecError as the constructor does."""
        return dataclasses.replace(self, **changes)

    @property
    def row(self) -> Backend:
        """This spec's :class:`Backend` row."""
        return backend_row(self.backend)


def _resolve(factory: str | Callable[..., Any]) -> Callable[..., Any]:
    if callable(factory):
        return factory
    module, _, attr = factory.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


def open_engines(bundle, spec: EngineSpec | str = DEFAULT_BACKEND):
    """Open a bundle's networks as ``spec`` says: the one dispatch, from the backend's row in :data:`BACKENDS`.

    Args:
        bundle: a :class:`~glad_runtime.core.bundle.Bundle`.
        spec: an :class:`EngineSpec` (a backend name: that backend with its defaults).
    Returns:
        the backend's :class:`~glad_runtime.engines.Engines` (numpy in and out; see
        :class:`~glad_runtime.engines.Engines` for the shapes).
    Raises:
        EngineSpecError: a spec the backend cannot honour (also what the backend's constructor raised on its
            settings, an ``EngineSpecError`` or a plugin's plain ``ValueError``, prefixed with the backend's name).
        MissingExtraError: what the backend imports is not installed (the message names the module and the extra).
        EngineFilesError: (a ``BundleError`` and a ``UsageError``) the files the backend loads are missing or
            modified (a ``BundleError`` or ``FileNotFoundError`` of the backend), or the server serves another
            bundle.
        EngineError / TensorRTUnavailable / any other GladError: from the backend as raised (unreachable server,
            no GPU).
    """
    spec = spec if isinstance(spec, EngineSpec) else EngineSpec(spec)
    row = spec.row
    try:
        return _resolve(row.factory)(bundle, spec)
    except EngineSpecError as e:  # a setting the backend's constructor refuses: say which backend
        raise EngineSpecError(f"backend {row.name!r}: {e}") from e
    except UsageError:
        raise
    except (BundleError, FileNotFoundError) as e:
        raise EngineFilesError(str(e) if isinstance(e, BundleError) else f"backend {row.name!r}: {e}") from e
    except GladError:
        raise
    except ImportError as e:
        missing = (getattr(e, "name", None) or "").split(".")[0] or "a module"
        extra = f"install the {row.extra!r} extra (pip install 'glad-toolkit[{row.extra}]')" if row.extra else ""
        raise MissingExtraError(f"backend {row.name!r} needs {missing}, which this install does not have"
                                f"{': ' + extra if extra else ''} ({e})", module=missing, extra=row.extra) from e
    except ValueError as e:  # the same from a plugin's backend that raises builtins
        raise EngineSpecError(f"backend {row.name!r}: {e}") from e


def load_engines(bundle, backend: str = DEFAULT_BACKEND, **settings: Any):
    """``open_engines(bundle, EngineSpec.of(backend, **settings))``: the keyword form (e.g. ``load_engines(b,
    "triton", url="host:8001", shared_memory=True)``). Raises what :class:`EngineSpec` and :func:`open_engines`
    raise."""
    return open_engines(bundle, EngineSpec.of(backend, **settings))
