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

Example::

    from glad_runtime.serving.client import GladClient
    with GladClient(["localhost:8001", "backup:8001"], "elpv_mono") as client:
        for d in client.detect(["cell1.png", "cell2.png"]):
            print(d.source, d.error or (d.score, d.label, d.adaptive_step))
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

from glad_runtime.core.detection import Detection
from glad_runtime.serving import protocol, routing
from glad_runtime.errors import ServingError, BadInputError, ServerUnavailableError, DeadlineExceededError, ModelNotFoundError  # noqa: F401 (re-exported)

__all__ = ["GladClient", "AsyncGladClient", "Detection", "ServingError", "BadInputError",
           "ServerUnavailableError", "DeadlineExceededError", "ModelNotFoundError", "classify_error",
           "GRPC_CHANNEL_ARGS"]

#: gRPC channel options: message limits raised to 2 GiB - 1 both ways (batches of 512 px images and maps exceed
#: gRPC's 4 MiB default), keepalive so a dead server is noticed.
GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                     ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
                     # a restarted server is reconnected to within a second, not after gRPC's 1-120 s backoff
                     ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]



# ---------------------------------------------------------------------------------------------- errors


def classify_error(exc: Exception, url: str | None = None) -> ServingError:
    """Map a ``tritonclient`` exception (or a gRPC error) to the typed errors of this module.

    Args:
        exc: ``tritonclient.utils.InferenceServerException`` or any exception raised by a client call.
        url: the server URL, kept on the returned error.
    Returns:
        a :class:`ServingError` subclass instance (never raises) whose ``retryable`` attribute says whether another
        replica may answer (:func:`glad_runtime.serving.routing.classify` has the rules).
    """
    return routing.classify_error(exc, url)


# ---------------------------------------------------------------------------------------------- inputs
FILES, TENSOR = "files", "tensor"
#: seconds past an image's deadline that :meth:`GladClient.stream` waits for the server's own "deadline exceeded"
_ANSWER_GRACE_S = 1.0


def _png(image: Any) -> bytes:
    """A uint8/uint16 array or a PIL image as lossless PNG bytes (TIFF for modes PNG cannot hold)."""
    import io

    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    buf = io.BytesIO()
    img.save(buf, format="PNG" if img.mode in ("1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA") else "TIFF")
    return buf.getvalue()


def _refused(err: BadInputError, source: str) -> BadInputError:
    """A server refusal of one image, named by the caller's source (a path, or ``#<index>``)."""
    out = BadInputError(f"{source}: {err}", err.status, err.url)
    out.__cause__ = err
    return out


def _refused_all(chunk: list, err: BadInputError) -> list[Detection]:
    """A request refused whole: the same refusal on the Detection of each of its images (``(index, source, kind,
    payload)``), named by that image's source; nothing is resent."""
    return [Detection(source=g[1], error=_refused(err, g[1])) for g in chunk]


def _source(image: Any, index: int) -> str:
    """How a Detection names an input: its path, else ``#<index>``."""
    return str(image) if isinstance(image, (str, os.PathLike)) else f"#{index}"


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


def _image_error(status: str | None, text: str, url: str | None) -> ServingError:
    """The typed error of one image the server failed (its ``errors`` element, already ``"<source>: <ErrorType>:
    <message>"``): :func:`routing.error_for` by status (``INVALID_ARGUMENT``: :class:`BadInputError`), ``url``
    kept. It is given to the caller on that image's Detection and never resent; ``retryable`` says whether
    sending the image again may help (``UNAVAILABLE``)."""
    err = routing.error_for(status, text)
    err.url = url
    return err


def _prepare(image: Any, index: int, resolution: int) -> tuple[str, str, Any]:
    """One input -> ``(source, kind, payload)``: ``FILES`` with the encoded bytes, or ``TENSOR`` with float32
    ``[3, R, R]``. Raises BadInputError (unreadable path, unsupported type, shape or dtype, NaN)."""
    source = _source(image, index)
    if isinstance(image, (str, os.PathLike)):
        try:
            with open(image, "rb") as f:
                return source, FILES, f.read()
        except OSError as e:
            raise BadInputError(f"{source}: cannot open ({e.strerror or e})") from e
    if isinstance(image, (bytes, bytearray, memoryview)):
        return source, FILES, bytes(image)
    if isinstance(image, np.ndarray):
        if image.dtype.kind == "f":
            if image.shape != (3, resolution, resolution):
                raise BadInputError(f"{source}: preprocessed image {list(image.shape)}, expected float32 "
                                    f"[3, {resolution}, {resolution}] in [-1, 1]")
            if not np.isfinite(image).all():
                raise BadInputError(f"{source}: NaN or Inf values")
            return source, TENSOR, np.ascontiguousarray(image, dtype=np.float32)
        ok = (image.ndim == 2 and image.dtype in (np.uint8, np.uint16)) or \
            (image.ndim == 3 and image.shape[2] in (3, 4) and image.dtype == np.uint8)
        if not ok:
            raise BadInputError(f"{source}: arrays must be uint8/uint16 [H,W], uint8 [H,W,3|4], or float32 "
                                f"[3,{resolution},{resolution}] in [-1,1]; got {image.dtype} {list(image.shape)}")
        return source, FILES, _png(image)
    if type(image).__module__.startswith("PIL."):
        try:
            return source, FILES, _png(image)
        except (OSError, ValueError) as e:
            raise BadInputError(f"{source}: cannot encode the image ({e})") from e
    raise BadInputError(f"{source}: unsupported input type {type(image).__name__}")



