"""Client SDK for a GLAD Triton server (``glad serve``): send images, get scores, labels and anomaly maps back.

Needs numpy and ``tritonclient[grpc]`` only (Pillow, lazily, to encode arrays or PIL images; no scipy, no torch,
no onnxruntime: ``pip install glad-toolkit[client]``). The whole ADS/SAFF loop runs server-side in the
``<prefix>_glad`` BLS model (``triton_models``). Files and encoded bytes are sent as they are (``image_files``:
the server decodes them with the code ``glad detect`` runs, so nothing is decoded on the line PC); uint8/uint16
arrays and PIL images are sent as lossless PNG; preprocessed float32 ``[3, R, R]`` tensors in [-1, 1] as ``images``.
One request per batch of up to the model's ``max_images`` parameter (older servers: ``max_batch_size``) images of
one kind.

Reliability over one or several replicas (issues 16 and 27; the rules live in :mod:`glad_runtime.serving.routing`):

* **Deadline.** ``timeout`` seconds bound a whole call (``detect``, ``metadata``; for :meth:`GladClient.stream`,
  each image), retries and sleeps included. Every attempt carries the remaining budget twice: as the gRPC deadline
  (``client_timeout``) and as Triton's request timeout (``infer(..., timeout=<microseconds>)``), so the server drops
  work whose caller gave up (queued requests are rejected by the queue policy; the BLS loop stops between DDIM
  steps) instead of finishing it.
* **Retries until the deadline.** A replica-local or transient failure (``UNAVAILABLE``: connection refused or
  lost, a restarting or shutting-down server, ``[UNAVAILABLE] in-flight pool full`` back-pressure; ``CANCELLED`` by
  a draining server; the model unknown / not ready / "has no available versions" there; ``INTERNAL`` "not ready"
  from a BLS sub-request to an unloaded network model) is retried on another replica at once; once every replica
  failed, the next round starts after an exponential backoff with jitter (``backoff * 2**round`` capped at
  ``max_backoff``, drawn in its upper half), and rounds go on **until the deadline** runs out (``retries=None``,
  the default; an int caps the extra rounds instead, the rule before issue 27). No sleep reaches past the
  deadline: the last one is shortened to leave time for one more attempt, and the call gives up when less than
  that is left. A detection is pure, so resending is safe; each image is answered exactly once (one successful
  attempt per request, no hedging).
* **Never retried:** a final failure ends the call at once and is not resent to any replica: ``INVALID_ARGUMENT``
  / HTTP 400 (the request or an image is refused), a request Triton's own parser cannot read (``INTERNAL`` / HTTP
  500 "failed to parse the request JSON buffer", "Unable to parse 'data'", "unexpected shape for input", ...), a
  deadline, and any other server error.
* **Per-image errors** (servers whose ``<prefix>_glad`` declares the ``errors`` output, issue 27): an image the
  server could not score (unreadable, over the pixel limit: ``ImageTooLargeError``, a failed reconstruction) comes
  back in an answered request as that image's Detection with ``error`` (:class:`BadInputError` for
  ``INVALID_ARGUMENT``, :class:`ServerUnavailableError` for ``UNAVAILABLE``, ...; the message names the image's
  source and the server's error type); its batch mates are scored, nothing is raised and nothing is resent. The
  client asks only for the outputs the model's config declares, so it also works against servers without
  ``errors`` (then every returned image counts as scored, and an image refused there fails its whole request:
  that request is resent one image at a time to find it, as before).
* **Balancing and ejection.** Attempts go to the healthy replica with the fewest outstanding requests of this
  client (ties round robin). A replica that fails is ejected for ``cooldown`` seconds (circuit breaker: closed ->
  open -> half-open, where one probe request, or a :meth:`GladClient.health` check, decides: success closes it,
  failure ejects it again). The probe uses a fresh gRPC channel. One client is safe to share between threads;
  :class:`AsyncGladClient` runs the same state machine.
* **Typed errors**, raised only once every replica failed (or at once when retrying cannot help):
  :class:`BadInputError` (an image that cannot be read or that the server refuses, ``INVALID_ARGUMENT``: never
  retried; that image's Detection carries it and the other images complete), :class:`DeadlineExceededError`
  (the budget ran out during an attempt, client side, or the server's "deadline exceeded: request timeout
  expired"), :class:`ModelNotFoundError` (every replica lacks ``<prefix>_glad`` or one of its network models),
  :class:`ServerUnavailableError` (no replica answered, or they failed differently) and :class:`ServingError` for
  any other server error (not retried).

Layout: :mod:`.plan` (request planning and response parsing, pure functions), :mod:`.core` (what both clients share:
settings, connections, counters and every call written once as a step generator), :mod:`.sync` (:class:`GladClient`),
:mod:`.aio` (:class:`AsyncGladClient`), :mod:`.streaming` (:meth:`GladClient.stream`: gRPC streams to the in-flight
model); this module re-exports the public names.

Example::

    from glad_runtime.serving.client import GladClient
    with GladClient(["localhost:8001", "backup:8001"], "elpv_mono") as client:
        for d in client.detect(["cell1.png", "cell2.png"]):
            print(d.source, d.error or (d.score, d.label, d.adaptive_step))
"""

from __future__ import annotations

from glad_runtime.core.detection import Detection
from glad_runtime.errors import (BadInputError, DeadlineExceededError, ModelNotFoundError, ServerUnavailableError,
                                 ServingError)
from glad_runtime.serving.client.core import GRPC_CHANNEL_ARGS, classify_error
from glad_runtime.serving.client.plan import requested_outputs
from glad_runtime.serving.client.sync import GladClient
from glad_runtime.serving.client.aio import AsyncGladClient

__all__ = ["GladClient", "AsyncGladClient", "Detection", "ServingError", "BadInputError",
           "ServerUnavailableError", "DeadlineExceededError", "ModelNotFoundError", "classify_error",
           "GRPC_CHANNEL_ARGS", "requested_outputs"]
