"""Request planning and response parsing of the client SDK as pure functions (numpy only, no ``tritonclient``, no
I/O): what :class:`~glad_runtime.serving.client.GladClient`, :class:`~glad_runtime.serving.client.AsyncGladClient`
and :meth:`GladClient.stream <glad_runtime.serving.client.GladClient.stream>` send and how they read the answers.

* **Inputs** (:func:`prepare`): a path or encoded bytes are sent as they are (``image_files``), a uint8/uint16 array
  or a PIL image as lossless PNG, a preprocessed float32 ``[3, R, R]`` tensor as ``images``.
* **Server** (:func:`parse_config`): the entry model's config gives the resolution, the images per request, the
  served calibration and the outputs to ask for: only the contract outputs (:data:`protocol.GLAD_OUTPUT_NAMES`)
  the model declares (:func:`requested_outputs`), so a new client works against an older server.
* **Requests** (:func:`plan_requests`, :class:`DetectPlan`): runs of one input kind, at most ``max_batch`` images
  each; the ``map_size`` parameter and the deadline sent twice (:func:`deadline_kwargs`); a request refused whole
  by a server without per-image errors is split to find the refused image.
* **Answers** (:func:`parse_response`): output arrays -> one :class:`Detection` per image, relabelled with the
  served calibration, an image the server failed carrying its typed error (:func:`image_error`).
"""

from __future__ import annotations

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from glad_runtime.core.detection import Detection
from glad_runtime.errors import BadInputError, ServingError
from glad_runtime.serving import protocol, routing

__all__ = ["FILES", "TENSOR", "Image", "Request", "DetectPlan", "source_name", "prepare", "prepare_all",
           "requested_outputs", "parse_config", "network_models", "required_ready", "health_verdict",
           "plan_request", "plan_requests", "deadline_kwargs", "REQUEST_PARAMETERS", "image_error", "refused",
           "refused_all", "parse_response"]

#: Input kinds: encoded files (``image_files`` BYTES) or preprocessed tensors (``images`` FP32).
FILES, TENSOR = "files", "tensor"
#: Request parameters of every request: maps come back at the working size (``D x D``, small);
#: ``Detection.map_at_original_size`` resizes them with the same Pillow code as ``glad detect``; regions are in
#: original-image pixels either way.
REQUEST_PARAMETERS = {protocol.MAP_SIZE_PARAMETER: "working"}


# ---------------------------------------------------------------------------------------------- inputs
@dataclass(frozen=True)
class Image:
    """One input ready to send: its ``index`` in the caller's input, ``source`` (how its Detection names it),
    ``kind`` (:data:`FILES` or :data:`TENSOR`) and ``payload`` (the encoded bytes, or float32 ``[3, R, R]``)."""

    index: int
    source: str
    kind: str
    payload: Any


