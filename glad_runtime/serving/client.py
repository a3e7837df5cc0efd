"""Client SDK for a GLAD Triton server (``glad serve``): send images, get scores, labels and anomaly maps back.

Needs numpy and ``tritonclient[grpc]`` only (Pillow, lazily, to encode arrays or PIL images; no scipy, no torch,
no onnxruntime: ``pip install glad-toolkit[client]``). The whole ADS/SAFF loop runs server-side in the
``<prefix>_glad`` BLS model (``triton_models``). Files and encoded bytes are sent as they are (``image_files``:
the server decodes them with the code ``glad detect`` runs, so nothing is decoded on the line PC); uint8/uint16
arrays and PIL images are sent as lossless PNG; preprocessed float32 ``[3, R, R]`` tensors in [-1, 1] as ``images``.
One request per batch of up to the model's ``max_batch_size`` images of one kind.

Reliability (deployment-anchors.md section 7):

* every RPC carries a client deadline (``timeout`` seconds, gRPC ``client_timeout``);
* ``UNAVAILABLE`` (server down, restarting, shutting down) is retried with exponential backoff, moving to the next
  URL of ``urls`` first (failover); inference on a fixed image is idempotent, so a retry never double-counts;
* errors are typed: :class:`BadInputError` (an image that cannot be read or that the server refuses: the other
  images of the call still complete), :class:`ServerUnavailableError` (no URL answered within the retries),
  :class:`DeadlineExceededError`, :class:`ModelNotFoundError` (the prefix is not served) and
  :class:`ServingError` for anything else the server reports.

Example::

    from glad_runtime.serving.client import GladClient
    with GladClient(["localhost:8001", "backup:8001"], "elpv_mono") as client:
        for d in client.detect(["cell1.png", "cell2.png"]):
            print(d.source, d.error or (d.score, d.label, d.adaptive_step))
"""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any, Iterable, Sequence

import numpy as np

from glad_runtime.core.detection import Detection
from glad_runtime.serving import protocol
from glad_runtime.errors import ServingError, BadInputError, ServerUnavailableError, DeadlineExceededError, ModelNotFoundError  # noqa: F401 (re-exported)

__all__ = ["GladClient", "AsyncGladClient", "Detection", "ServingError", "BadInputError",
           "ServerUnavailableError", "DeadlineExceededError", "ModelNotFoundError", "classify_error",
           "GRPC_CHANNEL_ARGS"]

#: gRPC channel options: message limits raised to 2 GiB - 1 both ways (batches of 512 px images and maps exceed
#: gRPC's 4 MiB default), keepalive so a dead server is noticed.
GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                     ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000)]



# ---------------------------------------------------------------------------------------------- errors


def classify_error(exc: Exception, url: str | None = None) -> ServingError:
    """Map a ``tritonclient`` exception (or a gRPC error) to the typed errors of this module.

    Args:
        exc: ``tritonclient.utils.InferenceServerException`` or any exception raised by a client call.
        url: the server URL, kept on the returned error.
    Returns:
        a :class:`ServingError` subclass instance (never raises).
    """
    if isinstance(exc, ServingError):
        return exc
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    status = (status or "").replace("StatusCode.", "") or None
    msg = exc.message() if callable(getattr(exc, "message", None)) else str(exc)
    msg = f"{url}: {msg}" if url else str(msg)
    low = msg.lower()
    if status == "DEADLINE_EXCEEDED" or "deadline exceeded" in low:
        return DeadlineExceededError(msg, status, url)
    if "unknown model" in low or "is not found" in low or (status == "NOT_FOUND"):
        return ModelNotFoundError(msg, status, url)
    if status == "UNAVAILABLE" and "model" in low and "not ready" in low:
        return ModelNotFoundError(msg, status, url)
    if status in ("UNAVAILABLE",) or "failed to connect" in low or "connection refused" in low or \
            "socket closed" in low or "shutting down" in low:
        return ServerUnavailableError(msg, status, url)
    if status == "INVALID_ARGUMENT":
        return BadInputError(msg, status, url)
    return ServingError(msg, status, url)


# ---------------------------------------------------------------------------------------------- inputs
FILES, TENSOR = "files", "tensor"


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


