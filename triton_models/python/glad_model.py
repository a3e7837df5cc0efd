"""Triton python-backend BLS model ``<prefix>_glad``: the whole GLAD loop server-side, one request per batch.

:class:`glad_runtime.pipeline.batch.GladPipeline` runs here with :class:`BlsEngines`, whose network calls are BLS requests
to ``<prefix>_unet``, ``<prefix>_vae_encoder``, ``<prefix>_vae_decoder``, ``<prefix>_dino`` (and ``_dino_ads``; with
ADS on, ``_ads_check`` when served: one request per check returning the distance map), so
those models keep their own instances and dynamic batching (several ``_glad`` instances, or several bundles, share
them). The version directory holds the bundle's ``config.json`` and, when calibrated, ``calibration.json``.

Inputs and outputs are the served contract of :mod:`glad_runtime.serving.protocol` (``images`` FP32 or
``image_files`` BYTES, the ``map_size`` request parameter, ``GLAD_OUTPUTS``). Files are decoded and preprocessed
here by the code ``glad detect`` runs (``core.images.load_image`` + ``Preprocessor.image``), and every result is made by
:class:`glad_runtime.detector.Detector` (``detect_arrays`` + ``locate``: labels, regions), so a served result equals
the in-process one. The requests of a dynamic batch run as one pipeline call (results do not depend on batch
mates, project decision 2). A malformed request (no image, both or neither inputs, too many images, a tensor of
the wrong shape) gets INVALID_ARG alone; an unusable image (unreadable, over the pixel limit, non-finite) gets its
error in the ``errors`` output while the other images of its request and of its dynamic batch are scored (a
one-image request fails whole with that error); if the joint call fails every image is rerun alone.

``max_batch_size: 0`` (issue 27): with a batching config, a dynamic batch whose requests all hold zero images (a
``[0, 1]`` ``image_files`` tensor) made the python backend skip ``execute`` and crash the server (SIGSEGV in
``libtriton_python.so``; ``CheckIncomingRequests`` returns early on a total batch size of 0). Without Triton
batching each request counts as one, reaches ``execute`` and is refused here. Requests still share the network
models' dynamic batching, and several instances of this model run requests side by side.

Abandoned requests (issue 16): a request whose client cancelled it (``request.is_cancelled()``, e.g. the gRPC
call's deadline passed) or whose Triton request timeout (``request.timeout()``, microseconds, counted from the
start of ``execute``: the queue policy already rejected it if it expired while queued) has passed is not worth
finishing. Before the reconstruction starts it is answered at once (``CANCELLED`` / ``UNAVAILABLE`` "deadline
exceeded"); during it, :attr:`GladPipeline.should_stop` is checked before every DDIM step and stops the loop as
soon as *every* request of the dynamic batch is abandoned (live batch mates keep the joint call going; their
results do not depend on it). Such requests get the same errors, never a partial result.

Metrics: the GLAD metrics of ``glad_bls.py`` (its module docstring lists them).
"""

import time

import numpy as np

from glad_bls import Served, Watch, error, steps_left
from glad_runtime.core.detection import Detection
from glad_runtime.errors import InvalidInputError, RequestCancelledError
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        self.served = Served(args)
        self.detector, self.metrics = self.served.detector, self.served.metrics

    def execute(self, requests):
        watch = Watch(requests, time.monotonic())
        responses = [None] * len(requests)
        items, spans = [], {}  # items: (array, image, error) of every image of the live requests
        for i, r in enumerate(requests):
            gone = watch.state(i)
            if gone:  # abandoned before any work: answer at once
                self.metrics.inc("glad_requests_abandoned_total", reason=gone)
                responses[i] = watch.error(i, "nothing was computed")
                continue
            try:
                request_items, map_size = self.served.request_inputs(r)
            except InvalidInputError as e:  # malformed as a whole: this request alone
                responses[i] = pb_utils.InferenceResponse(error=error(str(e), "INVALID_ARG"))
                continue
            except Exception as e:  # a bug: this request alone, never its batch mates
                self.metrics.inc("glad_errors_total", type=type(e).__name__)
                responses[i] = pb_utils.InferenceResponse(error=error(f"{type(e).__name__}: {e}", "INTERNAL"))
                continue
            spans[i] = (len(items), len(request_items), map_size)
            items += request_items
        good = [k for k, (arr, _, err) in enumerate(items) if err is None]
        dets = [Detection(source=f"#{k}", error=err) for k, (_, _, err) in enumerate(items)]
        if good:
            pipeline = self.detector.pipeline
            pipeline.should_stop = lambda: watch.all_abandoned(list(spans))
            try:
                scored = self.detector.detect_arrays(np.stack([items[k][0] for k in good]), [f"#{k}" for k in good])
            finally:
                pipeline.should_stop = None
            for k, d in zip(good, scored):
                dets[k] = d
            stopped = [d.error for d in scored if isinstance(d.error, RequestCancelledError)]
            if stopped:
                steps = len(pipeline.schedule.timesteps)
                self.metrics.inc("glad_ddim_steps_saved_total", steps_left(str(stopped[0]), steps))
        for i, (start, n, map_size) in spans.items():
            part = dets[start:start + n]
            cancelled = [d.error for d in part if isinstance(d.error, RequestCancelledError)]
            if cancelled:
                self.metrics.inc("glad_requests_abandoned_total", reason=watch.state(i) or "deadline")
                responses[i] = watch.error(i, str(cancelled[0]))
                continue
            part = [self.detector.locate(d, img) for d, (_, img, _) in zip(part, items[start:start + n])]
            for k, d in enumerate(part):
                d.source = f"#{k}"
            responses[i] = self.served.response(part, map_size, legacy=self.served.legacy(requests[i]))
        return responses