def source_name(image: Any, index: int) -> str:
    """How a Detection names an input: its path, else ``#<index>``."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"#{index}"


def _png(image: Any) -> bytes:
    """A uint8/uint16 array or a PIL image as lossless PNG bytes (TIFF for modes PNG cannot hold)."""
    import io

    from PIL import Image as PILImage

    img = image if isinstance(image, PILImage.Image) else PILImage.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if img.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else "TIFF")
    return buf.getvalue()


def _tensor(image: np.ndarray, source: str, resolution: int) -> np.ndarray:
    """A preprocessed float tensor checked: ``[3, R, R]``, finite; as contiguous float32."""
    if image.shape != (3, resolution, resolution):
        raise BadInputError(f"{source}: preprocessed image {list(image.shape)}, expected float32 "
                            f"[3, {resolution}, {resolution}] in [-1, 1]")
    if not np.isfinite(image).all():
        raise BadInputError(f"{source}: NaN or Inf values")
    return np.ascontiguousarray(image, dtype=np.float32)


def prepare(image: Any, index: int, resolution: int) -> Image:
    """One caller's input -> an :class:`Image`: paths and bytes as they are, arrays and PIL images as PNG, float
    arrays checked as preprocessed tensors of ``resolution`` R.

    Raises:
        BadInputError: unreadable path, unsupported type, shape or dtype, NaN.
    """
    source = source_name(image, index)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return Image(index, source, FILES, f.read())
        except OSError as e:
            raise BadInputError(f"{source}: cannot open ({e.strerror or e})") from e
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Image(index, source, FILES, bytes(image))
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f":
            return Image(index, source, TENSOR, _tensor(image, source, resolution))
        ok = (image.ndim == 2 and image.dtype in (np.uint8, np.uint16)) or \
            (image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8)
        if not ok:
            raise BadInputError(f"{source}: arrays must be uint8/uint16 [H,W], uint8 [H,W,3|4], or float32 "
                                f"[3,{resolution},{resolution}] in [-1,1]; got {image.dtype} {list(image.shape)}")
        return Image(index, source, FILES, _png(image))
    if type(image).__module__.startswith("PIL."):
        try:
            return Image(index, source, FILES, _png(image))
        except (OSError, ValueError) as e:
            raise BadInputError(f"{source}: cannot encode the image ({e})") from e
    raise BadInputError(f"{source}: unsupported input type {type(image).__name__}")


def prepare_all(images: Iterable[Any], resolution: int) -> tuple[list[Detection | None], list[Image]]:
    """``(slots, good)``: per input a failed Detection (it could not be prepared) or None, and the
    :class:`Image` of each input to send."""
    slots: list[Detection | None] = []
    good = []
    for i, image in enumerate(images):
        try:
            good.append(prepare(image, i, resolution))
        except BadInputError as e:
            slots.append(Detection(source=source_name(image, i), error=e))
            continue
        slots.append(None)
    return slots, good


# ---------------------------------------------------------------------------------------------- the server
def _parameters(config: dict) -> dict[str, str]:
    return {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}


def requested_outputs(config: dict) -> tuple[tuple[str, ...], list[str]]:
    """``(outputs to request, required outputs missing)`` for an entry model's config (``get_model_config(...,
    as_json=True)["config"]``): the contract outputs (:data:`protocol.GLAD_OUTPUT_NAMES`) the config declares, in
    contract order. :data:`protocol.LATER_OUTPUTS` (``errors``, ``region_counts``, ``region_boxes``) are requested
    only where declared (servers before issues 27 / 32 have none: a request naming an undeclared output is
    refused); every other contract output is required."""
    declared = {o.get("name") for o in config.get("output", None) or []}
    outputs = tuple(n for n in protocol.GLAD_OUTPUT_NAMES if n in declared)
    missing = [n for n in protocol.GLAD_OUTPUT_NAMES if n not in declared and n not in protocol.LATER_OUTPUTS]
    return outputs, missing


def parse_config(config: dict, model_name: str) -> dict:
    """The entry model's config -> what :meth:`GladClient.metadata` returns: ``{"resolution", "max_batch",
    "parameters", "dino_resolution", "calibration", "outputs", "errors"}``. ``outputs`` are the contract outputs
    the model declares, in contract order: what every request asks for (:func:`requested_outputs`); ``errors`` is
    True when ``errors`` is among them (per-image errors).

    Raises:
        ServingError: the model lacks the ``image_files`` input or a required output (another glad-toolkit
            generated the repository).
    """
    params = _parameters(config)
    names = {i["name"] for i in config["input"]}
    if protocol.GLAD_FILE_INPUT not in names:
        raise ServingError(f"{model_name} has no {protocol.GLAD_FILE_INPUT!r} input: the repository was "
                           "generated by an older glad-toolkit; regenerate it with `glad serve`")
    outputs, missing = requested_outputs(config)
    if missing:
        raise ServingError(f"{model_name} does not declare the outputs {missing}: the repository was "
                           "generated by another glad-toolkit; regenerate it with `glad serve`")
    dims = [int(d) for i in config["input"] if i["name"] == protocol.GLAD_INPUT for d in i["dims"]]
    max_images = int(params.get("max_images") or config.get("max_batch_size", 1) or 1)  # entry models: mbs 0
    return {"resolution": dims[-1], "max_batch": max_images, "parameters": params,
            "dino_resolution": int(params.get("dino_resolution") or dims[-1]),
            "calibration": protocol.calibration_from_parameter(params.get("calibration")),
            "outputs": outputs, "errors": protocol.ERRORS_OUTPUT in outputs}


def network_models(config: dict, model_prefix: str) -> list[tuple[str, str]]:
    """``(model name, version)`` of each network model the entry model calls, from its config's ``served_graphs``
    (``<prefix>_<graph>``) at its ``model_version`` (an entry model of version N calls the networks of version N;
    "" where the config does not say). Empty for configs without ``served_graphs``."""
    params = _parameters(config)
    prefix = params.get("model_prefix") or model_prefix
    version = str(params.get("model_version") or "")
    graphs = [g.strip() for g in (params.get("served_graphs") or "").split(",") if g.strip()]
    return [(protocol.model_name(prefix, g), version) for g in graphs]


def required_ready(index: dict, model_prefix: str) -> tuple[bool, list[str]]:
    """``(ready, not ready names)`` from a repository index (``get_model_repository_index(as_json=True)``): every
    model named ``<prefix>_*`` (but not those of a longer prefix with its own ``_glad`` model, e.g. ``<prefix>_b_*``
    when ``<prefix>_b_glad`` exists) and ``<prefix>_glad`` must have a READY version."""
    models = index.get("models", []) if isinstance(index, dict) else []
    head, entry = model_prefix + "_", protocol.model_name(model_prefix)
    names = {m.get("name", "") for m in models}
    others = [n[:-len("_glad")] + "_" for n in names if n.endswith("_glad") and n != entry and n.startswith(head)]
    need = {n for n in names if n.startswith(head) and not any(n.startswith(o) for o in others)}
    need.add(entry)
    ready = {m.get("name") for m in models if m.get("state") == "READY"}
    missing = sorted(need - ready)
    return not missing, missing


def health_verdict(down: list[tuple[str, str]], index: dict, model_prefix: str) -> tuple[bool, str]:
    """``(healthy, why not)`` of a replica whose entry model is READY: ``down`` are the network models it calls that
    are not ready (``(name, version)``), ``index`` its repository index (:func:`required_ready`)."""
    names = [f"{n} (version {v})" if v else n for n, v in down]
    _, others = required_ready(index, model_prefix)
    names += [n for n in others if n not in {m for m, _ in down}]
    return not names, "" if not names else f"not ready: {', '.join(names)}"


# ---------------------------------------------------------------------------------------------- requests
@dataclass(frozen=True)
class Request:
    """One planned request: its ``images``, the one input tensor (``input`` name, KServe ``datatype``, ``array``
    with the batch), the ``outputs`` to ask for and the request ``parameters`` (the deadline is added per attempt:
    :func:`deadline_kwargs`)."""

    images: tuple[Image, ...]
    input: str
    datatype: str
    array: np.ndarray = field(repr=False)
    outputs: tuple[str, ...]
    parameters: Mapping[str, str]

    @property
    def sources(self) -> list[str]:
        """The images' sources, in request order."""
        return [im.source for im in self.images]