def _prepare(image: Any, index: int, resolution: int) -> tuple[str, str, Any]:
    """One input -> ``(source, kind, payload)``: ``FILES`` with the encoded bytes, or ``TENSOR`` with float32
    ``[3, R, R]``. Raises BadInputError (unreadable path, unsupported type, shape or dtype, NaN)."""
    if isinstance(image, (str, os.PathLike)):
        source = str(image)
        try:
            with open(image, "rb") as f:
                return source, FILES, f.read()
        except OSError as e:
            raise BadInputError(f"{source}: cannot open ({e.strerror or e})") from e
    source = f"#{index}"
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


class _Base:
    """Shared settings, request building and response parsing of the sync and asyncio clients."""

    def __init__(self, urls: str | Sequence[str], model_prefix: str, *, timeout: float = 60.0, retries: int = 3,
                 backoff: float = 0.2, max_backoff: float = 5.0, threshold: float | None = None):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise ValueError("at least one server URL is needed")
        self.model_prefix = model_prefix
        self.model_name = protocol.model_name(model_prefix)
        self.timeout, self.retries = float(timeout), max(0, int(retries))
        self.backoff, self.max_backoff = float(backoff), float(max_backoff)
        self.threshold = threshold
        self._current = 0  # index of the URL that answered last (sticky until it fails)
        self._meta: dict | None = None
        self._clients: dict[str, Any] = {}

    _grpc_module = "tritonclient.grpc"  # the asyncio client uses tritonclient.grpc.aio

    def _client(self, url: str):
        """The (cached) tritonclient connection to ``url``."""
        import importlib

        if url not in self._clients:
            module = importlib.import_module(self._grpc_module)
            self._clients[url] = module.InferenceServerClient(url, channel_args=GRPC_CHANNEL_ARGS)
        return self._clients[url]

    def _parse_config(self, cfg: dict) -> dict:
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        names = {i["name"] for i in cfg["input"]}
        if protocol.GLAD_FILE_INPUT not in names:
            raise ServingError(f"{self.model_name} has no {protocol.GLAD_FILE_INPUT!r} input: the repository was "
                               "generated by an older glad-toolkit; regenerate it with `glad serve`")
        dims = [int(d) for i in cfg["input"] if i["name"] == protocol.GLAD_INPUT for d in i["dims"]]
        return {"resolution": dims[-1], "max_batch": int(cfg.get("max_batch_size", 1)) or 1, "parameters": params,
                "dino_resolution": int(params.get("dino_resolution") or dims[-1]),
                "calibration": protocol.calibration_from_parameter(params.get("calibration"))}

    def _inputs(self, module, kind: str, payloads: list):
        if kind == FILES:
            inp = module.InferInput(protocol.GLAD_FILE_INPUT, [len(payloads), 1], "BYTES")
            inp.set_data_from_numpy(np.array(payloads, dtype=np.object_).reshape(-1, 1))
        else:
            batch = np.stack(payloads)
            inp = module.InferInput(protocol.GLAD_INPUT, list(batch.shape), "FP32")
            inp.set_data_from_numpy(batch)
        return [inp], [module.InferRequestedOutput(n) for n in protocol.GLAD_OUTPUT_NAMES]

    #: maps come back at the working size (D x D, small); ``Detection.map_at_original_size`` resizes them with
    #: the same Pillow code as ``glad detect``; regions are in original-image pixels either way.
    _request_parameters = {protocol.MAP_SIZE_PARAMETER: "working"}

    def _results(self, result, sources: list[str], url: str) -> list[Detection]:
        arrays = {n: result.as_numpy(n) for n in protocol.GLAD_OUTPUT_NAMES}
        return protocol.detections_from_arrays(arrays, sources, self._meta["calibration"], self.threshold, url,
                                               map_size="working")

    def _order(self):
        """The failover order of one call: ``(round, url index, url)`` over every URL per round (the one that
        answered last first), with ``(None, round, None)`` between rounds: the caller sleeps :meth:`_wait`."""
        for attempt in range(self.retries + 1):
            for k in range(len(self.urls)):
                idx = (self._current + k) % len(self.urls)
                yield attempt, idx, self.urls[idx]
            if attempt < self.retries:
                yield None, attempt, None

    @staticmethod
    def _unavailable(exc: Exception, url: str) -> ServingError:
        """The typed error of a failed call: returned when the URL is unavailable (fail over), raised otherwise."""
        err = classify_error(exc, url)
        if not isinstance(err, ServerUnavailableError):
            raise err from exc
        return err

    def _exhausted(self, last: ServingError | None) -> ServerUnavailableError:
        err = ServerUnavailableError(f"no server answered after {self.retries + 1} rounds over {self.urls}: {last}",
                                     "UNAVAILABLE")
        err.__cause__ = last
        return err

    def _wait(self, attempt: int) -> float:
        return min(self.max_backoff, self.backoff * (2 ** attempt))

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
                slots.append(Detection(source=str(image) if isinstance(image, (str, os.PathLike)) else f"#{i}",
                                       error=e))
                continue
            slots.append(None)
            good.append((i, source, kind, payload))
        return slots, good

    def _chunks(self, good: list) -> list[list]:
        """Requests: runs of one input kind, at most ``max_batch_size`` images each, in input order."""
        n = self._meta["max_batch"]
        chunks: list[list] = []
        for g in good:
            if chunks and chunks[-1][0][2] == g[2] and len(chunks[-1]) < n:
                chunks[-1].append(g)
            else:
                chunks.append([g])
        return chunks


