"""The served contract, defined once: model names, tensor names, dtypes, shapes, sentinels and the ``[B]`` rule.

Read by the model-repository generator (``triton_models.repository``: the ``config.pbtxt`` of every model), the
BLS model (``triton_models/python/glad_model.py``: the tensors it returns), the Triton engine
(:mod:`glad_runtime.engines.triton`: the client-side loop) and the client SDK (:mod:`glad_runtime.serving.client`).
numpy only, so every one of them can import it; the README's "Served contract" section is this module in prose.

``<prefix>_glad`` (the BLS model, the whole ADS/SAFF loop server-side), KServe v2 / Triton:

* inputs, exactly one per request (both ``optional`` in the config):

  * ``image_files`` BYTES ``[B, 1]``: encoded image files as they are (PNG, JPEG, TIFF, BMP, WebP; 8 or 16 bit;
    any mode ``glad detect`` reads), decoded and preprocessed on the server by the code ``glad detect`` runs
    (:func:`glad_runtime.core.images.load_image` + ``Preprocessor.image``), so a score does not depend on the sender. In the
    HTTP JSON form, which cannot carry binary, an element may be the file's standard base64 text instead.
  * ``images`` FP32 ``[B, 3, R, R]`` in [-1, 1] for clients that preprocess (x / 255 * 2 - 1, bilinear resize):
    anything else (outside [-1, 1], NaN, Inf, wrong shape or dtype) is refused with INVALID_ARGUMENT.

* request parameter ``map_size``: ``"original"`` (default: maps and masks at each image's original size, for a
  tensor input its ``R x R``) or ``"working"`` (``D x D``, ``dino_resolution``: smaller, what ``GladClient`` asks
  for). Regions are always in original-image pixels.
* outputs, per image: :data:`GLAD_OUTPUTS`. No output is ever NaN: undefined values are the documented sentinels,
  and the ``calibrated`` / ``ads_states`` / ``pixel_thresholds`` fields say why. Per-image scalars are declared
  ``dims: [1]`` with ``reshape: { shape: [ ] }``: the model sees ``[B]``, a client sends and receives ``[B, 1]``
  (:func:`to_wire` / :func:`from_wire`). When the images of one request differ in original size, ``anomaly_maps``
  and ``defect_masks`` are zero-padded to the largest; the valid part of image k is ``[:H_k, :W_k]`` with
  ``(H_k, W_k) = image_sizes[k]``.

Failures: a request with a corrupt file or bad tensor fails alone with INVALID_ARGUMENT naming the image index and
the cause (the other requests of its dynamic batch complete); a network failure is INTERNAL.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from glad_runtime.errors import InvalidInputError, UsageError

__all__ = ["TensorSpec", "GLAD_MODEL", "INFLIGHT_MODEL", "ENTRY_MODELS", "is_entry_model",
           "tag_stream_error", "stream_error_status", "GLAD_INPUT", "GLAD_FILE_INPUT", "MAP_SIZE_PARAMETER", "MAP_SIZES",
           "DEFAULT_MAP_SIZE", "ERRORS_OUTPUT", "DEFAULT_MAX_REQUEST_IMAGES",
           "image_error_text", "parse_image_error", "error_status",
           "GLAD_OUTPUTS", "GLAD_OUTPUT_NAMES", "LATER_OUTPUTS", "REGION_COLUMNS", "region_arrays",
           "regions_from_arrays", "NUMPY_DTYPES", "ADS_STATE_CODES", "model_name", "glad_inputs",
           "glad_outputs", "to_wire", "from_wire", "file_bytes", "glad_output_arrays", "detections_from_arrays",
           "calibration_parameter", "calibration_from_parameter", "contract_table"]

#: The BLS model's name suffix: ``<prefix>_glad`` (one pipeline call per dynamic batch of requests).
GLAD_MODEL = "glad"
#: The in-flight model's name suffix: ``<prefix>_glad_inflight`` (decoupled; requests join one step-level pool).
#: Same inputs, parameters and outputs as ``<prefix>_glad``; answered over gRPC streams only.
INFLIGHT_MODEL = "glad_inflight"
#: The entry models a client calls (the others are the networks they call); drained first, rolled out last.
ENTRY_MODELS = (GLAD_MODEL, INFLIGHT_MODEL)
#: Preprocessed input: FP32 ``[B, 3, R, R]`` in [-1, 1].
GLAD_INPUT = "images"
#: Encoded-file input: BYTES ``[B, 1]``.
GLAD_FILE_INPUT = "image_files"
#: Request parameter choosing the size of the returned maps and masks (:data:`MAP_SIZES`).
MAP_SIZE_PARAMETER = "map_size"
MAP_SIZES = ("original", "working")
#: The served default of ``map_size``: ``"working"`` (``D x D`` per image, bounded whatever the image's size);
#: ``"original"`` only on request (then bounded by the pixel limit).
DEFAULT_MAP_SIZE = "working"
#: Per-image error output (BYTES ``[B, 1]``): ``b""`` for a scored image, else :func:`image_error_text`.
ERRORS_OUTPUT = "errors"
#: Default images per request of an entry model (the ``max_images`` parameter); more is refused whole.
DEFAULT_MAX_REQUEST_IMAGES = 64

#: Triton data types -> numpy dtypes (the ones this project's models use; BYTES elements are Python bytes).
NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
                "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_,
                "TYPE_STRING": np.object_}

#: ``ads_states`` codes: index in :data:`glad_runtime.core.detection.ADS_STATES`.
ADS_STATE_CODES = {"off": 0, "triggered": 1, "forced": 2, "undecided": 3}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it: ``dims`` without the batch dimension (-1 = dynamic);
    ``reshape`` True for per-sample scalars (served as ``[B, 1]``, seen by the model as ``[B]``); ``optional``
    for inputs a request may omit."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: bool = False
    optional: bool = False

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of ``data_type``."""
        return np.dtype(NUMPY_DTYPES[self.data_type])

    def pbtxt(self, batched: bool = True) -> str:
        """The ``config.pbtxt`` entry (``{ name: ... data_type: ... dims: [...] reshape: ... optional: ... }``).

        ``batched`` False: for a model with ``max_batch_size: 0`` (the entry models): the batch dimension is
        declared (``-1``) and per-sample scalars are ``[-1, 1]`` without a reshape; the wire shapes are the same.
        """
        dims = list(self.dims) if self.dims else [1]
        if not batched:
            return (f'{{ name: "{self.name}" data_type: {self.data_type} dims: {[-1] + dims}'
                    + (" optional: true" if self.optional else "") + " }")
        s = f'{{ name: "{self.name}" data_type: {self.data_type} dims: {dims}'
        if self.reshape or not self.dims:
            s += " reshape: { shape: [ ] }"
        if self.optional:
            s += " optional: true"
        return s + " }"


