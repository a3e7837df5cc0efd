"""Streaming to the in-flight model (:meth:`GladClient.stream <glad_runtime.serving.client.GladClient.stream>`):
one gRPC ``ModelStreamInfer`` stream per replica (:class:`Streams`) and the per-image send / resend / answer loop of
one call (:class:`InflightStream`). Requests are planned and answers parsed by
:mod:`~glad_runtime.serving.client.plan`, as for ``detect``; the retry rules are the routing's, per image.
"""

from __future__ import annotations

import heapq
import itertools
import queue
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np

from glad_runtime.core.detection import Detection
from glad_runtime.errors import BadInputError, DeadlineExceededError, ServerUnavailableError, UsageError
from glad_runtime.serving import protocol, routing
from glad_runtime.serving.client import plan
from glad_runtime.serving.client.core import GRPC_CHANNEL_ARGS, classify_error

__all__ = ["Streams", "InflightStream", "stream_request", "ANSWER_GRACE_S"]

#: seconds past an image's deadline that a stream waits for the server's own "deadline exceeded"
ANSWER_GRACE_S = 1.0


class Streams:
    """One bidirectional gRPC stream (``ModelStreamInfer``) per replica; every response lands in ``events`` as
    ``("response", url, token, ModelStreamInferResponse)``, and a stream that ends as ``("broken", url, token,
    error)``. ``token`` tells a stream from the one that replaced it."""

    def __init__(self, events: queue.Queue):
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
        """Close every stream."""
        for url in list(self._open):
            self._close(self._open.pop(url))


def stream_request(model: str, rid: str, req: plan.Request, remaining: float):
    """The ``ModelInferRequest`` of one stream attempt: the planned request (:func:`plan.plan_request`) with id
    ``rid`` and the request timeout in microseconds."""
    from tritonclient.grpc import service_pb2
    from tritonclient.utils import serialize_byte_tensor

    r = service_pb2.ModelInferRequest(model_name=model, id=rid)
    t = r.inputs.add()
    t.name, t.datatype = req.input, req.datatype
    t.shape.extend(req.array.shape)
    r.raw_input_contents.append(serialize_byte_tensor(req.array).item() if req.array.dtype == np.object_
                                else req.array.tobytes())
    for n in req.outputs:  # what <prefix>_glad declares (errors only where served)
        r.outputs.add().name = n
    for k, v in req.parameters.items():
        r.parameters[k].string_param = v
    r.parameters["timeout"].int64_param = plan.deadline_kwargs(remaining)["timeout"]
    return r


@dataclass
class _Item:
    """One image of a stream: what is sent (:class:`plan.Image`) and its retry state machine."""

    image: plan.Image
    attempts: routing.Attempts


