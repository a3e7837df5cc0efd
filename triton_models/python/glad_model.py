"""Triton python-backend BLS model ``<prefix>_glad``: the whole GLAD loop server-side, one request per batch.

:class:`glad_runtime.pipeline.batch.GladPipeline` runs here with :class:`BlsEngines`, whose network calls are BLS requests
to ``<prefix>_unet``, ``<prefix>_vae_encoder``, ``<prefix>_vae_decoder``, ``<prefix>_dino`` (and ``_dino_ads``; with
ADS on, ``_ads_check`` when served: one request per check returning the distance map), so
those models keep their own instances and dynamic batching (several ``_glad`` instances, or several bundles, share
them). The version directory holds the bundle's ``config.json`` and, when calibrated, ``calibration.json``.

Inputs and outputs are the served contract of :mod:`glad_runtime.serving.protocol` (``images`` FP32 or
``image_files`` BYTES, the ``map_size`` request parameter, ``GLAD_OUTPUTS``). Files are decoded and preprocessed
here by the code ``glad detect`` runs (``core.images.load_image`` + ``prepare``), and every result is made by
:class:`glad_runtime.detector.Detector` (``detect_arrays`` + ``locate``: labels, regions), so a served result equals
the in-process one. The requests of a dynamic batch run as one pipeline call (results do not depend on batch
mates, project decision 2); a request with a corrupt file or a bad tensor gets INVALID_ARG alone (naming the image
index and the cause), and if the joint call fails every image is rerun alone.

Abandoned requests (issue 16): a request whose client cancelled it (``request.is_cancelled()``, e.g. the gRPC
call's deadline passed) or whose Triton request timeout (``request.timeout()``, microseconds, counted from the
start of ``execute``: the queue policy already rejected it if it expired while queued) has passed is not worth
finishing. Before the reconstruction starts it is answered at once (``CANCELLED`` / ``UNAVAILABLE`` "deadline
exceeded"); during it, :attr:`GladPipeline.should_stop` is checked before every DDIM step and stops the loop as
soon as *every* request of the dynamic batch is abandoned (live batch mates keep the joint call going; their
results do not depend on it). Such requests get the same errors, never a partial result.

Metrics (Triton's custom metrics API, at the server's metrics port, label ``model``): ``glad_images_total``
(``label``: normal / anomalous / unlabelled), ``glad_errors_total`` (``type``: the error class),
``glad_requests_abandoned_total`` (``reason``: cancelled / deadline), ``glad_ads_decisions_total`` (``state``:
the Detection's ``ads_state``), histograms ``glad_adaptive_step`` (timestep of the ADS decision),
``glad_score`` (raw score) and ``glad_normalized_score`` (calibrated bundles), and the counter
``glad_ddim_steps_saved_total`` (DDIM steps not run because a request was abandoned).
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
from glad_runtime.errors import GladError, InvalidInputError, RequestCancelledError
from glad_runtime.serving import protocol


def _error(message, code="INTERNAL"):
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


class _Metrics:
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


class _Watch:
    """Whether the requests of one ``execute`` call are abandoned: cancelled by the client or past their Triton
    request timeout (counted from ``start``, the beginning of ``execute``)."""

    def __init__(self, requests, start):
        self.requests = list(requests)
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
            return pb_utils.InferenceResponse(error=_error(f"request cancelled by the client; {detail}".rstrip("; "),
                                                           "CANCELLED"))
        us = self.requests[i].timeout() if hasattr(self.requests[i], "timeout") else 0
        return pb_utils.InferenceResponse(error=_error(
            f"deadline exceeded: request timeout expired ({us / 1e6:.3f} s); {detail}".rstrip("; "), "UNAVAILABLE"))


def _steps_left(message, steps):
    """DDIM steps not run, from RequestCancelledError's "stopped before DDIM step k/n" message."""
    import re

    m = re.search(r"step (\d+)/(\d+)", message)
    return max(0, int(m.group(2)) - int(m.group(1)) + 1) if m else 0


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        vdir = Path(args["model_repository"]) / args["model_version"]
        config = GladConfig.from_dict(json.loads((vdir / "config.json").read_text()))
        served = params.get("served_graphs")
        self.engines = BlsEngines(params["model_prefix"], config, int(params["network_max_batch"]),
                                  served.split(",") if served else None, int(args["model_version"]))
        calibration = None
        if (vdir / "calibration.json").is_file():
            from glad_runtime.core.calibration import Calibration

            calibration = Calibration.from_json((vdir / "calibration.json").read_text())
        self.detector = Detector(self.engines, config, calibration)
        self.config = config
        self.metrics = _Metrics(args.get("model_name", params.get("model_prefix", "") + "_glad"), config)

    def _request_inputs(self, request):
        """``(tensors [n, 3, R, R], LoadedImage-or-None per image, map_size)`` of one request.

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
            batch = self.detector.pipeline.validate_batch(tensors.as_numpy())
            return list(batch), [None] * len(batch), map_size
        arrays, images = [], []
        for k, element in enumerate(files.as_numpy().reshape(-1)):
            try:
                img = load_image(protocol.file_bytes(element))
            except GladError as e:
                raise InvalidInputError(f"{protocol.GLAD_FILE_INPUT}[{k}]: {e}") from e
            arrays.append(prepare(img, self.config.resolution, self.config.load_resolution))
            images.append(img)
        return arrays, images, map_size

    def execute(self, requests):
        watch = _Watch(requests, time.monotonic())
        responses = [None] * len(requests)
        items, spans = [], {}
        for i, r in enumerate(requests):
            gone = watch.state(i)
            if gone:  # abandoned before any work: answer at once
                self.metrics.inc("glad_requests_abandoned_total", reason=gone)
                responses[i] = watch.error(i, "nothing was computed")
                continue
            try:
                arrays, images, map_size = self._request_inputs(r)
            except InvalidInputError as e:
                self.metrics.inc("glad_errors_total", type=type(e).__name__)
                responses[i] = pb_utils.InferenceResponse(error=_error(str(e), "INVALID_ARG"))
                continue
            spans[i] = (len(items), len(arrays), map_size)
            items += list(zip(arrays, images))
        if items:
            sources = [f"#{k}" for k in range(len(items))]
            pipeline = self.detector.pipeline
            pipeline.should_stop = lambda: watch.all_abandoned(list(spans))
            try:
                dets = self.detector.detect_arrays(np.stack([a for a, _ in items]), sources)
            finally:
                pipeline.should_stop = None
            stopped = [d.error for d in dets if isinstance(d.error, RequestCancelledError)]
            if stopped:
                steps = len(pipeline.schedule.timesteps)
                self.metrics.inc("glad_ddim_steps_saved_total", _steps_left(str(stopped[0]), steps))
            for i, (start, n, map_size) in spans.items():
                part = dets[start:start + n]
                cancelled = [d.error for d in part if isinstance(d.error, RequestCancelledError)]
                if cancelled:
                    self.metrics.inc("glad_requests_abandoned_total", reason=watch.state(i) or "deadline")
                    responses[i] = watch.error(i, str(cancelled[0]))
                    continue
                part = [self.detector.locate(d, img) for d, (_, img) in zip(part, items[start:start + n])]
                for d in part:
                    self.metrics.detection(d)
                responses[i] = self._response(part, map_size)
        return responses

    def _response(self, dets, map_size):
        failed = [(k, d.error) for k, d in enumerate(dets) if not d.ok]
        if failed:
            k, e = failed[0]
            code = "INVALID_ARG" if isinstance(e, InvalidInputError) else "INTERNAL"
            return pb_utils.InferenceResponse(error=_error(f"image {k}: {type(e).__name__}: {e}", code))
        try:
            tensors = protocol.glad_output_arrays(dets, map_size)
        except Exception as e:  # a bug, not the caller's fault: say what, never a half response
            return pb_utils.InferenceResponse(error=_error(f"{type(e).__name__}: {e}", "INTERNAL"))
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])