#: Columns of ``region_boxes``, in order: a :class:`~glad_runtime.core.regions.Region`'s fields. FP64, so every
#: value is the one ``regions`` carries as JSON (an ``area`` up to the pixel limit, 1e8, is exact; FP32 is exact
#: only to 2**24).
REGION_COLUMNS = ("x", "y", "width", "height", "area", "peak", "mean")
REGION_COLUMNS_COUNT = len(REGION_COLUMNS)
#: Outputs a client requests only where the entry model declares them (added after the first served contract; a
#: request naming an undeclared output is refused): ``errors`` (issue 27), ``region_counts`` / ``region_boxes``
#: (issue 32). Every other output of :data:`GLAD_OUTPUTS` is required.
LATER_OUTPUTS = (ERRORS_OUTPUT, "region_counts", "region_boxes")

#: Outputs of ``<prefix>_glad``: ``(name, Triton type, per-image dims, meaning)``; ``-1`` = variable (the map size;
#: for ``region_boxes`` the request's largest region count).
GLAD_OUTPUTS = (
    ("scores", "TYPE_FP32", (), "raw image score, the top-K mean of the anomaly map (>= 0)"),
    ("calibrated", "TYPE_BOOL", (), "True when the served bundle is calibrated (labels and normalised scores set)"),
    ("labels", "TYPE_INT8", (), "1 anomalous (score > threshold), 0 normal; -1 when not calibrated"),
    ("thresholds", "TYPE_FP32", (), "the raw image threshold of the label; -1 when not calibrated"),
    ("normalized_scores", "TYPE_FP32", (), "calibrated score in [0, 1], threshold at 0.5; -1 when not calibrated"),
    ("ads_states", "TYPE_INT8", (), "ADS outcome: 0 off, 1 triggered (SAFF), 2 forced (last candidate step), "
                                    "3 undecided"),
    ("adaptive_steps", "TYPE_INT64", (), "DDIM timestep ADS decided at; -1 when ads_states is 0 or 3"),
    ("ads_scores", "TYPE_FP32", (), "top-10 ADS distance at the decision (>= 0); -1 when ads_states is 0 or 3"),
    ("saff_triggered", "TYPE_BOOL", (), "True when ads_states is 1 (kept for older clients)"),
    ("image_sizes", "TYPE_INT32", (2,), "(H, W) of the image as decoded (EXIF-upright); R, R for a tensor"),
    ("anomaly_maps", "TYPE_FP32", (-1, -1), "anomaly map (raw units) at map_size; zero-padded, see image_sizes"),
    ("pixel_thresholds", "TYPE_FP32", (), "raw pixel threshold of the masks and regions; -1 when the bundle has "
                                          "none (then masks are 0 and regions is null)"),
    ("defect_masks", "TYPE_UINT8", (-1, -1), "1 where anomaly_maps > pixel_thresholds, else 0; at map_size"),
    ("regions", "TYPE_STRING", (), "JSON text: a list of {x, y, width, height, area, peak, mean} in original-image "
                                   "pixels, highest peak first ([] none found); null without a pixel threshold"),
    ("region_counts", "TYPE_INT32", (), "number of regions (the rows of region_boxes in use; 0 none found); -1 "
                                        "without a pixel threshold (regions null) or for a failed image"),
    ("region_boxes", "TYPE_FP64", (-1, REGION_COLUMNS_COUNT), "the regions as plain numbers (no JSON to parse): row "
                                                              "j is the j-th region of regions, columns x, y, width, "
                                                              "height, area, peak, mean; K = the largest "
                                                              "region_counts of the request (at least 1); unused "
                                                              "rows are -1"),
    ("errors", "TYPE_STRING", (), "empty when the image was scored; else `[STATUS] ErrorType: message` (STATUS a "
                                  "gRPC status name: INVALID_ARGUMENT never retry, UNAVAILABLE retry) and every "
                                  "other output of that image holds its failure sentinel (score -1, size 0 x 0)"),
)
GLAD_OUTPUT_NAMES = tuple(o[0] for o in GLAD_OUTPUTS)


