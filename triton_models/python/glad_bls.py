"""Shared code of the two served GLAD entry models (``glad_model.py``, one pipeline call per dynamic batch, and
``glad_inflight_model.py``, the in-flight pool): the BLS engines, request parsing, GLAD metrics, abandoned-request
checks. The repository generator copies this file beside each entry model's ``model.py`` (the python backend puts
the version directory on ``sys.path``), so both models import it as ``glad_bls``.

Metrics (Triton's custom metrics API, at the server's metrics port, label ``model``): ``glad_images_total``
(``label``: normal / anomalous / unlabelled), ``glad_errors_total`` (``type``: the error class),
``glad_requests_abandoned_total`` (``reason``: cancelled / deadline), ``glad_ads_decisions_total`` (``state``:
the Detection's ``ads_state``), histograms ``glad_adaptive_step`` (timestep of the ADS decision),
``glad_score`` (raw score) and ``glad_normalized_score`` (calibrated bundles), the counter
``glad_ddim_steps_saved_total`` (DDIM steps not run because a request was abandoned), the counter
``glad_requests_malformed_total`` (``reason``: empty / no_input / both_inputs / too_many_images / bad_parameter /
bad_tensor: requests refused whole as malformed; an oversized image counts per image as ``glad_errors_total``
``type`` ImageTooLargeError), and for the in-flight model the counter ``glad_requests_rejected_total``
(``reason``: pool_full, closing) and the gauge ``glad_inflight_images`` (images queued or in flight in its pool).
Every family is exported at zero from the model's start with its known label values
(``glad_runtime/serving/metrics_spec.py``); the ``glad_score`` buckets sit around the bundle's calibrated threshold.
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from glad_runtime.core.config import GladConfig
from glad_runtime.core.images import load_image
from glad_runtime.detector import Detector
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import GladError, ImageLoadError, InvalidInputError, ServerStartError
from glad_runtime.serving import protocol


def error(message, code="INTERNAL", tagged=False):
    """A ``pb_utils.TritonError`` with ``code`` (``INVALID_ARG``, ``UNAVAILABLE``, ``CANCELLED``, ``INTERNAL``).

    ``tagged``: start the message with the gRPC status name in brackets (``[INVALID_ARGUMENT] ...``,
    :func:`glad_runtime.serving.protocol.stream_error_status`): a gRPC stream carries an error as text only, so the
    in-flight model's clients read the status from the message.
    """
    if tagged:
        message = protocol.tag_stream_error(code, message)
    err = pb_utils.TritonError
    return err(message, getattr(err, code)) if hasattr(err, code) else err(message)


class BlsEngines(GraphEngines):
    """The Engines interface as BLS requests to the network models of one prefix (the shared
    :class:`~glad_runtime.engines.GraphEngines` calls, checks and fused ADS check over ``_run_graph``).

    Args:
        prefix: model prefix. config: the bundle's GladConfig. max_batch: the network models' max_batch_size.
        served: the network models served for this prefix (the ``served_graphs`` parameter; ``ads_check`` among
            them makes each ADS check one request returning only the distance map). None: repositories written
            before that parameter: the feature graphs, no fused check.
        version: the network models' version to call (this BLS model's own: during a rollout the old and the new
            networks are both loaded, and an image never mixes them); -1: the newest.
    Raises (calls): EngineError with the network model's error message.
    """

    _kind = "served feature model"

    def __init__(self, prefix, config, max_batch, served=None, version=-1):
        self.prefix, self.config, self.max_batch = prefix, config, max(1, int(max_batch))
        self.version = int(version)
        self._init_feature_graphs(network_graphs(config) if served is None else served)

    def _run_graph(self, graph, feeds, outputs):
        n = len(next(iter(feeds.values())))
        parts = []
        for s in range(0, n, self.max_batch):
            inputs = []
            for name, arr in feeds.items():
                inputs.append(pb_utils.Tensor(name, protocol.to_wire(arr[s:s + self.max_batch])))
            request = pb_utils.InferenceRequest(model_name=protocol.model_name(self.prefix, graph), inputs=inputs,
                                                requested_output_names=outputs, model_version=self.version)
            response = request.exec()
            if response.has_error():
                message = response.error().message()
                err = EngineError(f"{self.prefix}_{graph}: {message}")
                if any(s in message.lower() for s in ("unknown model", "is not found", "not ready", "unavailable")):
                    err.status = "UNAVAILABLE"  # a network model unloaded or restarting: retry on another replica
                raise err
            parts.append([pb_utils.get_output_tensor_by_name(response, o).as_numpy() for o in outputs])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


class Metrics:
    """GLAD metrics of one BLS model through ``pb_utils.MetricFamily`` (a no-op where the API is missing).

    Every family is created at construction with each known label value at zero
    (:func:`glad_runtime.serving.metrics_spec.known_series`; histograms with zero counts), so an alert reads 0
    from the model's start, never "no data"; other label values appear when first counted. Metrics never fail a
    request or the model's load (a failing call is dropped).

    Args:
        model: the ``model`` label. config: the bundle's GladConfig (``t_max``: adaptive-step buckets).
        calibration: the bundle's Calibration or None: ``glad_score`` buckets around its threshold
            (:func:`~glad_runtime.serving.metrics_spec.score_buckets`), else a 1-2-5 grid.
        inflight: the in-flight model (also ``glad_requests_rejected_total`` and ``glad_inflight_images``).
    """

    def __init__(self, model, config, calibration=None, inflight=False):
        from glad_runtime.serving import metrics_spec

        self.model, self.inflight = model, bool(inflight)
        self.ok = hasattr(pb_utils, "MetricFamily")
        self._families, self._metrics = {}, {}
        mf = getattr(pb_utils, "MetricFamily", None)
        self._hist = mf is not None and hasattr(mf, "HISTOGRAM")
        try:
            score = metrics_spec.score_buckets(calibration)
        except Exception:  # an odd calibration: the default grid rather than a failed load
            score = metrics_spec.score_buckets(None)
        self._buckets = {
            "glad_adaptive_step": metrics_spec.adaptive_step_buckets(getattr(config, "t_max", 1)),
            "glad_score": score,
            "glad_normalized_score": metrics_spec.normalized_score_buckets(),
        }
        self._help = {
            "glad_images_total": "Images scored by the GLAD BLS model, by label",
            "glad_errors_total": "Images or requests the GLAD BLS model answered with an error, by error type",
            "glad_requests_abandoned_total": "Requests stopped because their client cancelled them or their "
                                             "timeout passed, by reason",
            "glad_ads_decisions_total": "ADS outcomes of scored images, by ads_state",
            "glad_ddim_steps_saved_total": "DDIM steps not run because every request of a batch was abandoned",
            "glad_adaptive_step": "DDIM timestep at which ADS decided (scored images with a decision)",
            "glad_score": "Raw GLAD image score (top-K mean of the anomaly map)",
            "glad_normalized_score": "Calibrated image score in [0, 1], threshold at 0.5",
            "glad_requests_rejected_total": "Requests the in-flight model refused at once (retryable), by reason",
            "glad_inflight_images": "Images queued or in flight in the in-flight model's pool",
            "glad_requests_malformed_total": "Requests refused whole as malformed (INVALID_ARG), by reason",
        }
        for name, kind, labels in metrics_spec.known_series(self.inflight):
            if kind == "HISTOGRAM" and not self._hist:
                continue  # the fallback gauge of the last value starts with the first observation
            self._metric(name, kind, **labels)

    def _metric(self, name, kind, **labels):
        if not self.ok:
            return None
        key = (name, tuple(sorted(labels.items())))
        if key not in self._metrics:
            try:
                if name not in self._families:
                    family_kind = getattr(pb_utils.MetricFamily, kind)
                    self._families[name] = pb_utils.MetricFamily(name=name, description=self._help[name],
                                                                 kind=family_kind)
                extra = {"buckets": self._buckets[name]} if kind == "HISTOGRAM" else {}
                self._metrics[key] = self._families[name].Metric(labels=dict(labels, model=self.model), **extra)
            except Exception:  # metrics must never fail a request
                self._metrics[key] = None
        return self._metrics[key]

    def inc(self, name, value=1.0, **labels):
        """Add ``value`` to the counter ``name`` with ``labels``."""
        m = self._metric(name, "COUNTER", **labels)
        if m is not None and value:
            m.increment(float(value))

    def set(self, name, value):
        """Set the gauge ``name`` to ``value``."""
        m = self._metric(name, "GAUGE")
        if m is not None:
            m.set(float(value))

    def observe(self, name, value):
        """Observe ``value`` in the histogram ``name`` (a gauge of the last value where histograms are missing)."""
        if value is None or value != value:
            return
        m = self._metric(name, "HISTOGRAM" if self._hist else "GAUGE")
        if m is not None:
            (m.observe if self._hist else m.set)(float(value))

    def detection(self, d):
        """Count one answered Detection: label, ADS state, adaptive step, scores, or its error type."""
        if not d.ok:
            self.inc("glad_errors_total", type=type(d.error).__name__)
            return
        self.inc("glad_images_total", label=d.label or "unlabelled")
        self.inc("glad_ads_decisions_total", state=d.ads_state or "unknown")
        if d.adaptive_step is not None and d.adaptive_step >= 0:
            self.observe("glad_adaptive_step", d.adaptive_step)
        self.observe("glad_score", d.score)
        if d.normalized_score is not None:
            self.observe("glad_normalized_score", d.normalized_score)


class Watch:
    """Whether the requests of one ``execute`` call are abandoned: cancelled by the client or past their Triton
    request timeout (counted from ``start``, the beginning of ``execute``)."""

    def __init__(self, requests, start, tagged=False):
        self.requests, self.tagged = list(requests), tagged
        self.deadlines = []
        for r in self.requests:
            us = r.timeout() if hasattr(r, "timeout") else 0
            self.deadlines.append(start + us / 1e6 if us else None)
        self.start = start

    def state(self, i):
        """``None`` (live), ``"cancelled"`` or ``"deadline"`` for request ``i``."""
        r = self.requests[i]
        try:
            if hasattr(r, "is_cancelled") and r.is_cancelled():
                return "cancelled"
        except Exception:
            pass
        d = self.deadlines[i]
        return "deadline" if d is not None and time.monotonic() >= d else None

    def all_abandoned(self, indices):
        """A reason string when every request in ``indices`` is abandoned, else None (the pipeline's hook)."""
        states = [self.state(i) for i in indices]
        if not states or any(s is None for s in states):
            return None
        n_c = states.count("cancelled")
        return (f"every request of the batch was abandoned ({n_c} cancelled by the client, "
                f"{len(states) - n_c} past their timeout)")

    def error(self, i, detail=""):
        """The error response of abandoned request ``i``."""
        state = self.state(i) or "deadline"
        if state == "cancelled":
            return pb_utils.InferenceResponse(error=error(f"request cancelled by the client; {detail}".rstrip("; "),
                                                          "CANCELLED", self.tagged))
        us = self.requests[i].timeout() if hasattr(self.requests[i], "timeout") else 0
        return pb_utils.InferenceResponse(error=error(
            f"deadline exceeded: request timeout expired ({us / 1e6:.3f} s); {detail}".rstrip("; "), "UNAVAILABLE",
            self.tagged))


def steps_left(message, steps):
    """DDIM steps not run, from RequestCancelledError's "stopped before DDIM step k/n" message."""
    import re

    m = re.search(r"step (\d+)/(\d+)", message)
    return max(0, int(m.group(2)) - int(m.group(1)) + 1) if m else 0




class Served:
    """What both entry models load in ``initialize``: the bundle's config and calibration from the version
    directory, :class:`BlsEngines` on the network models of this version, the :class:`Detector` and the metrics;
    then the request parsing and response building both share (issue 27: per-image errors, limits).

    Readiness: ``initialize`` fails (the model does not load, naming what is missing) when a network model it calls
    is absent from the repository, so a partial deployment never shows this entry model READY; a network model
    that fails to load stops the server's start (Triton's ``--exit-on-error``). A network model unloaded later
    makes requests fail fast with ``UNAVAILABLE`` (retry elsewhere) and ``GladClient.health()`` say not ready.
    (``pb_utils.is_model_ready`` polled from ``initialize`` crashed tritonserver 2.51 with a
    ``boost::interprocess::lock_exception`` while the network models were loading, so it is not used.)

    Limits (parameters): ``max_images`` images per request (more is refused whole), ``max_image_pixels`` per
    image (the bundle's ``max_image_pixels`` by default; checked from the file's header before decoding).

    Attributes: ``params`` (the model's ``parameters``), ``config``, ``engines``, ``detector``, ``metrics``,
    ``model_config`` (the parsed model configuration), ``networks`` (served names of the network models).
    """

    def __init__(self, args, inflight=False):
        self.model_config = json.loads(args["model_config"])
        self.params = params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        vdir = Path(args["model_repository"]) / args["model_version"]
        self.config = config = GladConfig.from_dict(json.loads((vdir / "config.json").read_text()))
        served = params.get("served_graphs")
        version = int(args["model_version"])
        prefix = params["model_prefix"]
        self.engines = BlsEngines(prefix, config, int(params["network_max_batch"]),
                                  served.split(",") if served else None, version)
        self.networks = [protocol.model_name(prefix, g) for g in (served.split(",") if served else
                                                                   network_graphs(config))]
        self.version = version
        self.max_images = int(params.get("max_images") or protocol.DEFAULT_MAX_REQUEST_IMAGES)
        self.max_pixels = int(params.get("max_image_pixels") or config.max_image_pixels)
        calibration = None
        if (vdir / "calibration.json").is_file():
            from glad_runtime.core.calibration import Calibration

            calibration = Calibration.from_json((vdir / "calibration.json").read_text())
        self.detector = Detector(self.engines, config, calibration)
        self.metrics = Metrics(args.get("model_name", protocol.model_name(params.get("model_prefix", ""))), config,
                               calibration=calibration, inflight=inflight)
        missing = self.missing_networks(Path(args["model_repository"]).parent)
        if missing:  # a partial deployment: fail to load, so this entry model is never READY without them
            raise ServerStartError(f"network models missing from the model repository: {', '.join(missing)} (version "
                                   f"{version}); this entry model calls them, so it is not served without them")

    def missing_networks(self, repository):
        """The network models this entry model calls that have no ``<name>/<version>/`` with a ``config.pbtxt`` in
        ``repository`` (the model repository root)."""
        root = Path(repository)
        return [n for n in self.networks
                if not ((root / n / "config.pbtxt").is_file() and (root / n / str(self.version)).is_dir())]

    def _malformed(self, reason, message):
        self.metrics.inc("glad_requests_malformed_total", reason=reason)
        return InvalidInputError(message)

    def request_inputs(self, request):
        """``(items, map_size)`` of one request: one ``(array [3, R, R] or None, LoadedImage or None, error or
        None)`` per image. An image that cannot be used (unreadable, unsupported, over the pixel limit, non-finite
        or out-of-range values) carries its typed error and no array; the others are unaffected. Decoded images
        are released after preprocessing (only their size and mode are kept), and arrays are copies (they
        outlive the request's buffers in the in-flight model).

        Raises:
            InvalidInputError: the request is malformed as a whole (counted in ``glad_requests_malformed_total``):
                neither or both inputs, no image, more than ``max_images``, a tensor of the wrong shape or dtype,
                or a bad ``map_size`` parameter.
        """
        try:
            params = json.loads(request.parameters() or "{}") if hasattr(request, "parameters") else {}
        except ValueError:
            params = {}
        map_size = params.get(protocol.MAP_SIZE_PARAMETER, protocol.DEFAULT_MAP_SIZE)
        if map_size not in protocol.MAP_SIZES:
            raise self._malformed("bad_parameter", f"parameter {protocol.MAP_SIZE_PARAMETER} must be one of "
                                                   f"{protocol.MAP_SIZES}, got {map_size!r}")
        tensors = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_INPUT)
        files = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_FILE_INPUT)
        if (tensors is None) == (files is None):
            raise self._malformed("both_inputs" if tensors is not None else "no_input",
                                  f"send exactly one of {protocol.GLAD_FILE_INPUT!r} (encoded files) or "
                                  f"{protocol.GLAD_INPUT!r} (float32 [B, 3, R, R] in [-1, 1])")
        name = protocol.GLAD_INPUT if tensors is not None else protocol.GLAD_FILE_INPUT
        data = (tensors if tensors is not None else files).as_numpy()
        n = int(data.shape[0]) if data.ndim else 0
        if data.size == 0 or n == 0:
            raise self._malformed("empty", f"{name} holds no image (shape {list(data.shape)}); send at least one")
        if n > self.max_images:
            raise self._malformed("too_many_images", f"{name} holds {n} images; at most {self.max_images} per "
                                                     "request (parameter max_images): split the request")
        items = []
        if tensors is not None:
            r = self.config.resolution
            if data.ndim != 4 or data.shape[1:] != (3, r, r) or not np.issubdtype(data.dtype, np.floating):
                raise self._malformed("bad_tensor", f"expected {name} float32 [B, 3, {r}, {r}] in [-1, 1], got "
                                                    f"{data.dtype} {list(data.shape)}")
            for k in range(n):
                try:
                    arr = self.detector.pipeline.validate_batch(np.array(data[k:k + 1], copy=True))[0]
                    items.append((arr, None, None))
                except InvalidInputError as e:
                    items.append((None, None, InvalidInputError(f"{name}[{k}]: {e}")))
            return items, map_size
        if data.ndim != 1 and data.size != n:
            raise self._malformed("bad_tensor", f"expected {name} BYTES [B, 1] (one encoded file per row), got "
                                                f"{list(data.shape)}")
        for k, element in enumerate(data.reshape(-1)):
            label = f"{name}[{k}]"
            try:
                img = load_image(protocol.file_bytes(element), self.max_pixels, label=label)
                arr = self.detector.pipeline.preprocessor.image(img)
                items.append((arr, img.released(), None))
            except GladError as e:
                items.append((None, None, e))
            except Exception as e:  # a decoder failing on hostile bytes in its own way: still this image's fault
                items.append((None, None, ImageLoadError(f"{label}: not a readable image ({type(e).__name__})")))
        return items, map_size

    def legacy(self, request):
        """True when the request names its outputs and not ``errors`` (a client from before per-image errors): it
        cannot read per-image errors, so a failed image fails its request whole, as it did then."""
        try:
            names = request.requested_output_names()
        except Exception:
            return False
        return bool(names) and protocol.ERRORS_OUTPUT not in names

    def response(self, dets, map_size, tagged=False, legacy=False):
        """The InferenceResponse of one request's finished Detections (located, counted in the metrics; failed
        ones carry their error): every served output, with each failed image's error in ``errors`` and its
        sentinels elsewhere. A request fails whole (never a half response) only when its one image failed (a
        typed error: INVALID_ARG for the caller's input, UNAVAILABLE / CANCELLED / INTERNAL as in ``errors``), or
        for a ``legacy`` request with any failed image (``tagged``: see :func:`error`)."""
        for d in dets:
            self.metrics.detection(d)
        failed = [(k, d.error) for k, d in enumerate(dets) if not d.ok]
        if failed and (len(dets) == 1 or legacy):
            k, e = failed[0]
            code = {"INVALID_ARGUMENT": "INVALID_ARG", "CANCELLED": "CANCELLED",
                    "UNAVAILABLE": "UNAVAILABLE"}.get(protocol.error_status(e), "INTERNAL")
            where = "" if str(e).startswith(f"{protocol.GLAD_FILE_INPUT}[") or str(e).startswith(
                f"{protocol.GLAD_INPUT}[") else f"image {k}: "
            return pb_utils.InferenceResponse(error=error(f"{where}{type(e).__name__}: {e}", code, tagged))
        try:
            tensors = protocol.glad_output_arrays(dets, map_size)
        except Exception as e:  # a bug, not the caller's fault: say what, never a half response
            return pb_utils.InferenceResponse(error=error(f"{type(e).__name__}: {e}", "INTERNAL", tagged))
        # max_batch_size 0: the model writes the wire shapes itself ([B] scalars as [B, 1])
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, protocol.to_wire(v)) for k, v in tensors.items()])
