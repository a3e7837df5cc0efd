"""Triton python-backend model ``<prefix>_glad_inflight``: in-flight batching across requests (issue 17).

A **decoupled** model (``model_transaction_policy { decoupled: true }``): ``execute`` only checks and queues its
requests and returns at once; one loop thread drives :class:`glad_runtime.pipeline.stream.StepScheduler` over the
network models (BLS requests through :class:`glad_bls.BlsEngines`, the same ones ``<prefix>_glad`` calls). Each
tick admits the images that arrived since the last one, makes **one** UNet call for every image in flight (each at
its own DDIM timestep: per-sample ``timesteps``), one ADS check for the undecided ones, and finishes the images that
ran their last step; a request's single response is sent (``TRITONSERVER_RESPONSE_COMPLETE_FINAL``) as soon as all
of its images are done. A request arriving while others are mid-loop therefore starts at the next tick instead of
waiting for a whole reconstruction (head-of-line blocking in ``<prefix>_glad``).

Contract: the same inputs, ``map_size`` parameter and outputs as ``<prefix>_glad``
(:mod:`glad_runtime.serving.protocol`), one response per request; results equal the per-batch model's per image
(same seeded noise, schedule, decision rule and scoring; a result does not depend on which images shared its
ticks). Decoupled models answer gRPC streams (``ModelStreamInfer``: :meth:`GladClient.stream`,
``tritonclient.grpc`` ``start_stream`` / ``async_stream_infer``); unary gRPC and HTTP ``infer`` are refused by
Triton for decoupled models.

Overlap (parameter ``overlap``; the repository writes true only with one ONNX Runtime thread per network model): a
tick's admission of new images and finishing of done ones run in
worker threads beside its UNet step and ADS check (``StepScheduler(overlap=True)``); the network models are
separate processes, so the stages share the cores instead of queuing behind each other. Results are unchanged.

Bounds (model ``parameters``): ``max_active`` images in flight (the UNet batch of a full tick; at most the network
models' ``max_batch_size`` / 2, since an ADS check decodes two estimates per image) and ``max_queue`` images
waiting for a slot. A request that would exceed ``max_active + max_queue`` pending images is refused at once with
``UNAVAILABLE`` "in-flight pool full" (back-pressure: retry later or on another replica; the client SDK does),
never queued without bound. A malformed request is refused alone with ``INVALID_ARG``; an unusable image gets its
error in the ``errors`` output at intake (it never joins the pool) and its request mates are scored (see
``glad_model.py``; ``max_batch_size: 0`` for the same reason: an empty stream request used to crash the server); a
failed tick (a network model error) fails the requests in flight then with ``INTERNAL`` naming the error, and the pool
starts empty.

Deadlines and cancellation (as in ``<prefix>_glad``): before every tick, a request whose client cancelled it or
whose Triton request timeout (counted from its arrival) passed is dropped from the pool (its images stop at once)
and answered ``CANCELLED`` / ``UNAVAILABLE`` "deadline exceeded"; the others go on. On unload the model stops
taking requests (``UNAVAILABLE`` "closing", so clients fail over), finishes the ones in flight within 30 s, then
the loop refuses what is left after its current tick and exits.

Metrics: the GLAD metrics of ``glad_bls.py``, including ``glad_requests_rejected_total`` and the gauge
``glad_inflight_images``.
"""

import itertools
import threading
import time
from collections import deque

import triton_python_backend_utils as pb_utils

from glad_bls import Served, Watch, error
from glad_runtime.core.detection import Detection
from glad_runtime.errors import InvalidInputError
from glad_runtime.pipeline.stream import StepScheduler

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
#: seconds ``finalize`` lets the requests in flight finish before refusing them
DRAIN_GRACE_S = 30.0


class _Request:
    """One request in the pool: its sender, images, per-image results and abandonment check."""

    def __init__(self, request, sender, items, map_size, arrived, legacy=False):
        self.request, self.sender = request, sender
        self.arrays = {k: arr for k, (arr, _, err) in enumerate(items) if err is None}  # the images to score
        self.images = [img for _, img, _ in items]
        self.map_size, self.legacy = map_size, legacy
        self.watch = Watch([request], arrived, tagged=True)
        # failed images are finished at intake, with their error
        self.results = {k: Detection(source=f"#{k}", error=err) for k, (_, _, err) in enumerate(items)
                        if err is not None}

    @property
    def n(self):
        return len(self.images)

    def abandoned(self):
        """``None`` (live), ``"cancelled"`` or ``"deadline"``."""
        state = self.watch.state(0)
        if state is None:
            try:
                if self.sender.is_cancelled():
                    state = "cancelled"
            except Exception:
                pass
        return state


