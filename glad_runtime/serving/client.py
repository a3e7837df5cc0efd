"""Client SDK for a GLAD Triton server (``glad serve``): send images, get scores, labels and anomaly maps back.

Needs numpy, Pillow and ``tritonclient[grpc]`` only (no torch, no onnxruntime). The whole ADS/SAFF loop runs
server-side in the ``<prefix>_glad`` BLS model (``triton_models``); the client decodes and preprocesses the images
exactly as ``glad detect`` does (:mod:`glad_runtime.core.images`: EXIF, 16-bit, resize to the bundle resolution, [-1, 1])
and sends one request per batch of float32 ``[B, 3, R, R]``.

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
from glad_runtime.core.images import ImageLoadError, load_image, preprocess, to_unit_rgb
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


# ---------------------------------------------------------------------------------------------- results
def _prepare(image: Any, index: int, resolution: int) -> tuple[str, np.ndarray, tuple[int, int] | None]:
    """One input -> ``(label, float32 [3,R,R] in [-1,1], original size)``; raises BadInputError."""
    from PIL import Image

    if isinstance(image, (str, os.PathLike)):
        label = str(image)
    else:
        label = f"#{index}"
    try:
        if isinstance(image, np.ndarray) and image.dtype.kind == "f" and image.ndim == 3 and image.shape[0] == 3:
            if image.shape[1:] != (resolution, resolution):
                raise BadInputError(f"{label}: preprocessed image {list(image.shape)}, expected "
                                    f"[3, {resolution}, {resolution}]")
            return label, np.ascontiguousarray(image, dtype=np.float32), None
        if isinstance(image, np.ndarray):
            if image.dtype not in (np.uint8, np.uint16) or image.ndim not in (2, 3):
                raise BadInputError(f"{label}: arrays must be uint8/uint16 [H,W] or [H,W,3|4], or float32 "
                                    f"[3,{resolution},{resolution}] in [-1,1]; got {image.dtype} {list(image.shape)}")
            rgb = to_unit_rgb(Image.fromarray(image))
        elif isinstance(image, Image.Image):
            rgb = to_unit_rgb(image)
        elif isinstance(image, (str, os.PathLike, bytes, bytearray)):
            rgb = load_image(image).rgb
        else:
            raise BadInputError(f"{label}: unsupported input type {type(image).__name__}")
    except BadInputError:
        raise
    except (ImageLoadError, ValueError, TypeError, OSError) as e:
        raise BadInputError(f"{label}: {e}") from e
    return label, preprocess(rgb, resolution), (rgb.shape[0], rgb.shape[1])


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
        dims = [int(d) for d in cfg["input"][0]["dims"]]
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        maps = [o for o in cfg["output"] if o["name"] == "anomaly_maps"]
        return {"resolution": dims[-1], "max_batch": int(cfg.get("max_batch_size", 1)) or 1, "parameters": params,
                "dino_resolution": int(maps[0]["dims"][-1]) if maps else dims[-1],
                "calibration": protocol.calibration_from_parameter(params.get("calibration"))}

    def _inputs(self, module, batch: np.ndarray):
        inp = module.InferInput(protocol.GLAD_INPUT, list(batch.shape), "FP32")
        inp.set_data_from_numpy(batch)
        return [inp], [module.InferRequestedOutput(n) for n in protocol.GLAD_OUTPUT_NAMES]

    def _results(self, result, labels: list[str], sizes: list, url: str) -> list[Detection]:
        arrays = {n: result.as_numpy(n) for n in protocol.GLAD_OUTPUT_NAMES}
        return protocol.detections_from_arrays(arrays, labels, sizes, self._meta["dino_resolution"],
                                               self._meta["calibration"], self.threshold, url)

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
        res = self._meta["resolution"]
        slots: list[Detection | None] = []
        good = []
        for i, image in enumerate(images):
            try:
                label, arr, size = _prepare(image, i, res)
            except BadInputError as e:
                slots.append(Detection(source=str(image) if isinstance(image, (str, os.PathLike)) else f"#{i}",
                                       error=e))
                continue
            if not np.isfinite(arr).all():
                slots.append(Detection(source=label, error=BadInputError(f"{label}: NaN or Inf values")))
                continue
            slots.append(None)
            good.append((i, label, arr, size))
        return slots, good

    def _chunks(self, good: list) -> list[list]:
        n = self._meta["max_batch"]
        return [good[k:k + n] for k in range(0, len(good), n)]


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

    def _infer(self, batch: np.ndarray, labels, sizes) -> list[Detection]:
        import tritonclient.grpc as grpcclient

        def call(c, url):
            inputs, outputs = self._inputs(grpcclient, batch)
            r = c.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout)
            return self._results(r, labels, sizes, url)
        return self._call(call)

    def detect(self, images: Iterable[Any]) -> list[Detection]:
        """Score images on the server, one request per batch of up to the model's ``max_batch_size``.

        Args:
            images: file paths, encoded bytes, PIL images, uint8/uint16 arrays ``[H,W]`` / ``[H,W,3|4]``, or
                preprocessed float32 ``[3,R,R]`` in [-1, 1].
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
            batch = np.stack([g[2] for g in chunk])
            try:
                dets = self._infer(batch, [g[1] for g in chunk], [g[3] for g in chunk])
            except BadInputError as e:
                if len(chunk) == 1:
                    dets = [Detection(source=chunk[0][1], error=e)]
                else:
                    dets = []
                    for g in chunk:  # isolate: rerun one by one so only the refused image fails
                        try:
                            dets += self._infer(g[2][None], [g[1]], [g[3]])
                        except BadInputError as e1:
                            dets.append(Detection(source=g[1], error=e1))
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

    async def _infer(self, batch, labels, sizes) -> list[Detection]:
        import tritonclient.grpc.aio as aioclient

        async def call(c, url):
            inputs, outputs = self._inputs(aioclient, batch)
            r = await c.infer(self.model_name, inputs, outputs=outputs, client_timeout=self.timeout)
            return self._results(r, labels, sizes, url)
        return await self._call(call)

    async def detect(self, images: Iterable[Any]) -> list[Detection]:
        """See :meth:`GladClient.detect`."""
        await self.metadata()
        slots, good = self._prepare_all(images)
        for chunk in self._chunks(good):
            batch = np.stack([g[2] for g in chunk])
            try:
                dets = await self._infer(batch, [g[1] for g in chunk], [g[3] for g in chunk])
            except BadInputError as e:
                if len(chunk) == 1:
                    dets = [Detection(source=chunk[0][1], error=e)]
                else:
                    dets = []
                    for g in chunk:
                        try:
                            dets += await self._infer(g[2][None], [g[1]], [g[3]])
                        except BadInputError as e1:
                            dets.append(Detection(source=g[1], error=e1))
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