def plan_request(images: Sequence[Image], info: dict) -> Request:
    """The request of ``images`` (all of one kind) to a server described by ``info`` (:func:`parse_config`):
    ``image_files`` BYTES ``[B, 1]`` or ``images`` FP32 ``[B, 3, R, R]``, the declared outputs, ``map_size``."""
    if images[0].kind == FILES:
        name, datatype = protocol.GLAD_FILE_INPUT, "BYTES"
        array = np.array([im.payload for im in images], dtype=np.object_).reshape(-1, 1)
    else:
        name, datatype, array = protocol.GLAD_INPUT, "FP32", np.stack([im.payload for im in images])
    return Request(tuple(images), name, datatype, array, tuple(info["outputs"]), REQUEST_PARAMETERS)


def plan_requests(images: Sequence[Image], info: dict) -> list[Request]:
    """The requests of one call: runs of one input kind, at most ``info["max_batch"]`` images each, in input
    order."""
    runs: list[list[Image]] = []
    for im in images:
        if runs and runs[-1][0].kind == im.kind and len(runs[-1]) < info["max_batch"]:
            runs[-1].append(im)
        else:
            runs.append([im])
    return [plan_request(run, info) for run in runs]


def deadline_kwargs(remaining: float) -> dict:
    """The remaining budget of one attempt, sent twice: gRPC ``client_timeout`` (seconds) and Triton's request
    ``timeout`` (microseconds, at least 1: 0 would mean none), so the server drops work its caller gave up on."""
    return {"client_timeout": max(remaining, 1e-3), "timeout": max(1, int(remaining * 1e6))}