def contract_table() -> str:
    """:data:`GLAD_OUTPUTS` as a Markdown table (name, datatype, shape with the batch, meaning) for the README."""
    kserve = {"TYPE_FP32": "FP32", "TYPE_FP64": "FP64", "TYPE_BOOL": "BOOL", "TYPE_INT8": "INT8",
              "TYPE_INT32": "INT32", "TYPE_INT64": "INT64", "TYPE_UINT8": "UINT8", "TYPE_STRING": "BYTES"}
    rows = ["| output | datatype | shape | meaning |", "|---|---|---|---|"]
    for name, t, dims, meaning in GLAD_OUTPUTS:
        axes = iter(("H", "W") if tuple(dims) == (-1, -1) else ("K",))  # maps: H x W; region rows: K
        shape = "[B, 1]" if not dims else "[B, " + ", ".join(next(axes) if d == -1 else str(d) for d in dims) + "]"
        rows.append(f"| `{name}` | {kserve[t]} | {shape} | {meaning} |")
    return "\n".join(rows)


def model_name(prefix: str, graph: str = GLAD_MODEL) -> str:
    """``<prefix>_<graph>``: the served name of a bundle's model (``glad``, ``unet``, ``vae_encoder``, ...)."""
    return f"{prefix}_{graph}"