@dataclass
class _StreamItem:
    """One image of :meth:`GladClient.stream`: its index in the input, ``source``, what is sent (``kind``,
    ``payload``, as :func:`_prepare` returns them) and its retry state machine."""

    index: int
    source: str
    kind: str
    payload: Any
    attempts: routing.Attempts


class _Streams:
    """One bidirectional gRPC stream (``ModelStreamInfer``) per replica for :meth:`GladClient.stream`; every
    response lands in one queue as ``("response", url, token, ModelStreamInferResponse)``, and a stream that
    ends as ``("broken", url, token, error)``. ``token`` tells a stream from the one that replaced it."""

    def __init__(self, events):
        self.events = events
        self._open: dict[str, tuple] = {}  # url -> (token, channel, request queue, call)
        self._tokens = 0

    def send(self, url: str, request) -> int:
        """Send ``request`` on the stream to ``url`` (opened on first use); returns the stream's token."""
        if url not in self._open:
            self._start(url)
        token, _, requests, _ = self._open[url]
        requests.put(request)
        return token

    def _start(self, url: str) -> None:
        import queue

        import grpc
        from tritonclient.grpc import service_pb2_grpc

        self._tokens += 1
        token = self._tokens
        channel = grpc.insecure_channel(url, options=GRPC_CHANNEL_ARGS)
        requests: queue.Queue = queue.Queue()
        call = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(iter(requests.get, None))

        def read():
            try:
                for response in call:
                    self.events.put(("response", url, token, response))
                error: Exception = ServerUnavailableError(f"{url}: the stream ended", None, url)
            except grpc.RpcError as e:
                error = e
            self.events.put(("broken", url, token, error))

        threading.Thread(target=read, name=f"glad-stream-{url}", daemon=True).start()
        self._open[url] = (token, channel, requests, call)

    def forget(self, url: str, token: int) -> None:
        """Close the stream to ``url`` if it is still the one with ``token`` (the next send opens a new one)."""
        if url in self._open and self._open[url][0] == token:
            self._close(self._open.pop(url))

    @staticmethod
    def _close(entry) -> None:
        _, channel, requests, call = entry
        requests.put(None)
        call.cancel()
        channel.close()

    def close(self) -> None:
        for url in list(self._open):
            self._close(self._open.pop(url))


