"""Every error the toolkit raises on purpose: one base, :class:`GladError`, and a typed subclass per cause.

The CLI turns any :class:`GladError` into a one-line message (exit code 2 for :class:`UsageError` and its
subclasses, 1 for the rest), never a traceback. Each class also derives from the builtin that describes it
(``ValueError`` for bad values, ``RuntimeError`` for failures while running), so ``except ValueError`` keeps
working for callers that predate this module.

Per-image errors (:class:`ImageLoadError`, :class:`InvalidInputError`, :class:`EngineError`, the serving errors)
are recorded on that image's :class:`~glad_runtime.core.detection.Detection`; the other images of the batch
complete.
"""

from __future__ import annotations

__all__ = [
    "GladError", "UsageError", "ConfigError", "UnknownPresetError", "PathNotFoundError", "InvalidInputError",
    "ImageLoadError", "UnsupportedImageError", "ImageTooLargeError",
    "BundleError", "EngineError", "EngineMismatchError", "TensorRTUnavailable", "CalibrationError",
    "CalibrationWarning", "QueueFullError", "ServingError", "BadInputError", "ServerUnavailableError",
    "DeadlineExceededError", "ModelNotFoundError", "ExportError", "RefitError", "QuantizationError",
    "ServerStartError", "RequestCancelledError", "PortInUseError", "ContainerError",
]


class GladError(Exception):
    """Base of every error the toolkit raises on purpose (catch this one to catch them all)."""


# ---------------------------------------------------------------------------------------------- usage (exit 2)
class UsageError(GladError, ValueError):
    """A setting or argument the caller chose is invalid (CLI exit code 2)."""


class ConfigError(UsageError):
    """A config field, preset name or ``--set KEY=VALUE`` is unknown or its value does not parse to the field's
    type; the message names the field and the expected type (and close names for a typo)."""


class UnknownPresetError(ConfigError, KeyError):
    """No preset has this name (the message gives close matches and the known names). Also a ``KeyError``, as
    ``get_preset`` raised before this module existed."""

    __str__ = BaseException.__str__  # the message as given, not KeyError's repr of it


class PathNotFoundError(UsageError, FileNotFoundError):
    """A file or folder the caller named does not exist, or holds none of what it should (no images, no
    ``train/`` folder, no model repository, a package's model file not installed). Also a ``FileNotFoundError``,
    as these raised before this module existed."""


# ---------------------------------------------------------------------------------------------- inputs
class InvalidInputError(GladError, ValueError):
    """The input data has the wrong shape, dtype or values: an image batch, arrays passed to a scoring, rendering
    or metrics function (labels, scores, maps, masks), a received tensor, a text to parse."""


class ImageLoadError(GladError, ValueError):
    """A file could not be read or decoded as an image (missing, truncated, corrupt, not an image)."""


class UnsupportedImageError(ImageLoadError):
    """The image decoded but its pixel format is not supported (e.g. 32-bit float)."""


class ImageTooLargeError(ImageLoadError):
    """The image's header declares more pixels than the limit (``max_image_pixels``: bundle config, ``glad serve
    --max-image-pixels``, ``glad detect --max-image-pixels``); refused before decoding, so a decompression bomb
    costs nothing. Never retryable: the same bytes are refused everywhere. ``pixels`` and ``limit`` are set."""

    def __init__(self, message: str, pixels: int | None = None, limit: int | None = None):
        super().__init__(message)
        self.pixels, self.limit = pixels, limit


# ---------------------------------------------------------------------------------------------- bundle and engines
class BundleError(GladError, RuntimeError):
    """A bundle folder is missing, incomplete or fails its checksums."""


class EngineError(GladError, RuntimeError):
    """A network call failed (backend error, wrong output shape, non-finite output)."""


class EngineSpecError(UsageError):
    """An engine specification the backend cannot honour: an unknown backend, a setting the backend does not have
    or a value it does not accept, an unknown option, a missing required one
    (:class:`glad_runtime.engines.EngineSpec`)."""