class TritonPythonModel:
    def initialize(self, args):
        self.served = Served(args, inflight=True)
        self.detector, self.metrics = self.served.detector, self.served.metrics
        p = self.served.params
        self.max_active = int(p.get("max_active", 8))
        self.capacity = self.max_active + int(p.get("max_queue", 32))
        # the scheduler's own queue bound is the pool's: execute() refuses before it could be exceeded
        self.scheduler = StepScheduler(self.served.engines, self.served.config, max_active=self.max_active,
                                       max_queue=self.capacity, overlap=p.get("overlap", "true") == "true")
        self._cv = threading.Condition()
        self._intake = deque()  # requests checked by execute(), not yet in the scheduler
        self._pending = 0  # images in the intake or the scheduler
        self._closing = False
        self._abort = False  # set by finalize after the grace: the loop refuses what is left and exits
        self._requests = {}  # id -> _Request in the scheduler (the loop thread's)
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="glad-inflight", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ intake (Triton's thread)
    def _send(self, sender, response):
        try:
            sender.send(response, flags=FINAL)
        except Exception:  # the client is gone (stream closed): nothing left to tell it
            pass

    def _refuse(self, sender, reason, message):
        self.metrics.inc("glad_requests_rejected_total", reason=reason)
        self._send(sender, pb_utils.InferenceResponse(error=error(message, "UNAVAILABLE", True)))

    def _full(self, n):
        return (f"in-flight pool full: {self._pending} images queued or in flight, capacity {self.capacity} "
                f"(max_active {self.max_active}); this request has {n}; retry later or on another replica")

    def execute(self, requests):
        arrived = time.monotonic()
        for r in requests:
            sender = r.get_response_sender()
            with self._cv:
                refusal = "closing" if self._closing else "pool_full" if self._pending >= self.capacity else None
            if refusal:  # refused before decoding anything
                self._refuse(sender, refusal, "model closing (unloading); retry on another replica"
                             if refusal == "closing" else self._full(1))
                continue
            try:
                items, map_size = self.served.request_inputs(r)
            except InvalidInputError as e:  # malformed as a whole
                self._send(sender, pb_utils.InferenceResponse(error=error(str(e), "INVALID_ARG", True)))
                continue
            except Exception as e:  # a bug: this request alone
                self.metrics.inc("glad_errors_total", type=type(e).__name__)
                self._send(sender, pb_utils.InferenceResponse(error=error(f"{type(e).__name__}: {e}", "INTERNAL",
                                                                          True)))
                continue
            req = _Request(r, sender, items, map_size, arrived, self.served.legacy(r))
            if not req.arrays:  # every image failed at intake: answer now, nothing joins the pool
                self._send(sender, self.served.response([req.results[k] for k in range(req.n)], map_size, True,
                                                        req.legacy))
                continue
            with self._cv:
                if self._pending + req.n > self.capacity:
                    message = self._full(req.n)
                else:
                    message = None
                    self._intake.append(req)
                    self._pending += req.n
                    pending = self._pending
                    self._cv.notify()
            if message:
                self._refuse(sender, "pool_full", message)
            else:
                self.metrics.set("glad_inflight_images", pending)
        return None

    # ------------------------------------------------------------------ the loop (its own thread)
    def _loop(self):
        while True:
            with self._cv:
                while not self._intake and not self._requests and not self._closing:
                    self._cv.wait()
                if self._closing and not self._intake and not self._requests:
                    return
                new = list(self._intake)
                self._intake.clear()
                abort = self._abort
            if abort:  # finalize's grace is over: refuse what is left (from this thread: one FINAL each)
                self.scheduler.clear()
                for req in new:
                    self._refuse(req.sender, "closing", "model unloaded before this request finished; retry")
                self._fail_all("model unloaded before this request finished; retry", "UNAVAILABLE",
                               "glad_requests_rejected_total", reason="closing")
                return
            try:
                self._tick(new)
            except Exception as e:  # a network model failed (or a bug): the pool's state is unknown
                self.scheduler.clear()
                code = "UNAVAILABLE" if getattr(e, "status", None) == "UNAVAILABLE" else "INTERNAL"
                self._fail_all(f"{type(e).__name__}: {e}", code, "glad_errors_total", type=type(e).__name__)

    def _fail_all(self, message, code, metric, **labels):
        """Answer every request in the pool with the same error (counted in ``metric`` with ``labels``)."""
        for rid in list(self._requests):
            self.metrics.inc(metric, **labels)
            self._finish(rid, pb_utils.InferenceResponse(error=error(message, code, True)))

    def _tick(self, new):
        """Admit ``new`` requests, drop abandoned ones, run one scheduler tick, answer the finished requests."""
        for req in new:
            rid = next(self._ids)
            self._requests[rid] = req
            for k, image in req.arrays.items():
                self.scheduler.submit(image, key=(rid, k))
        self._drop_abandoned()
        if not self._requests:
            return
        for d in self.scheduler.tick():
            rid, k = d.source
            req = self._requests.get(rid)
            if req is None:
                continue
            d.source = f"#{k}"
            req.results[k] = self.detector.locate(self.detector.labelled(d), req.images[k])
            if len(req.results) == req.n:
                self._finish(rid, self.served.response([req.results[j] for j in range(req.n)], req.map_size, True,
                                                       req.legacy))

    def _drop_abandoned(self):
        for rid, req in list(self._requests.items()):
            state = req.abandoned()
            if state is None:
                continue
            self.scheduler.cancel([(rid, k) for k in req.arrays])
            self.metrics.inc("glad_requests_abandoned_total", reason=state)
            detail = f"stopped with {len(req.results)} of {req.n} images finished"
            self._finish(rid, req.watch.error(0, detail) if req.watch.state(0) else pb_utils.InferenceResponse(
                error=error(f"request cancelled by the client; {detail}", "CANCELLED", True)))

    def _finish(self, rid, response):
        req = self._requests.pop(rid)
        self._send(req.sender, response)
        with self._cv:
            self._pending -= req.n
            pending = self._pending
        self.metrics.set("glad_inflight_images", pending)

    def finalize(self):
        with self._cv:
            self._closing = True
            self._cv.notify()
        self._thread.join(DRAIN_GRACE_S)
        if self._thread.is_alive():  # still busy after the grace: the loop refuses the rest after its tick
            with self._cv:
                self._abort = True
                self._cv.notify()
            self._thread.join(DRAIN_GRACE_S)
