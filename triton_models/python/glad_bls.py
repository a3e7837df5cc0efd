"""Shared code of the two served GLAD entry models (``glad_model.py``, one pipeline call per dynamic batch, and
``glad_inflight_model.py``, the in-flight pool): the BLS engines, request parsing, GLAD metrics, abandoned-request
checks. The repository generator copies this file beside each entry model's ``model.py`` (the python backend puts
the version directory on ``sys.path``), so both models import it as ``glad_bls``.

Metrics (Triton's custom metrics API, at the server's metrics port, label ``model``): ``glad_images_total``
(``label``: normal / anomalous / unlabelled), ``glad_errors_total`` (``type``: the error class),
``glad_requests_abandoned_total`` (``reason``: cancelled / deadline), ``glad_ads_decisions_total`` (``state``:
the Detection's ``ads_state``), histograms ``glad_adaptive_step`` (timestep of the ADS decision),
``glad_score`` (raw score) and ``glad_normalized_score`` (calibrated bundles), the counter
``glad_ddim_steps_saved_total`` (DDIM steps not run because a request was abandoned), and for the in-flight model
the counter ``glad_requests_rejected_total`` (``reason``: pool_full, closing) and the gauge
``glad_inflight_images`` (images queued or in flight in its pool).
"""

import json
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from glad_runtime.core.config import GladConfig
from glad_runtime.core.images import load_image, prepare
from glad_runtime.detector import Detector
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import GladError, InvalidInputError
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
                raise EngineError(f"{self.prefix}_{graph}: {response.error().message()}")
            parts.append([pb_utils.get_output_tensor_by_name(response, o).as_numpy() for o in outputs])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


class Metrics:
    """GLAD metrics of one BLS model through ``pb_utils.MetricFamily`` (a no-op where the API is missing)."""

    def __init__(self, model, config):
        self.model = model
        self.ok = hasattr(pb_utils, "MetricFamily")
        self._families, self._metrics = {}, {}
        mf = getattr(pb_utils, "MetricFamily", None)
        self._hist = mf is not None and hasattr(mf, "HISTOGRAM")
        t_top = max(1, int(config.t_max))
        self._buckets = {
            "glad_adaptive_step": sorted({int(round(t_top * k / 10)) for k in range(1, 11)}),
            "glad_score": [1e-3, 3e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0],
            "glad_normalized_score": [0.1 * k for k in range(1, 11)],
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
        }

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
    directory, :class:`BlsEngines` on the network models of this version, the :class:`Detector` and the metrics.

    Attributes: ``params`` (the model's ``parameters``), ``config``, ``engines``, ``detector``, ``metrics``,
    ``model_config`` (the parsed model configuration).
    """

    def __init__(self, args):
        self.model_config = json.loads(args["model_config"])
        self.params = params = {k: v["string_value"] for k, v in self.model_config.get("parameters", {}).items()}
        vdir = Path(args["model_repository"]) / args["model_version"]
        self.config = config = GladConfig.from_dict(json.loads((vdir / "config.json").read_text()))
        served = params.get("served_graphs")
        self.engines = BlsEngines(params["model_prefix"], config, int(params["network_max_batch"]),
                                  served.split(",") if served else None, int(args["model_version"]))
        calibration = None
        if (vdir / "calibration.json").is_file():
            from glad_runtime.core.calibration import Calibration

            calibration = Calibration.from_json((vdir / "calibration.json").read_text())
        self.detector = Detector(self.engines, config, calibration)
        self.metrics = Metrics(args.get("model_name", protocol.model_name(params.get("model_prefix", ""))), config)

    def request_inputs(self, request):
        """``(tensors [n, 3, R, R], LoadedImage-or-None per image, map_size)`` of one request; the arrays are
        copies (they outlive the request's input buffers in the in-flight model).

        Raises:
            InvalidInputError: neither or both inputs, a corrupt file (naming its index), a bad tensor, or a bad
                ``map_size`` parameter.
        """
        params = json.loads(request.parameters() or "{}") if hasattr(request, "parameters") else {}
        map_size = params.get(protocol.MAP_SIZE_PARAMETER, "original")
        if map_size not in protocol.MAP_SIZES:
            raise InvalidInputError(f"parameter {protocol.MAP_SIZE_PARAMETER} must be one of {protocol.MAP_SIZES}, "
                                    f"got {map_size!r}")
        tensors = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_INPUT)
        files = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_FILE_INPUT)
        if (tensors is None) == (files is None):
            raise InvalidInputError(f"send exactly one of {protocol.GLAD_FILE_INPUT!r} (encoded files) or "
                                    f"{protocol.GLAD_INPUT!r} (float32 [B, 3, R, R] in [-1, 1])")
        if tensors is not None:
            batch = self.detector.pipeline.validate_batch(np.array(tensors.as_numpy(), copy=True))
            return list(batch), [None] * len(batch), map_size
        if files.as_numpy().size == 0:
            raise InvalidInputError(f"{protocol.GLAD_FILE_INPUT} holds no image")
        arrays, images = [], []
        for k, element in enumerate(files.as_numpy().reshape(-1)):
            try:
                img = load_image(protocol.file_bytes(element))
            except GladError as e:
                raise InvalidInputError(f"{protocol.GLAD_FILE_INPUT}[{k}]: {e}") from e
            arrays.append(prepare(img, self.config.resolution, self.config.load_resolution))
            images.append(img)
        return arrays, images, map_size

    def response(self, dets, map_size, tagged=False):
        """The InferenceResponse of one request's finished Detections (located, counted in the metrics): the
        served outputs, or the first failed image's error (INVALID_ARG for bad input, else INTERNAL; ``tagged``:
        see :func:`error`), never a half response."""
        for d in dets:
            self.metrics.detection(d)
        failed = [(k, d.error) for k, d in enumerate(dets) if not d.ok]
        if failed:
            k, e = failed[0]
            code = "INVALID_ARG" if isinstance(e, InvalidInputError) else "INTERNAL"
            return pb_utils.InferenceResponse(error=error(f"image {k}: {type(e).__name__}: {e}", code, tagged))
        try:
            tensors = protocol.glad_output_arrays(dets, map_size)
        except Exception as e:  # a bug, not the caller's fault: say what, never a half response
            return pb_utils.InferenceResponse(error=error(f"{type(e).__name__}: {e}", "INTERNAL", tagged))
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])