#: Triton python-backend error codes -> the gRPC status names a client sees (KServe v2 over gRPC).
_GRPC_STATUS = {"INVALID_ARG": "INVALID_ARGUMENT", "UNAVAILABLE": "UNAVAILABLE", "CANCELLED": "CANCELLED",
                "INTERNAL": "INTERNAL", "NOT_FOUND": "NOT_FOUND", "UNSUPPORTED": "UNIMPLEMENTED"}
_TAG = re.compile(r"^\[([A-Z_]+)\] ")


def tag_stream_error(code: str, message: str) -> str:
    """``"[<gRPC status>] <message>"``: how ``<prefix>_glad_inflight`` words its errors. A gRPC stream
    (``ModelStreamInferResponse.error_message``) carries an error as text without a status code, so the status
    leads the text: ``[INVALID_ARGUMENT]`` (bad input: never retry), ``[UNAVAILABLE]`` (pool full, closing, or
    ``deadline exceeded``), ``[CANCELLED]``, ``[INTERNAL]``."""
    return f"[{_GRPC_STATUS.get(code, code)}] {message}"


def stream_error_status(message: str) -> tuple[str | None, str]:
    """``(status or None, message without the tag)`` of a stream error (:func:`tag_stream_error`); None for
    errors Triton itself sent (unknown model, server shutting down), which carry no tag."""
    m = _TAG.match(message or "")
    return (m.group(1), message[m.end():]) if m else (None, message or "")


def error_status(err: BaseException) -> str:
    """The gRPC status name a per-image error is reported with: ``INVALID_ARGUMENT`` for the caller's input (any
    ``ValueError``: unreadable, unsupported or oversized image, bad tensor; never retry), ``CANCELLED`` for an
    abandoned request, the error's own ``status`` for a serving error, else ``INTERNAL``."""
    from glad_runtime.errors import RequestCancelledError

    if isinstance(err, RequestCancelledError):
        return "CANCELLED"
    status = getattr(err, "status", None)
    if isinstance(status, str) and status:
        return status
    return "INVALID_ARGUMENT" if isinstance(err, ValueError) else "INTERNAL"


def image_error_text(err: BaseException) -> str:
    """One image's ``errors`` element: ``"[STATUS] ErrorType: message"`` (:func:`error_status`). The message never
    holds a server path: images sent as bytes are named ``image_files[k]``."""
    return f"[{error_status(err)}] {type(err).__name__}: {err}"


_IMAGE_ERROR = re.compile(r"^\[([A-Z_]+)\] ([A-Za-z_][A-Za-z0-9_]*): (.*)$", re.S)


def parse_image_error(text: str | bytes) -> tuple[str, str, str] | None:
    """Inverse of :func:`image_error_text`: ``(status, error type name, message)``, or None for ``""`` (the image
    was scored). Text in another form is ``("INTERNAL", "ServingError", text)``."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", "replace")
    if not text:
        return None
    m = _IMAGE_ERROR.match(text)
    return (m.group(1), m.group(2), m.group(3)) if m else ("INTERNAL", "ServingError", text)


def is_entry_model(name: str) -> bool:
    """True for a served name ending in one of :data:`ENTRY_MODELS` (``<prefix>_glad``, ``<prefix>_glad_inflight``)."""
    return any(name.endswith("_" + m) for m in ENTRY_MODELS)


def glad_inputs(resolution: int) -> list[TensorSpec]:
    """The BLS model's input specs for a bundle of ``resolution`` R (both optional: a request sends one)."""
    return [TensorSpec(GLAD_INPUT, "TYPE_FP32", (3, resolution, resolution), optional=True),
            TensorSpec(GLAD_FILE_INPUT, "TYPE_STRING", (), reshape=True, optional=True)]


