"""The synchronous client, :class:`GladClient`: the shared core (:mod:`~glad_runtime.serving.client.core`) driven by
plain calls, plus :meth:`GladClient.stream` (:mod:`~glad_runtime.serving.client.streaming`)."""

from __future__ import annotations

import time
from typing import Any, Iterable, Iterator

from glad_runtime.core.detection import Detection
from glad_runtime.serving.client.core import ClientCore, run
from glad_runtime.serving.client.streaming import InflightStream

__all__ = ["GladClient"]


class GladClient(ClientCore):
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

    Failover, breaker and error policy: see :mod:`glad_runtime.serving.client` (the rules live in
    :mod:`glad_runtime.serving.routing`).
    """

    _sleep = staticmethod(time.sleep)

    def metadata(self) -> dict:
        """``{"resolution", "max_batch", "parameters", "dino_resolution", "calibration", "outputs", "errors"}`` of
        the ``<prefix>_glad`` model (bundle checksum, version, calibrated, threshold; the outputs it declares, which
        every request asks for, and whether ``errors`` is among them), from the first replica that answers. Raises
        ModelNotFoundError (no replica serves it) / ServerUnavailableError / DeadlineExceededError, or
        ServingError for a model without the contract's inputs or outputs.
        """
        return run(self._metadata_steps())

    def health(self) -> dict[str, bool]:
        """Per URL: True when the server is live and the bundle can answer there (never raises): ``<prefix>_glad``
        is READY, so is each network model it calls (its config's ``served_graphs``, at the entry model's own
        version, through Triton's model readiness API: an entry model READY beside an unloaded or failed
        ``<prefix>_unet`` is not healthy), and every other ``<prefix>_*`` model of the repository index has a
        READY version. The result also feeds the replica's circuit breaker (ready closes it, not ready ejects
        it)."""
        return self._record_health([run(self._health_steps(url)) for url in self.urls])

    def ready(self) -> bool:
        """True when at least one replica is healthy (:meth:`health`)."""
        return any(self.health().values())

    def model_ready(self, graph: str = "glad") -> bool:
        """True when some URL has ``<prefix>_<graph>`` ready (``glad``, ``unet``, ``vae_encoder``, ...)."""
        return run(self._model_ready_steps(graph))

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
        return run(self._detect_steps(images, timeout))

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
        yield from InflightStream(self, window, timeout).run(images)

    def close(self) -> None:
        """Close the gRPC channels."""
        for c in self._take_channels():
            try:
                c.close()
            except Exception:
                pass

    def __enter__(self) -> "GladClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