class InflightStream:
    """One :meth:`GladClient.stream` call: images pulled while fewer than ``window`` are outstanding, each sent as
    one request to ``<prefix>_glad_inflight`` on its replica's stream, resent per the routing until its deadline
    (``timeout`` seconds from when it is pulled), and yielded once, as soon as it is answered (:meth:`run`).

    Each attempt has its own request id (``<index>.<attempt>``), so a late answer to an abandoned attempt is
    dropped."""

    def __init__(self, client, window: int = 16, timeout: float | None = None):
        if window < 1:
            raise UsageError(f"window must be >= 1, got {window}")
        self.client, self.window = client, window
        self.budget = client.timeout if timeout is None else float(timeout)
        self.name = protocol.model_name(client.model_prefix, protocol.INFLIGHT_MODEL)
        self.events: queue.Queue = queue.Queue()
        self.streams = Streams(self.events)
        self.sent: dict[str, tuple] = {}  # attempt id -> (item, lease, stream token)
        self.due: list = []  # heap of (time, seq, item): items to (re)send
        self.outstanding = 0
        self._seq = itertools.count()
        self._exhausted = False  # the input ran out: never pulled again

    def run(self, images: Iterable[Any]) -> Iterator[Detection]:
        """Yield one Detection per image, in completion order (see :meth:`GladClient.stream`)."""
        info = self.client.metadata()
        source = iter(enumerate(images))
        try:
            while True:
                yield from self._admit(source, info)
                if not self.outstanding:
                    return
                yield from self._send_due(info)
                yield from self._expire_hung()
                yield from self._receive()
        finally:  # also when the caller stops early: no lease stays counted as outstanding (or probing)
            for _, lease, _ in self.sent.values():
                self.client.pool.release(lease, "neutral")
            self.streams.close()

    def _due(self, item: _Item, at: float = 0.0) -> None:
        heapq.heappush(self.due, (at, next(self._seq), item))

    def _finish(self, item: _Item, error: BaseException | None = None) -> None:
        self.client._count(item.attempts, error)
        self.outstanding -= 1

    def _admit(self, source: Iterator, info: dict) -> Iterator[Detection]:
        """Pull images while the window has room; one that cannot be prepared is yielded failed at once."""
        while not self._exhausted and self.outstanding < self.window:
            try:
                i, image = next(source)
            except StopIteration:
                self._exhausted = True
                return
            try:
                prepared = plan.prepare(image, i, info["resolution"])
            except BadInputError as e:
                yield Detection(source=plan.source_name(image, i), error=e)
                continue
            self.outstanding += 1
            self._due(_Item(prepared, self.client._attempts(f"{self.name} stream #{i}", self.budget)))

    def _send_due(self, info: dict) -> Iterator[Detection]:
        """(Re)send every item that is due, or sleep it, or give it up with the routing's error."""
        now = self.client.pool.clock()
        while self.due and self.due[0][0] <= now:
            item = heapq.heappop(self.due)[2]
            step = item.attempts.next()
            if step.kind == "sleep":
                self._due(item, now + step.seconds)
            elif step.kind == "raise":
                self._finish(item, step.error)
                yield Detection(source=item.image.source, error=step.error)
            else:
                rid = f"{item.image.index}.{item.attempts.attempts}"
                req = stream_request(self.name, rid, plan.plan_request([item.image], info), step.remaining)
                self.sent[rid] = (item, step.lease, self.streams.send(step.lease.url, req))

    def _expire_hung(self) -> Iterator[Detection]:
        """No answer well past its deadline (a hung replica): the image fails with DeadlineExceededError. Answers
        already waiting (a slow consumer) are read first."""
        if not self.events.empty():
            return
        for rid in [r for r, (it, _, _) in self.sent.items() if it.attempts.remaining() < -ANSWER_GRACE_S]:
            item, lease, _ = self.sent.pop(rid)
            err = DeadlineExceededError(f"{lease.url}: no answer for {self.name} #{item.image.index} within "
                                        f"{self.budget:g} s", None, lease.url)
            item.attempts.failed(lease, err)
            self._finish(item, err)
            yield Detection(source=item.image.source, error=err)

    def _receive(self) -> Iterator[Detection]:
        """Wait for one event (until the next item is due): a broken stream fails every attempt on it (resent), an
        answer is yielded, an error answer fails its image (refused) or resends it."""
        wait = max(0.0, self.due[0][0] - self.client.pool.clock()) if self.due else 0.5
        try:
            kind, url, token, payload = self.events.get(timeout=max(wait, 1e-3))
        except queue.Empty:
            return
        if kind == "broken":  # the stream to url ended: every attempt on it failed
            self.streams.forget(url, token)
            for rid in [rid for rid, (_, _, tok) in self.sent.items() if tok == token]:
                item, lease, _ = self.sent.pop(rid)
                item.attempts.failed(lease, classify_error(payload, url))
                self._due(item)
            return
        rid = payload.infer_response.id
        if rid not in self.sent:
            return  # an answer to an attempt given up on (the image was resent): dropped
        item, lease, _ = self.sent.pop(rid)
        if payload.error_message:
            err = routing.error_for(*protocol.stream_error_status(payload.error_message), url)
            item.attempts.failed(lease, err)
            if isinstance(err, BadInputError):
                self._finish(item, err)
                yield Detection(source=item.image.source, error=plan.refused(err, item.image.source))
            else:
                self._due(item)
            return
        from tritonclient.grpc import InferResult

        item.attempts.succeeded(lease)
        self._finish(item)
        yield self.client._answer(InferResult(payload.infer_response), [item.image.source], url)[0]