def glad_outputs() -> list[TensorSpec]:
    """The BLS model's output specs (:data:`GLAD_OUTPUTS`)."""
    return [TensorSpec(n, t, tuple(dims), reshape=not dims) for n, t, dims, _ in GLAD_OUTPUTS]


def to_wire(array: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
    """A tensor as it crosses the wire: ``[B]`` -> ``[B, 1]`` (per-sample scalars, declared ``dims: [1]``);
    other shapes unchanged. ``dims``: the declared per-sample dims when known (the reshape applies only to
    ``[1]``)."""
    array = np.ascontiguousarray(array)
    if array.ndim == 1 and (dims is None or list(dims) == [1]):
        return array[:, None]
    return array


def from_wire(array: np.ndarray, batch: int, spec: TensorSpec) -> np.ndarray:
    """A received tensor as the model declared it: per-sample scalars ``[B, 1]`` -> ``[B]``, dtype checked.

    Raises:
        InvalidInputError: the array's size does not fit ``batch`` images of ``spec``.
    """
    a = np.asarray(array)
    if not spec.dims:
        if a.size != batch:
            raise InvalidInputError(f"{spec.name}: {a.size} values for {batch} images")
        return a.reshape(batch).astype(spec.dtype, copy=False)
    return a.astype(spec.dtype, copy=False)


_MAGIC = (b"\x89PNG", b"\xff\xd8", b"II*\x00", b"MM\x00*", b"BM", b"RIFF", b"GIF8")


def file_bytes(element: Any) -> bytes:
    """One ``image_files`` element -> the file's bytes: raw bytes as they are; the standard base64 text of a file
    (the HTTP JSON form, which cannot carry binary) decoded. Anything else is passed on unchanged for the decoder
    to refuse with its own message."""
    data = bytes(element) if not isinstance(element, str) else element.encode("ascii", "replace")
    if data.startswith(_MAGIC):
        return data
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return data


def _sentinel(v: float | None) -> float:
    return -1.0 if v is None or not np.isfinite(v) else float(v)


def glad_output_arrays(detections: Sequence, map_size: str = "original") -> dict[str, np.ndarray]:
    """Model side: the output tensors of one request (``[B]`` per-image scalars) from its scored Detections
    (:meth:`glad_runtime.detector.Detector.locate` already applied, so ``original_size`` and ``regions`` are set).

    Args:
        detections: the request's B Detections, each scored one with its ``anomaly_map [D, D]``; a failed one
            (``error`` set) gets its :func:`image_error_text` in ``errors`` and sentinels elsewhere (score -1,
            size ``[0, 0]``, an all-zero map and mask, regions ``null``, ``ads_states`` 3).
        map_size: ``"original"`` or ``"working"`` (:data:`MAP_SIZES`).
    Returns:
        ``{name: array}`` in :data:`GLAD_OUTPUT_NAMES` order; no NaN anywhere (sentinels per :data:`GLAD_OUTPUTS`).
    Raises:
        UsageError: unknown ``map_size``. InvalidInputError: a Detection without a map.
    """
    from glad_runtime.core.regions import defect_mask

    if map_size not in MAP_SIZES:
        raise UsageError(f"{MAP_SIZE_PARAMETER} must be one of {MAP_SIZES}, got {map_size!r}")
    empty = np.zeros((0, 0), np.float32)
    maps = [empty if not d.ok else d.map_at_original_size() if map_size == "original" else d.anomaly_map
            for d in detections]
    if any(m is None for m in maps):
        raise InvalidInputError("every scored detection needs its anomaly map")
    h = max(m.shape[0] for m in maps)
    w = max(m.shape[1] for m in maps)
    padded = np.zeros((len(maps), h, w), np.float32)
    masks = np.zeros((len(maps), h, w), np.uint8)
    for k, (d, m) in enumerate(zip(detections, maps)):
        padded[k, :m.shape[0], :m.shape[1]] = m
        if d.ok and d.pixel_threshold is not None:
            masks[k, :m.shape[0], :m.shape[1]] = defect_mask(m, d.pixel_threshold)
    good = [d.ok for d in detections]
    arrays = {
        "scores": np.array([d.score if d.ok else -1.0 for d in detections], np.float32),
        "calibrated": np.array([d.label is not None for d in detections], bool),
        "labels": np.array([-1 if d.label is None else int(d.label == "anomalous") for d in detections], np.int8),
        "thresholds": np.array([_sentinel(d.threshold) for d in detections], np.float32),
        "normalized_scores": np.array([_sentinel(d.normalized_score) for d in detections], np.float32),
        "ads_states": np.array([ADS_STATE_CODES[d.ads_state] if d.ok else ADS_STATE_CODES["undecided"]
                                for d in detections], np.int8),
        "adaptive_steps": np.array([d.adaptive_step if d.ads_state in ("triggered", "forced") else -1
                                    for d in detections], np.int64),
        "ads_scores": np.array([_sentinel(d.ads_score) if d.ads_state in ("triggered", "forced") else -1.0
                                for d in detections], np.float32),
        "saff_triggered": np.array([d.ads_state == "triggered" for d in detections], bool),
        "image_sizes": np.array([list(d.original_size) if d.ok else [0, 0] for d in detections], np.int32)
        .reshape(len(detections), 2),
        "anomaly_maps": padded,
        "pixel_thresholds": np.array([_sentinel(d.pixel_threshold) for d in detections], np.float32),
        "defect_masks": masks,
        "regions": np.array([json.dumps(None if d.regions is None else [r.to_dict() for r in d.regions],
                                        allow_nan=False).encode() for d in detections], dtype=np.object_),
        **region_arrays(detections),
        ERRORS_OUTPUT: np.array([b"" if ok else image_error_text(d.error).encode() for d, ok in zip(detections, good)],
                                dtype=np.object_),
    }
    assert tuple(arrays) == GLAD_OUTPUT_NAMES
    return {k: np.ascontiguousarray(v) if v.dtype != np.object_ else v for k, v in arrays.items()}


def region_arrays(detections: Sequence) -> dict[str, np.ndarray]:
    """``region_counts`` int32 ``[B]`` and ``region_boxes`` float64 ``[B, K, 7]`` (:data:`REGION_COLUMNS`) of one
    request's Detections: the numbers of each image's ``regions`` in their order; ``K`` = the largest count of the
    request, at least 1 (no zero-size tensor on the wire); unused rows -1. An image without regions (no pixel
    threshold, or failed) has count -1 and only -1 rows."""
    counts = np.array([-1 if not d.ok or d.regions is None else len(d.regions) for d in detections], np.int32)
    k = max(1, int(counts.max(initial=0)))
    boxes = np.full((len(detections), k, REGION_COLUMNS_COUNT), -1.0, np.float64)
    for b, (d, n) in enumerate(zip(detections, counts)):
        if n > 0:
            boxes[b, :n] = [[getattr(r, c) for c in REGION_COLUMNS] for r in d.regions]
    return {"region_counts": counts, "region_boxes": boxes}


def regions_from_arrays(counts: np.ndarray, boxes: np.ndarray) -> list:
    """Inverse of :func:`region_arrays` (what a client reading ``region_counts`` / ``region_boxes`` instead of the
    ``regions`` JSON does): per image a list of :class:`~glad_runtime.core.regions.Region`, or None where the
    count is -1."""
    from glad_runtime.core.regions import Region

    counts = np.asarray(counts).reshape(-1)
    boxes = np.asarray(boxes, np.float64).reshape(len(counts), -1, REGION_COLUMNS_COUNT)
    return [None if n < 0 else [Region(*(int(v) for v in row[:5]), float(row[5]), float(row[6]))
                                for row in boxes[b, :n]] for b, n in enumerate(counts)]


def detections_from_arrays(arrays: Mapping[str, np.ndarray], sources: Sequence[str], calibration=None,
                           threshold: float | None = None, server: str | None = None,
                           map_size: str = "working", error_for=None) -> list:
    """Client side: the received tensors of one ``<prefix>_glad`` response -> one ``Detection`` per image.

    The label and normalised score are recomputed with :func:`glad_runtime.core.calibration.label` from the raw
    score and the served calibration (:func:`calibration_from_parameter`), so a client ``threshold`` override
    behaves exactly as ``glad detect --threshold`` (label and the 0.5 point of ``normalized_score`` move together).
    Maps are cut to their valid part; ``map_size`` says what the request asked for (``"working"``: ``D x D``).
    An image with a non-empty ``errors`` element becomes a failed Detection whose ``error`` is
    ``error_for(status, message)`` (default: a :class:`~glad_runtime.errors.ServingError` with ``status``); the
    ``errors`` output may be absent (servers before it), then every image was scored. Regions are read from the
    ``regions`` JSON; ``region_counts`` / ``region_boxes`` (the same numbers) are not needed and may be absent.

    Raises:
        InvalidInputError: a tensor whose size does not fit the batch.
    """
    from glad_runtime.core.calibration import label
    from glad_runtime.core.detection import ADS_STATES, Detection
    from glad_runtime.core.regions import Region
    from glad_runtime.errors import ServingError

    n = len(sources)
    specs = {s.name: s for s in glad_outputs()}
    o = {name: from_wire(arrays[name], n, specs[name]) for name in GLAD_OUTPUT_NAMES
         if name not in LATER_OUTPUTS or arrays.get(name) is not None}
    dets = []
    for k, source in enumerate(sources):
        failed = parse_image_error(o[ERRORS_OUTPUT][k]) if ERRORS_OUTPUT in o else None
        if failed is not None:
            status, kind, message = failed
            text = f"{source}: {kind}: {message}"
            err = error_for(status, text) if error_for is not None else ServingError(text, status)
            dets.append(Detection(source=source, error=err, server=server))
            continue
        score = float(o["scores"][k])
        v = label(score, calibration, threshold)
        state = ADS_STATES[int(o["ads_states"][k])]
        decided = state in ("triggered", "forced")
        size = (int(o["image_sizes"][k][0]), int(o["image_sizes"][k][1]))
        amap = o["anomaly_maps"][k]
        if map_size == "original":
            amap = amap[:size[0], :size[1]]
        pt = float(o["pixel_thresholds"][k])
        regions = json.loads(bytes(o["regions"][k]))
        dets.append(Detection(source=source, score=score, normalized_score=v.normalized_score, label=v.label,
                              threshold=v.threshold, threshold_source=v.threshold_source,
                              adaptive_step=int(o["adaptive_steps"][k]), ads_state=state,
                              ads_score=float(o["ads_scores"][k]) if decided else None,
                              saff_triggered=bool(o["saff_triggered"][k]), anomaly_map=np.ascontiguousarray(amap),
                              original_size=size, pixel_threshold=pt if pt >= 0 else None,
                              regions=None if regions is None else [Region.from_dict(r) for r in regions],
                              server=server))
    return dets


def calibration_parameter(calibration) -> str:
    """The ``calibration`` parameter of ``<prefix>_glad``'s config: the calibration as compact JSON ("" when
    uncalibrated), so a client labels with the same calibration as the server."""
    return "" if calibration is None else json.dumps(calibration.to_dict(), separators=(",", ":"), sort_keys=True)


def calibration_from_parameter(text: str | None):
    """Inverse of :func:`calibration_parameter`: a ``Calibration`` or None."""
    if not text:
        return None
    from glad_runtime.core.calibration import Calibration

    return Calibration.from_dict(json.loads(text))