class GladClient(_Base):
    """Synchronous client of a served GLAD bundle (gRPC).

    Args:
        urls: one ``host:port`` gRPC URL or several (failover order; the one that answered last is tried first).
        model_prefix: the bundle's model prefix on the server (``glad serve`` prints it; models are
            ``<prefix>_glad``, ``<prefix>_unet``, ...).
        timeout: deadline in seconds of each RPC (gRPC ``client_timeout``).
        retries: extra rounds over all URLs after ``UNAVAILABLE`` (backoff ``backoff * 2**round`` seconds, capped
            at ``max_backoff``).
        threshold: raw-score threshold overriding the server's calibration for this client's labels.
    """


    def _call(self, fn):
        """Run ``fn(client, url)`` on the current URL, failing over on UNAVAILABLE, with backoff between rounds."""
        last: ServingError | None = None
        for attempt, idx, url in self._order():
            if attempt is None:
                time.sleep(self._wait(idx))
                continue
            try:
                out = fn(self._client(url), url)
                self._current = idx
                return out
            except Exception as e:  # tritonclient raises InferenceServerException; grpc may raise its own
                last = self._unavailable(e, url)
                self._drop(url)
        raise self._exhausted(last)

    def _drop(self, url: str) -> None:
        c = self._clients.pop(url, None)
        if c is not None:
            try:
                c.close()
            except Exception:
                pass

    def metadata(self) -> dict:
        """``{"resolution", "max_batch", "parameters"}`` of the ``<prefix>_glad`` model (bundle checksum, version,
        calibrated, threshold). Raises ModelNotFoundError / ServerUnavailableError."""
        if self._meta is None:
            cfg = self._call(lambda c, u: c.get_model_config(self.model_name, as_json=True,
                                                             client_timeout=self.timeout))
            self._meta = self._parse_config(cfg["config"])
        return self._meta

    def health(self) -> dict[str, bool]:
        """Per URL: True when the server is live and ready and ``<prefix>_glad`` is ready (never raises)."""
        out = {}
        for url in self.urls:
            try:
                c = self._client(url)
                out[url] = bool(c.is_server_ready(client_timeout=self.timeout)
                                and c.is_model_ready(self.model_name, client_timeout=self.timeout))
            except Exception:
                self._drop(url)
                out[url] = False
        return out

    def model_ready(self, graph: str = "glad") -> bool:
        """True when some URL has ``<prefix>_<graph>`` ready (``glad``, ``unet``, ``vae_encoder``, ...)."""
        name = protocol.model_name(self.model_prefix, graph)
        try:
            return bool(self._call(lambda c, u: c.is_model_ready(name, client_timeout=self.timeout)))
        except ServingError:
            return False

    def _infer(self, chunk: list) -> list[Detection]:
        import tritonclient.grpc as grpcclient

        def call(c, url):
            inputs, outputs = self._inputs(grpcclient, chunk[0][2], [g[3] for g in chunk])
            r = c.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout,
                        parameters=self._request_parameters)
            return self._results(r, [g[1] for g in chunk], url)
        return self._call(call)

    def detect(self, images: Iterable[Any]) -> list[Detection]:
        """Score images on the server, one request per batch of up to the model's ``max_batch_size``.

        Args:
            images: file paths or encoded bytes (sent as they are), PIL images, uint8/uint16 arrays ``[H,W]`` /
                uint8 ``[H,W,3|4]`` (sent as lossless PNG), or preprocessed float32 ``[3,R,R]`` in [-1, 1].
        Returns:
            one :class:`Detection` per input, in order. An input that cannot be read or that the server refuses
            gets ``error`` (:class:`BadInputError`) and the others complete.
        Raises:
            ServerUnavailableError: no URL answered within the retries (no partial results are returned: rerun).
            DeadlineExceededError, ModelNotFoundError, ServingError: as named.
        """
        self.metadata()
        slots, good = self._prepare_all(images)
        for chunk in self._chunks(good):
            try:
                dets = self._infer(chunk)
            except BadInputError as e:
                dets = [Detection(source=chunk[0][1], error=_refused(e, chunk[0][1]))] if len(chunk) == 1 else []
                for g in (chunk if len(chunk) > 1 else []):  # isolate: one by one, so only the refused image fails
                    try:
                        dets += self._infer([g])
                    except BadInputError as e1:
                        dets.append(Detection(source=g[1], error=_refused(e1, g[1])))
            for g, d in zip(chunk, dets):
                slots[g[0]] = d
        return slots  # type: ignore[return-value]

    def close(self) -> None:
        """Close the gRPC channels."""
        for url in list(self._clients):
            self._drop(url)

    def __enter__(self) -> "GladClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class AsyncGladClient(_Base):
    """The asyncio version of :class:`GladClient` (``tritonclient.grpc.aio``); same arguments, same errors.

    ``await client.detect(images)``, ``await client.health()``, ``await client.metadata()``; use
    ``async with AsyncGladClient(...) as client`` or ``await client.close()``.
    """

    _grpc_module = "tritonclient.grpc.aio"

    async def _drop(self, url: str) -> None:
        c = self._clients.pop(url, None)
        if c is not None:
            try:
                await c.close()
            except Exception:
                pass

    async def _call(self, fn):
        last: ServingError | None = None
        for attempt, idx, url in self._order():
            if attempt is None:
                await asyncio.sleep(self._wait(idx))
                continue
            try:
                out = await fn(self._client(url), url)
                self._current = idx
                return out
            except Exception as e:
                last = self._unavailable(e, url)
                await self._drop(url)
        raise self._exhausted(last)

    async def metadata(self) -> dict:
        """See :meth:`GladClient.metadata`."""
        if self._meta is None:
            cfg = await self._call(lambda c, u: c.get_model_config(self.model_name, as_json=True,
                                                                   client_timeout=self.timeout))
            self._meta = self._parse_config(cfg["config"])
        return self._meta

    async def health(self) -> dict[str, bool]:
        """See :meth:`GladClient.health`."""
        out = {}
        for url in self.urls:
            try:
                c = self._client(url)
                out[url] = bool(await c.is_server_ready(client_timeout=self.timeout)
                                and await c.is_model_ready(self.model_name, client_timeout=self.timeout))
            except Exception:
                await self._drop(url)
                out[url] = False
        return out

    async def _infer(self, chunk: list) -> list[Detection]:
        import tritonclient.grpc.aio as aioclient

        async def call(c, url):
            inputs, outputs = self._inputs(aioclient, chunk[0][2], [g[3] for g in chunk])
            r = await c.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout,
                              parameters=self._request_parameters)
            return self._results(r, [g[1] for g in chunk], url)
        return await self._call(call)

    async def detect(self, images: Iterable[Any]) -> list[Detection]:
        """See :meth:`GladClient.detect`."""
        await self.metadata()
        slots, good = self._prepare_all(images)
        for chunk in self._chunks(good):
            try:
                dets = await self._infer(chunk)
            except BadInputError as e:
                dets = [Detection(source=chunk[0][1], error=_refused(e, chunk[0][1]))] if len(chunk) == 1 else []
                for g in (chunk if len(chunk) > 1 else []):
                    try:
                        dets += await self._infer([g])
                    except BadInputError as e1:
                        dets.append(Detection(source=g[1], error=_refused(e1, g[1])))
            for g, d in zip(chunk, dets):
                slots[g[0]] = d
        return slots  # type: ignore[return-value]

    async def close(self) -> None:
        """Close the gRPC channels."""
        for url in list(self._clients):
            await self._drop(url)

    async def __aenter__(self) -> "AsyncGladClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