class MissingExtraError(UsageError):
    """What the chosen backend imports is not installed; ``module`` is the missing module and ``extra`` the
    ``glad-toolkit`` extra that installs it (from the backend's row, :data:`glad_runtime.engines.BACKENDS`)."""

    def __init__(self, message: str, module: str | None = None, extra: str | None = None):
        super().__init__(message)
        self.module, self.extra = module, extra


class EngineFilesError(BundleError, UsageError):
    """The files the chosen backend loads are missing or modified (or the server serves another bundle): a
    :class:`BundleError` that is also a usage error (CLI exit code 2: choose another backend or produce the files,
    e.g. ``glad export``, ``glad build``, ``python -m bench.cpu_mix``). The backend's own error is ``__cause__``."""


class EngineMismatchError(BundleError):
    """No stored engine fits this GPU / TensorRT version / precision / shape (the differences are listed)."""


class TensorRTUnavailable(GladError, RuntimeError):
    """No CUDA GPU, or the ``tensorrt`` package is not installed."""


# ---------------------------------------------------------------------------------------------- calibration
class CalibrationError(GladError, ValueError):
    """Calibration data cannot give a threshold: too few images, NaN/inf scores, constant scores, a labelled set
    with a single class, mismatched lengths, or an invalid ``calibration.json``."""


class CalibrationWarning(UserWarning):
    """The calibration is computed but is weak: too few images for the requested false-positive rate, tiny
    classes in a labelled set, or a threshold that flags every calibration image."""


# ---------------------------------------------------------------------------------------------- step-level stream
class QueueFullError(GladError, RuntimeError):
    """The scheduler's queue is at ``max_queue``: retry later (back-pressure), do not buffer without bound."""


# ---------------------------------------------------------------------------------------------- serving
class ServingError(GladError, RuntimeError):
    """A served call failed; ``status`` is the gRPC status name (``"INTERNAL"``, ...) when known."""

    def __init__(self, message: str, status: str | None = None, url: str | None = None):
        super().__init__(message)
        self.status, self.url = status, url


class BadInputError(ServingError, ValueError):
    """The image cannot be read, has the wrong shape / values, or the server refused it (``INVALID_ARGUMENT``)."""


class ServerUnavailableError(ServingError):
    """No server answered (``UNAVAILABLE``, connection refused or lost) within the retries and failovers."""


class DeadlineExceededError(ServingError):
    """The per-request deadline (``timeout``) passed before the answer came (``DEADLINE_EXCEEDED``)."""


class ModelNotFoundError(ServingError):
    """The server does not serve (or has not loaded) the requested model (wrong prefix, model not ready)."""


class ServerStartError(GladError, RuntimeError):
    """The server binary is missing, exited during start-up, or was not ready in time (log tail included)."""


class PortInUseError(ServerStartError):
    """A port the server must listen on is already taken; the message names the port and, when it can be found,
    the pid and name of the process holding it (the server is not started)."""


class ContainerError(GladError, RuntimeError):
    """A container could not be built, started or stopped (``triton_models.podman``): the podman command and the
    tail of its output are in the message."""


class RequestCancelledError(GladError, RuntimeError):
    """Server side: the request was abandoned (the client cancelled it or its Triton request timeout passed), so
    the reconstruction stopped between DDIM steps instead of finishing work nobody will read. ``reason`` is
    ``"cancelled"`` or ``"deadline"`` when known."""

    def __init__(self, message: str, reason: str | None = None):
        super().__init__(message)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- build side
class ExportError(GladError, RuntimeError):
    """An export step failed: the exporter, a non-finite output on real inputs, or an unsupported setting."""


class RefitError(GladError, RuntimeError):
    """The new graph differs in structure from the engine's source graph: rebuild instead of refitting."""


class QuantizationError(GladError, RuntimeError):
    """Quantisation failed: no calibration data, a quantiser error, a missing tool (ModelOpt), or a bad setting."""