class _Base:
    """Shared settings, routing, request building and response parsing of the sync and asyncio clients."""

    def __init__(self, urls: str | Sequence[str], model_prefix: str, *, timeout: float = 60.0,
                 retries: int | None = None, backoff: float = 0.2, max_backoff: float = 5.0,
                 threshold: float | None = None, cooldown: float = 1.0, failure_threshold: int = 1):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one server URL is needed")
        if len(set(self.urls)) != len(self.urls):
            raise ValueError(f"server URLs must be distinct: {self.urls}")
        self.model_prefix = model_prefix
        self.model_name = protocol.model_name(model_prefix)
        self.timeout = float(timeout)
        self.retries = None if retries is None else max(0, int(retries))  # None: retry rounds until the deadline
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.threshold = threshold
        self.pool = routing.Pool(self.urls, cooldown=cooldown, failure_threshold=failure_threshold)
        self._meta: dict | None = None
        self._clients: dict[str, Any] = {}
        self._retired: list = []  # asyncio: channels replaced by a fresh one, closed later (_retire)
        self._closing: set = set()
        self._lock = threading.Lock()
        self._counts: Counter = Counter()
        self._attempt_errors: Counter = Counter()
        self._raised: Counter = Counter()

    _grpc_module = "tritonclient.grpc"  # the asyncio client uses tritonclient.grpc.aio

    def _client(self, url: str, fresh: bool = False):
        """The (cached) tritonclient connection to ``url``; ``fresh``: a new channel (a breaker's probe: the old
        channel may sit in gRPC's reconnect backoff after the server came back)."""
        import importlib

        with self._lock:
            if fresh or url not in self._clients:
                module = importlib.import_module(self._grpc_module)
                self._retire(self._clients.get(url))
                self._clients[url] = module.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)
            return self._clients[url]

    def _forget(self, url: str) -> None:
        """Stop using the channel to ``url`` (a new one is made on next use); calls still running on it finish."""
        with self._lock:
            self._retire(self._clients.pop(url, None))

    def _retire(self, client) -> None:
        """A replaced channel (under the lock). Sync: dropped, tritonclient closes it when the last call holding
        it returns (``__del__``). Asyncio: kept and closed later (aio channels close only by ``await``): the
        oldest beyond four at the next replacement, the rest by :meth:`AsyncGladClient.close`."""

    def _attempts(self, what: str, timeout: float | None = None, balance: bool = True) -> routing.Attempts:
        return routing.Attempts(self.pool, self.timeout if timeout is None else timeout, retries=self.retries,
                                backoff=self.backoff, max_backoff=self.max_backoff, what=what, balance=balance)

    def _count(self, att: routing.Attempts, raised: BaseException | None = None) -> None:
        """One finished call (its attempts, retries, failed attempts and the error it raised, if any)."""
        with self._lock:
            self._counts["calls"] += 1
            self._counts["attempts"] += att.attempts
            self._counts["retries"] += att.retried
            for _, e in att.errors:
                self._attempt_errors[type(e).__name__] += 1
            if raised is not None:
                self._raised[type(raised).__name__] += 1

    def _count_images(self, dets: Sequence[Detection]) -> None:
        """The per-image errors of one answered attempt (the ``errors`` output), each once: as a refused attempt
        and as an error given to the caller, as a whole request refused for that image would count."""
        with self._lock:
            for d in dets:
                if d.error is not None:
                    self._attempt_errors[type(d.error).__name__] += 1
                    self._raised[type(d.error).__name__] += 1

    def stats(self) -> dict:
        """Counters since the client was made: ``calls`` (RPC calls through the retry loop: one per request of
        ``detect`` plus ``metadata``, one per image of ``stream``), ``attempts``, ``retries`` (attempts beyond each
        call's first), ``attempt_errors`` (failed attempts, and images an answered request refused, by error
        class), ``raised`` (errors given to the caller, raised or on a Detection, by class; an image's error counts
        once, however many images shared its request) and ``replicas`` (per URL: breaker ``state``,
        ``outstanding``, ``requests``, ``successes``, ``failures``, ``ejections``, ``probes``)."""
        with self._lock:
            out = {k: int(self._counts[k]) for k in ("calls", "attempts", "retries")}
            out["attempt_errors"] = dict(self._attempt_errors)
            out["raised"] = dict(self._raised)
        out["replicas"] = self.pool.snapshot()
        return out

    def _parse_config(self, cfg: dict) -> dict:
        """The entry model's config (``get_model_config(as_json=True)["config"]``) -> :meth:`GladClient.metadata`.

        ``outputs`` are the contract outputs the model declares, in contract order: what every request asks for
        (:func:`requested_outputs`); ``errors`` is True when ``errors`` is among them (per-image errors)."""
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        names = {i["name"] for i in cfg["input"]}
        if protocol.GLAD_FILE_INPUT not in names:
            raise ServingError(f"{self.model_name} has no {protocol.GLAD_FILE_INPUT!r} input: the repository was "
                               "generated by an older glad-toolkit; regenerate it with `glad serve`")
        outputs, missing = requested_outputs(cfg)
        if missing:
            raise ServingError(f"{self.model_name} does not declare the outputs {missing}: the repository was "
                               "generated by another glad-toolkit; regenerate it with `glad serve`")
        dims = [int(d) for i in cfg["input"] if i["name"] == protocol.GLAD_INPUT for d in i["dims"]]
        max_images = int(params.get("max_images") or cfg.get("max_batch_size", 1) or 1)  # entry models: mbs 0
        return {"resolution": dims[-1], "max_batch": max_images, "parameters": params,
                "dino_resolution": int(params.get("dino_resolution") or dims[-1]),
                "calibration": protocol.calibration_from_parameter(params.get("calibration")),
                "outputs": outputs, "errors": protocol.ERRORS_OUTPUT in outputs}

    def _network_models(self, cfg: dict) -> list[tuple[str, str]]:
        """``(model name, version)`` of each network model the entry model calls, from its config's
        ``served_graphs`` (``<prefix>_<graph>``) at its ``model_version`` (an entry model of version N calls the
        networks of version N; "" where the config does not say). Empty for configs without ``served_graphs``."""
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        prefix = params.get("model_prefix") or self.model_prefix
        version = str(params.get("model_version") or "")
        graphs = [g.strip() for g in (params.get("served_graphs") or "").split(",") if g.strip()]
        return [(protocol.model_name(prefix, g), version) for g in graphs]

    def _health_verdict(self, down: list[tuple[str, str]], index: dict) -> tuple[bool, str]:
        """``(healthy, why not)`` of a replica whose entry model is READY: ``down`` are the network models it calls
        that are not ready (``(name, version)``), ``index`` its repository index (:meth:`_required_ready`)."""
        names = [f"{n} (version {v})" if v else n for n, v in down]
        _, others = self._required_ready(index)
        names += [n for n in others if n not in {m for m, _ in down}]
        return not names, "" if not names else f"not ready: {', '.join(names)}"

    @staticmethod
    def _ready_or_false(check) -> bool:
        """``check()`` (a readiness call), False where it raises (an unknown model may be an error, not False)."""
        try:
            return bool(check())
        except Exception:
            return False

    def _required_ready(self, index: dict) -> tuple[bool, list[str]]:
        """``(ready, not ready names)`` from a repository index (``get_model_repository_index(as_json=True)``):
        every model named ``<prefix>_*`` (but not those of a longer prefix with its own ``_glad`` model, e.g.
        ``<prefix>_b_*`` when ``<prefix>_b_glad`` exists) and ``<prefix>_glad`` must have a READY version."""
        models = index.get("models", []) if isinstance(index, dict) else []
        head = self.model_prefix + "_"
        names = {m.get("name", "") for m in models}
        others = [n[:-len("_glad")] + "_" for n in names
                  if n.endswith("_glad") and n != self.model_name and n.startswith(head)]
        need = {n for n in names if n.startswith(head) and not any(n.startswith(o) for o in others)}
        need.add(self.model_name)
        ready = {m.get("name") for m in models if m.get("state") == "READY"}
        missing = sorted(need - ready)
        return not missing, missing

    def _inputs(self, module, kind: str, payloads: list):
        if kind == FILES:
            inp = module.InferInput(protocol.GLAD_FILE_INPUT, [len(payloads), 1], "BYTES")
            inp.set_data_from_numpy(np.array(payloads, dtype=np.object_).reshape(-1, 1))
        else:
            batch = np.stack(payloads)
            inp = module.InferInput(protocol.GLAD_INPUT, list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
        return [inp], [module.InferRequestedOutput(n) for n in self._meta["outputs"]]

    #: maps come back at the working size (D x D, small); ``Detection.map_at_original_size`` resizes them with
    #: the same Pillow code as ``glad detect``; regions are in original-image pixels either way.
    _request_parameters = {protocol.MAP_SIZE_PARAMETER: "working"}

    def _infer_kwargs(self, outputs, remaining: float) -> dict:
        """The deadline twice: gRPC ``client_timeout`` (seconds) and Triton's request ``timeout`` (microseconds,
        at least 1: 0 would mean none)."""
        return dict(outputs=outputs, client_timeout=max(remaining, 1e-3), timeout=max(1, int(remaining * 1e6)),
                    parameters=self._request_parameters)

    def _results(self, result, sources: list[str], url: str) -> list[Detection]:
        """One answered request -> one Detection per image; an image the server failed (``errors``) gets its typed
        error (:func:`_image_error`), counted once (:meth:`_count_images`) and never resent."""
        arrays = {n: result.as_numpy(n) for n in self._meta["outputs"]}
        dets = protocol.detections_from_arrays(arrays, sources, self._meta["calibration"], self.threshold, url,
                                               map_size="working",
                                               error_for=lambda status, text: _image_error(status, text, url))
        if protocol.ERRORS_OUTPUT not in arrays or arrays[protocol.ERRORS_OUTPUT] is None:
            # no error texts (the model declared none, or another replica's model answered): a failed image is
            # still known by its sentinel score (-1; a real score is >= 0)
            dets = [d if not d.ok or d.score is None or d.score >= 0 else
                    Detection(source=d.source, server=url, error=_image_error(
                        "INTERNAL", f"{d.source}: the server could not score this image (failure sentinel; no "
                                    f"error text: {protocol.ERRORS_OUTPUT!r} was not requested or not returned)",
                        url)) for d in dets]
        self._count_images(dets)
        return dets

    def _prepare_all(self, images: Iterable[Any]) -> tuple[list[Detection | None], list]:
        """``(slots, good)``: a failed Detection or None per input, and ``(index, source, kind, payload)`` of the
        ones to send."""
        res = self._meta["resolution"]
        slots: list[Detection | None] = []
        good = []
        for i, image in enumerate(images):
            try:
                source, kind, payload = _prepare(image, i, res)
            except BadInputError as e:
                slots.append(Detection(source=_source(image, i), error=e))
                continue
            slots.append(None)
            good.append((i, source, kind, payload))
        return slots, good

    def _isolate(self, chunk: list) -> bool:
        """Whether a request refused whole (``INVALID_ARGUMENT``) is resent one image at a time to find the refused
        image: only against a model without the ``errors`` output (before issue 27 a bad image failed its whole
        request). Where ``errors`` is served a bad image fails alone inside an answered request, so a refusal of the
        whole request is about the request itself: every image gets it and nothing is resent (resending refused
        images made the server count each twice in ``glad_errors_total``)."""
        return len(chunk) > 1 and not self._meta["errors"]

    def _chunks(self, good: list) -> list[list]:
        """Requests: runs of one input kind, at most ``max_images`` images each, in input order."""
        n = self._meta["max_batch"]
        chunks: list[list] = []
        for g in good:
            if chunks and chunks[-1][0][2] == g[2] and len(chunks[-1]) < n:
                chunks[-1].append(g)
            else:
                chunks.append([g])
        return chunks


class GladClient(_Base):
    """Synchronous client of a served GLAD bundle (gRPC) over one or several replicas; safe to share between
    threads.

    Args:
        urls: one ``host:port`` gRPC URL or several replicas (balanced by least outstanding requests, ties round
            robin in this order; a failing one is ejected and failed over).
        model_prefix: the bundle's model prefix on the server (``glad serve`` prints it; models are
            ``<prefix>_glad``, ``<prefix>_unet``, ...).
        timeout: deadline in seconds of each call (``detect``, ``metadata``; each image of ``stream``), retries and
            sleeps included; each attempt sends the remaining budget as gRPC ``client_timeout`` and as Triton's
            request timeout.
        retries: None (default): retryable failures are retried until the deadline, in rounds over the replicas
            with a backoff of ``backoff * 2**round`` seconds between rounds (jittered, capped at ``max_backoff``,
            never past the deadline). An int caps the extra rounds once every replica failed (the rule before
            issue 27: the call may then give up before its deadline).
        backoff, max_backoff: base and cap of that backoff, in seconds.
        threshold: raw-score threshold overriding the server's calibration for this client's labels.
        cooldown: seconds a failed replica is ejected before one probe request may go to it.
        failure_threshold: consecutive replica-local failures that eject a replica (default: the first).

    Failover, breaker and error policy: see the module docstring (:mod:`glad_runtime.serving.routing`).
    """

    def _call(self, fn, what: str, timeout: float | None = None, balance: bool = True):
        """Run ``fn(client, url, remaining_seconds)`` on the replicas the routing picks until one answers
        (``balance=False``: a control call, which does not move the round robin)."""
        att = self._attempts(what, timeout, balance)
        while True:
            step = att.next()
            if step.kind == "sleep":
                time.sleep(step.seconds)
                continue
            if step.kind == "raise":
                self._count(att, step.error)
                raise step.error
            url = step.lease.url
            try:
                out = fn(self._client(url, fresh=step.lease.probe), url, step.remaining)
            except Exception as e:  # tritonclient raises InferenceServerException; grpc may raise its own
                att.failed(step.lease, classify_error(e, url))
                continue
            att.succeeded(step.lease)
            self._count(att)
            return out

    def metadata(self) -> dict:
        """``{"resolution", "max_batch", "parameters", "dino_resolution", "calibration", "outputs", "errors"}`` of
        the ``<prefix>_glad`` model (bundle checksum, version, calibrated, threshold; the outputs it declares, which
        every request asks for, and whether ``errors`` is among them), from the first replica that answers. Raises
        ModelNotFoundError (no replica serves it) / ServerUnavailableError / DeadlineExceededError, or
        ServingError for a model without the contract's inputs or outputs.
        """
        if self._meta is None:
            cfg = self._call(lambda c, u, t: c.get_model_config(self.model_name, as_json=True, client_timeout=t),
                             f"{self.model_name} config", balance=False)
            self._meta = self._parse_config(cfg["config"])
        return self._meta

    def _health_one(self, url: str) -> tuple[bool, str]:
        t = self.timeout
        try:
            c = self._client(url)
            if not c.is_server_live(client_timeout=t):
                return False, "server not live"
            if not c.is_model_ready(self.model_name, client_timeout=t):
                return False, f"not ready: {self.model_name}"
            cfg = c.get_model_config(self.model_name, as_json=True, client_timeout=t)["config"]
            down = [(n, v) for n, v in self._network_models(cfg)
                    if not self._ready_or_false(lambda: c.is_model_ready(n, v, client_timeout=t))]
            return self._health_verdict(down, c.get_model_repository_index(as_json=True, client_timeout=t))
        except Exception as e:
            self._forget(url)
            return False, str(classify_error(e, url))

    def health(self) -> dict[str, bool]:
        """Per URL: True when the server is live and the bundle can answer there (never raises): ``<prefix>_glad``
        is READY, so is each network model it calls (its config's ``served_graphs``, at the entry model's own
        version, through Triton's model readiness API: an entry model READY beside an unloaded or failed
        ``<prefix>_unet`` is not healthy), and every other ``<prefix>_*`` model of the repository index has a
        READY version. The result also feeds the replica's circuit breaker (ready closes it, not ready ejects
        it)."""
        out = {}
        for url in self.urls:
            ok, why = self._health_one(url)
            self.pool.record_health(url, ok, None if ok else ServerUnavailableError(f"{url}: {why}", None, url))
            out[url] = ok
        return out

    def ready(self) -> bool:
        """True when at least one replica is healthy (:meth:`health`)."""
        return any(self.health().values())

    def model_ready(self, graph: str = "glad") -> bool:
        """True when some URL has ``<prefix>_<graph>`` ready (``glad``, ``unet``, ``vae_encoder``, ...)."""
        name = protocol.model_name(self.model_prefix, graph)
        for url in self.urls:
            try:
                if self._client(url).is_model_ready(name, client_timeout=self.timeout):
                    return True
            except Exception:
                self._forget(url)
        return False

    def _infer(self, chunk: list, deadline: float) -> list[Detection]:
        import tritonclient.grpc as grpcclient

        def call(c, url, remaining):
            inputs, outputs = self._inputs(grpcclient, chunk[0][2], [g[3] for g in chunk])
            r = c.infer(self.model_name, inputs, **self._infer_kwargs(outputs, remaining))
            return self._results(r, [g[1] for g in chunk], url)
        return self._call(call, f"{self.model_name} infer", deadline - self.pool.clock())

    def detect(self, images: Iterable[Any], timeout: float | None = None) -> list[Detection]:
        """Score images on the server, one request per batch of up to the model's ``max_images``.

        Args:
            images: file paths or encoded bytes (sent as they are), PIL images, uint8/uint16 arrays ``[H,W]`` /
                uint8 ``[H,W,3|4]`` (sent as lossless PNG), or preprocessed float32 ``[3,R,R]`` in [-1, 1].
            timeout: this call's deadline in seconds (default: the client's ``timeout``), for all its requests,
                retries and failovers.
        Returns:
            one :class:`Detection` per input, in order. An input that cannot be read or that the server refuses
            or fails (the ``errors`` output) gets ``error`` (:class:`BadInputError` for ``INVALID_ARGUMENT``, the
            :mod:`routing` class of its status otherwise) and the others complete; such an image is not resent.
            A request the server refuses whole (``INVALID_ARGUMENT``: malformed as a whole) gives each of its
            images that error; against a server without ``errors`` it is resent one image at a time to find the
            refused one.
        Raises:
            ServerUnavailableError: no replica answered before the deadline (or within ``retries`` rounds; no
                partial results are returned: rerun).
            ModelNotFoundError: no replica serves the bundle (or every one lacks one of its models).
            DeadlineExceededError: the deadline passed during a request.
            ServingError: another server error (not retried).
        """
        deadline = self.pool.clock() + (self.timeout if timeout is None else float(timeout))
        if self._meta is None:
            self._meta = self._parse_config(self._call(
                lambda c, u, t: c.get_model_config(self.model_name, as_json=True, client_timeout=t),
                f"{self.model_name} config", deadline - self.pool.clock(), balance=False)["config"])
        slots, good = self._prepare_all(images)
        for chunk in self._chunks(good):
            try:
                dets = self._infer(chunk, deadline)
            except BadInputError as e:
                if not self._isolate(chunk):
                    dets = _refused_all(chunk, e)
                else:  # a server without per-image errors: one by one, so only the refused image fails
                    dets = []
                    for g in chunk:
                        try:
                            dets += self._infer([g], deadline)
                        except BadInputError as e1:
                            dets.append(Detection(source=g[1], error=_refused(e1, g[1])))
            for g, d in zip(chunk, dets):
                slots[g[0]] = d
        return slots  # type: ignore[return-value]

    def stream(self, images: Iterable[Any], *, window: int = 16, timeout: float | None = None
               ) -> Iterator[Detection]:
        """Score a stream of images on ``<prefix>_glad_inflight`` (in-flight batching, issue 17), yielding each
        image's Detection as soon as the server has finished it.

        One request per image over one gRPC stream per replica (``ModelStreamInfer``); on the server each image
        joins the running denoising loop at its next DDIM step instead of waiting for a whole batch.

        Args:
            images: any iterable of what :meth:`detect` takes (an endless camera feed too); pulled only while
                fewer than ``window`` images are outstanding, so memory stays bounded on both sides.
            window: the most images sent (or waiting to be resent) and not yet answered.
            timeout: seconds per image from when it is pulled, retries and failovers included (default: the
                client's ``timeout``); sent with every attempt as Triton's request timeout.
        Yields:
            one :class:`Detection` per input, in completion order (``source`` names it: the path, or
            ``#<index>`` in the input). An image that cannot be read or that the server refuses or fails has
            ``error`` (:class:`BadInputError` for ``INVALID_ARGUMENT``; from the ``errors`` output where the model
            serves it, never resent); one that no replica answered before its deadline has
            :class:`ServerUnavailableError` / :class:`DeadlineExceededError` / :class:`ModelNotFoundError`; the
            stream goes on either way.

        Failover as in :meth:`detect`, per image: a broken stream (replica killed or restarted), a missing model,
        a full in-flight pool (``[UNAVAILABLE] in-flight pool full``: back-pressure) or a draining replica ejects
        that replica for ``cooldown`` and the image is resent elsewhere, or after a backoff, until its deadline
        (``retries=None``). Each attempt has its own request id (``<index>.<attempt>``), so a late answer to an
        abandoned attempt is dropped: every image is yielded exactly once.
        """
        import heapq
        import itertools
        import queue

        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        budget = self.timeout if timeout is None else float(timeout)
        res = self.metadata()["resolution"]
        name = protocol.model_name(self.model_prefix, protocol.INFLIGHT_MODEL)
        events: queue.Queue = queue.Queue()
        streams = _Streams(events)
        sent: dict[str, tuple] = {}  # attempt id -> (item, lease, stream token)
        due: list = []  # heap of (time, seq, item): items to (re)send
        seq = itertools.count()
        source = iter(enumerate(images))
        exhausted = False
        outstanding = 0
        try:
            while True:
                while not exhausted and outstanding < window:
                    try:
                        i, image = next(source)
                    except StopIteration:
                        exhausted = True
                        break
                    try:
                        item = _StreamItem(i, *_prepare(image, i, res), self._attempts(f"{name} stream #{i}", budget))
                    except BadInputError as e:
                        yield Detection(source=_source(image, i), error=e)
                        continue
                    outstanding += 1
                    heapq.heappush(due, (0.0, next(seq), item))
                if not outstanding:
                    return
                now = self.pool.clock()
                while due and due[0][0] <= now:  # (re)send what is due
                    item = heapq.heappop(due)[2]
                    att = item.attempts
                    step = att.next()
                    if step.kind == "sleep":
                        heapq.heappush(due, (now + step.seconds, next(seq), item))
                    elif step.kind == "raise":
                        self._count(att, step.error)
                        outstanding -= 1
                        yield Detection(source=item.source, error=step.error)
                    else:
                        rid = f"{item.index}.{att.attempts}"
                        token = streams.send(step.lease.url, self._stream_request(name, rid, item, step.remaining))
                        sent[rid] = (item, step.lease, token)
                hung = [r for r, (it, _, _) in sent.items() if it.attempts.remaining() < -_ANSWER_GRACE_S] \
                    if events.empty() else []  # answers waiting (a slow consumer) are read first
                for rid in hung:
                    item, lease, _ = sent.pop(rid)  # no answer well past the deadline: a hung replica
                    err = DeadlineExceededError(f"{lease.url}: no answer for {name} #{item.index} within "
                                                f"{budget:g} s", None, lease.url)
                    item.attempts.failed(lease, err)
                    self._count(item.attempts, err)
                    outstanding -= 1
                    yield Detection(source=item.source, error=err)
                wait = max(0.0, due[0][0] - self.pool.clock()) if due else 0.5
                try:
                    kind, url, token, payload = events.get(timeout=max(wait, 1e-3))
                except queue.Empty:
                    continue
                if kind == "broken":  # the stream to url ended: every attempt on it failed
                    streams.forget(url, token)
                    failed = [rid for rid, (_, lease, tok) in sent.items() if tok == token]
                    for rid in failed:
                        item, lease, _ = sent.pop(rid)
                        item.attempts.failed(lease, classify_error(payload, url))
                        heapq.heappush(due, (0.0, next(seq), item))
                    continue
                rid = payload.infer_response.id
                if rid not in sent:
                    continue  # an answer to an attempt given up on (the image was resent): dropped
                item, lease, _ = sent.pop(rid)
                att = item.attempts
                if payload.error_message:
                    err = routing.error_for(*protocol.stream_error_status(payload.error_message), url)
                    if isinstance(err, BadInputError):
                        att.failed(lease, err)
                        self._count(att, err)
                        outstanding -= 1
                        yield Detection(source=item.source, error=_refused(err, item.source))
                        continue
                    att.failed(lease, err)
                    heapq.heappush(due, (0.0, next(seq), item))
                    continue
                from tritonclient.grpc import InferResult

                att.succeeded(lease)
                self._count(att)
                outstanding -= 1
                yield self._results(InferResult(payload.infer_response), [item.source], url)[0]
        finally:  # also when the caller stops early: no lease stays counted as outstanding (or probing)
            for _, lease, _ in sent.values():
                self.pool.release(lease, "neutral")
            streams.close()

    def _stream_request(self, model: str, rid: str, item: "_StreamItem", remaining: float):
        """The ``ModelInferRequest`` of one stream attempt (one image; ``map_size`` working, the request
        timeout in microseconds)."""
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import serialize_byte_tensor

        kind, payload = item.kind, item.payload
        r = service_pb2.ModelInferRequest(model_name=model, id=rid)
        t = r.inputs.add()
        if kind == FILES:
            arr = np.array([payload], dtype=np.object_).reshape(1, 1)
            t.name, t.datatype = protocol.GLAD_FILE_INPUT, "BYTES"
            raw = serialize_byte_tensor(arr).item()
        else:
            arr = payload[None]
            t.name, t.datatype = protocol.GLAD_INPUT, "FP32"
            raw = arr.tobytes()
        t.shape.extend(arr.shape)
        r.raw_input_contents.append(raw)
        for n in self._meta["outputs"]:  # what <prefix>_glad declares (errors only where served)
            r.outputs.add().name = n
        for k, v in self._request_parameters.items():
            r.parameters[k].string_param = v
        r.parameters["timeout"].int64_param = max(1, int(remaining * 1e6))
        return r

    def close(self) -> None:
        """Close the gRPC channels."""
        with self._lock:
            clients = list(self._clients.values()) + self._retired
            self._clients, self._retired = {}, []
        for c in clients:
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self) -> "GladClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGladClient(_Base):
    """The asyncio version of :class:`GladClient` (``tritonclient.grpc.aio``); same arguments, same routing (the
    same :class:`~glad_runtime.serving.routing.Pool` and retry state machine), same errors.

    ``await client.detect(images)``, ``await client.health()``, ``await client.metadata()``; use
    ``async with AsyncGladClient(...) as client`` or ``await client.close()``. Many coroutines may share one
    client in one event loop.
    """

    _grpc_module = "tritonclient.grpc.aio"
    _keep_retired = 4

    def _retire(self, client) -> None:
        if client is None:
            return
        self._retired.append(client)
        while len(self._retired) > self._keep_retired:
            old = self._retired.pop(0)
            try:
                task = asyncio.get_running_loop().create_task(old.close())
            except RuntimeError:  # no running loop: left to the garbage collector
                continue
            self._closing.add(task)  # a reference until it is done (the loop keeps only weak ones)
            task.add_done_callback(self._closing.discard)

    async def _call(self, fn, what: str, timeout: float | None = None, balance: bool = True):
        """See :meth:`GladClient._call` (``fn`` is a coroutine function)."""
        att = self._attempts(what, timeout, balance)
        while True:
            step = att.next()
            if step.kind == "sleep":
                await asyncio.sleep(step.seconds)
                continue
            if step.kind == "raise":
                self._count(att, step.error)
                raise step.error
            url = step.lease.url
            try:
                out = await fn(self._client(url, fresh=step.lease.probe), url, step.remaining)
            except asyncio.CancelledError:
                self.pool.release(step.lease, "neutral")  # the caller cancelled: nobody to blame
                raise
            except Exception as e:
                att.failed(step.lease, classify_error(e, url))
                continue
            att.succeeded(step.lease)
            self._count(att)
            return out

    async def metadata(self) -> dict:
        """See :meth:`GladClient.metadata`."""
        if self._meta is None:
            cfg = await self._call(lambda c, u, t: c.get_model_config(self.model_name, as_json=True,
                                                                      client_timeout=t),
                                   f"{self.model_name} config", balance=False)
            self._meta = self._parse_config(cfg["config"])
        return self._meta

    async def _health_one(self, url: str) -> tuple[bool, str]:
        t = self.timeout
        try:
            c = self._client(url)
            if not await c.is_server_live(client_timeout=t):
                return False, "server not live"
            if not await c.is_model_ready(self.model_name, client_timeout=t):
                return False, f"not ready: {self.model_name}"
            cfg = (await c.get_model_config(self.model_name, as_json=True, client_timeout=t))["config"]
            down = []
            for n, v in self._network_models(cfg):
                try:
                    ready = await c.is_model_ready(n, v, client_timeout=t)
                except Exception:  # an unknown model may be an error rather than False
                    ready = False
                if not ready:
                    down.append((n, v))
            return self._health_verdict(down, await c.get_model_repository_index(as_json=True, client_timeout=t))
        except Exception as e:
            self._forget(url)
            return False, str(classify_error(e, url))

    async def health(self) -> dict[str, bool]:
        """See :meth:`GladClient.health`."""
        checks = await asyncio.gather(*(self._health_one(u) for u in self.urls))
        out = {}
        for url, (ok, why) in zip(self.urls, checks):
            self.pool.record_health(url, ok, None if ok else ServerUnavailableError(f"{url}: {why}", None, url))
            out[url] = ok
        return out

    async def ready(self) -> bool:
        """See :meth:`GladClient.ready`."""
        return any((await self.health()).values())

    async def model_ready(self, graph: str = "glad") -> bool:
        """See :meth:`GladClient.model_ready`."""
        name = protocol.model_name(self.model_prefix, graph)
        for url in self.urls:
            try:
                if await self._client(url).is_model_ready(name, client_timeout=self.timeout):
                    return True
            except Exception:
                self._forget(url)
        return False

    async def _infer(self, chunk: list, deadline: float) -> list[Detection]:
        import tritonclient.grpc.aio as aioclient

        async def call(c, url, remaining):
            inputs, outputs = self._inputs(aioclient, chunk[0][2], [g[3] for g in chunk])
            r = await c.infer(self.model_name, inputs, **self._infer_kwargs(outputs, remaining))
            return self._results(r, [g[1] for g in chunk], url)
        return await self._call(call, f"{self.model_name} infer", deadline - self.pool.clock())

    async def detect(self, images: Iterable[Any], timeout: float | None = None) -> list[Detection]:
        """See :meth:`GladClient.detect`."""
        deadline = self.pool.clock() + (self.timeout if timeout is None else float(timeout))
        if self._meta is None:
            cfg = await self._call(lambda c, u, t: c.get_model_config(self.model_name, as_json=True,
                                                                      client_timeout=t),
                                   f"{self.model_name} config", deadline - self.pool.clock(), balance=False)
            self._meta = self._parse_config(cfg["config"])
        slots, good = self._prepare_all(images)
        for chunk in self._chunks(good):
            try:
                dets = await self._infer(chunk, deadline)
            except BadInputError as e:
                if not self._isolate(chunk):
                    dets = _refused_all(chunk, e)
                else:  # a server without per-image errors: one by one, so only the refused image fails
                    dets = []
                    for g in chunk:
                        try:
                            dets += await self._infer([g], deadline)
                        except BadInputError as e1:
                            dets.append(Detection(source=g[1], error=_refused(e1, g[1])))
            for g, d in zip(chunk, dets):
                slots[g[0]] = d
        return slots  # type: ignore[return-value]

    async def close(self) -> None:
        """Close the gRPC channels."""
        with self._lock:
            clients = list(self._clients.values()) + self._retired
            self._clients, self._retired = {}, []
        for c in clients:
            try:
                await c.close()
            except Exception:
                pass

    async def __aenter__(self) -> "AsyncGladClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