class DetectPlan:
    """The requests of one :meth:`GladClient.detect` call and what their answers mean (no I/O: the clients send).

    ``while (req := plan.next()) is not None: plan.answer(send(req))`` then ``plan.results``. An answer is the
    request's Detections, or the :class:`BadInputError` that refused it whole: then every image of it gets that
    refusal, except against a server without the ``errors`` output (before issue 27 a bad image failed its whole
    request), where a request of several images is resent one image at a time to find the refused one. Where
    ``errors`` is served a bad image fails alone inside an answered request, so a refusal of the whole request is
    about the request itself and nothing is resent (resending made the server count each image twice).
    """

    def __init__(self, images: Iterable[Any], info: dict):
        self.info = info
        self.results, good = prepare_all(images, info["resolution"])
        self._todo = deque(plan_requests(good, info))

    def next(self) -> Request | None:
        """The next request to send (the same one until :meth:`answer`), or None when every input is answered."""
        return self._todo[0] if self._todo else None

    def answer(self, got: list[Detection] | BadInputError) -> None:
        """The answer to :meth:`next`'s request: its Detections, or the refusal of the whole request."""
        req = self._todo.popleft()
        if isinstance(got, BadInputError):
            if len(req.images) > 1 and not self.info["errors"]:
                self._todo.extendleft(plan_request([im], self.info) for im in reversed(req.images))
                return
            got = refused_all(req.images, got)
        for im, d in zip(req.images, got):
            self.results[im.index] = d


# ---------------------------------------------------------------------------------------------- answers
def image_error(status: str | None, text: str, url: str | None) -> ServingError:
    """The typed error of one image the server failed (its ``errors`` element, already ``"<source>: <ErrorType>:
    <message>"``): :func:`routing.error_for` by status (``INVALID_ARGUMENT``: :class:`BadInputError`), ``url``
    kept. It is given to the caller on that image's Detection and never resent; ``retryable`` says whether
    sending the image again may help (``UNAVAILABLE``)."""
    err = routing.error_for(status, text)
    err.url = url
    return err


def refused(err: BadInputError, source: str) -> BadInputError:
    """A server refusal of one image, named by the caller's source (a path, or ``#<index>``)."""
    out = BadInputError(f"{source}: {err}", err.status, err.url)
    out.__cause__ = err
    return out


def refused_all(images: Sequence[Image], err: BadInputError) -> list[Detection]:
    """A request refused whole: the same refusal on each of its images' Detection, named by that image's source;
    nothing is resent."""
    return [Detection(source=im.source, error=refused(err, im.source)) for im in images]


def parse_response(arrays: Mapping[str, np.ndarray | None], sources: Sequence[str], info: dict,
                   threshold: float | None, url: str) -> list[Detection]:
    """One answered request's output arrays (``None`` for one not returned) -> one Detection per image
    (:func:`protocol.detections_from_arrays`, labelled with the served calibration or ``threshold``). An image the
    server failed gets its typed error (:func:`image_error`); without error texts (the ``errors`` output not
    declared by the model the metadata came from, but another replica failed the image) a failed image is still
    known by its sentinel score (-1; a real score is >= 0)."""
    dets = protocol.detections_from_arrays(arrays, sources, info["calibration"], threshold, url, map_size="working",
                                           error_for=lambda status, text: image_error(status, text, url))
    if arrays.get(protocol.ERRORS_OUTPUT) is None:
        dets = [d if not d.ok or d.score is None or d.score >= 0 else
                Detection(source=d.source, server=url, error=image_error(
                    "INTERNAL", f"{d.source}: the server could not score this image (failure sentinel; no error "
                                f"text: {protocol.ERRORS_OUTPUT!r} was not requested or not returned)", url))
                for d in dets]
    return dets
