"""What :class:`~glad_runtime.serving.client.GladClient` and :class:`~glad_runtime.serving.client.AsyncGladClient`
share: settings, connections, counters, and every call written once as a *step generator*.

A step generator does the routing (:class:`~glad_runtime.serving.routing.Attempts`), planning and parsing
(:mod:`~glad_runtime.serving.client.plan`) itself and hands each network call or sleep out as a thunk: ``result =
yield thunk``. :func:`run` (the sync client) calls the thunk; :func:`run_async` (the asyncio client, whose thunks
return coroutines from ``tritonclient.grpc.aio``) awaits what it returns. An exception the thunk raises is thrown back
in at the ``yield``, so ``try`` / ``except`` around a call work as in plain code. The two clients therefore differ
only in their drivers, their sleep and how they close channels.
"""

from __future__ import annotations

import importlib
import threading
from collections import Counter
from contextlib import closing
from functools import partial
from typing import Any, Callable, Generator, Iterable, Sequence

from glad_runtime.core.detection import Detection
from glad_runtime.errors import BadInputError, ServerUnavailableError, ServingError, UsageError
from glad_runtime.serving import protocol, routing
from glad_runtime.serving.client import plan

__all__ = ["GRPC_CHANNEL_ARGS", "classify_error", "ClientCore", "run", "run_async"]

#: gRPC channel options: message limits raised to 2 GiB - 1 both ways (batches of 512 px images and maps exceed
#: gRPC's 4 MiB default), keepalive so a dead server is noticed.
GRPC_CHANNEL_ARGS = [("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
                     ("grpc.keepalive_time_ms", 30000), ("grpc.keepalive_timeout_ms", 10000),
                     # a restarted server is reconnected to within a second, not after gRPC's 1-120 s backoff
                     ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                     ("grpc.max_reconnect_backoff_ms", 1000)]

#: A step generator: yields thunks (network calls, sleeps), is sent their results, returns the call's result.
Steps = Generator[Callable[[], Any], Any, Any]


def classify_error(exc: Exception, url: str | None = None) -> ServingError:
    """Map a ``tritonclient`` exception (or a gRPC error) to the typed errors of this package.

    Args:
        exc: ``tritonclient.utils.InferenceServerException`` or any exception raised by a client call.
        url: the server URL, kept on the returned error.
    Returns:
        a :class:`ServingError` subclass instance (never raises) whose ``retryable`` attribute says whether another
        replica may answer (:func:`glad_runtime.serving.routing.classify` has the rules).
    """
    return routing.classify_error(exc, url)


# ---------------------------------------------------------------------------------------------- drivers
def _advance(steps: Steps, value: Any, error: BaseException | None) -> tuple[bool, Any]:
    """Resume ``steps`` with a thunk's result (or throw its error in): ``(True, return value)`` when it finished,
    else ``(False, next thunk)``."""
    try:
        return False, (steps.send(value) if error is None else steps.throw(error))
    except StopIteration as stop:
        return True, stop.value


def _outcome(thunk: Callable[[], Any]) -> tuple[Any, Exception | None]:
    try:
        return thunk(), None
    except Exception as e:  # thrown back into the step generator
        return None, e


async def _outcome_async(thunk: Callable[[], Any]) -> tuple[Any, Exception | None]:
    try:
        return await thunk(), None
    except Exception as e:
        return None, e


def run(steps: Steps) -> Any:
    """Drive a step generator synchronously (each thunk is called); its return value. Closed when left early
    (an interrupt), so an attempt in flight releases its replica."""
    with closing(steps):
        done, out = _advance(steps, None, None)
        while not done:
            done, out = _advance(steps, *_outcome(out))
        return out


async def run_async(steps: Steps) -> Any:
    """Drive a step generator in asyncio (each thunk's coroutine is awaited); closed on cancellation, so an attempt
    in flight releases its replica without blame."""
    with closing(steps):
        done, out = _advance(steps, None, None)
        while not done:
            done, out = _advance(steps, *(await _outcome_async(out)))
        return out


# ---------------------------------------------------------------------------------------------- the core
class ClientCore:
    """Settings, routing, connections, counters and the step generators of both clients (see the module
    docstring); the arguments are :class:`~glad_runtime.serving.client.GladClient`'s."""

    _grpc_module = "tritonclient.grpc"  # the asyncio client uses tritonclient.grpc.aio

    def __init__(self, urls: str | Sequence[str], model_prefix: str, timeout: float = 60.0,
                 retries: int | None = None, backoff: float = 0.2, max_backoff: float = 5.0,
                 threshold: float | None = None, cooldown: float = 1.0, failure_threshold: int = 1):
        self.urls = [urls] if isinstance(urls, str) else list(urls)
        if not self.urls:
            raise UsageError("at least one server URL is needed")
        if len(set(self.urls)) != len(self.urls):
            raise UsageError(f"server URLs must be distinct: {self.urls}")
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

    @staticmethod
    def _sleep(seconds: float) -> Any:
        """Sleep (sync) or a coroutine that sleeps (asyncio): what a ``sleep`` step's thunk does."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------ connections
    def _client(self, url: str, fresh: bool = False):
        """The (cached) tritonclient connection to ``url``; ``fresh``: a new channel (a breaker's probe: the old
        channel may sit in gRPC's reconnect backoff after the server came back)."""
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
        it returns (``__del__``). Asyncio: kept and closed later (aio channels close only by ``await``)."""

    def _take_channels(self) -> list:
        """Every open and retired channel, forgotten here (what ``close`` closes)."""
        with self._lock:
            clients = list(self._clients.values()) + self._retired
            self._clients, self._retired = {}, []
        return clients

    # ------------------------------------------------------------------------------------------ counters
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

    # ------------------------------------------------------------------------------------------ pure helpers
    def _parse_config(self, cfg: dict) -> dict:
        """:func:`plan.parse_config` for this client's model."""
        return plan.parse_config(cfg, self.model_name)

    def _required_ready(self, index: dict) -> tuple[bool, list[str]]:
        """:func:`plan.required_ready` for this client's prefix."""
        return plan.required_ready(index, self.model_prefix)

    def _answer(self, result, sources: Sequence[str], url: str) -> list[Detection]:
        """An ``InferResult`` -> Detections (:func:`plan.parse_response`), image errors counted once."""
        arrays = {n: result.as_numpy(n) for n in self._meta["outputs"]}
        dets = plan.parse_response(arrays, sources, self._meta, self.threshold, url)
        self._count_images(dets)
        return dets

    def _record_health(self, checks: Iterable[tuple[bool, str]]) -> dict[str, bool]:
        """Per URL (in order) ``(healthy, why not)`` -> ``{url: healthy}``, each fed to the replica's breaker."""
        out = {}
        for url, (ok, why) in zip(self.urls, checks):
            self.pool.record_health(url, ok, None if ok else ServerUnavailableError(f"{url}: {why}", None, url))
            out[url] = ok
        return out

    # ------------------------------------------------------------------------------------------ step generators
    def _call_steps(self, fn: Callable, what: str, timeout: float | None = None, balance: bool = True,
                    parse: Callable | None = None) -> Steps:
        """Call ``fn(client, url, remaining_seconds)`` on the replicas the routing picks until one answers, then
        ``parse(answer, url)`` (a failure there fails the attempt); ``balance=False``: a control call, which does
        not move the round robin. Raises the routing's typed error when the call gives up."""
        att = self._attempts(what, timeout, balance)
        while True:
            step = att.next()
            if step.kind == "sleep":
                yield partial(self._sleep, step.seconds)
                continue
            if step.kind == "raise":
                self._count(att, step.error)
                raise step.error
            url = step.lease.url
            try:
                out = yield partial(fn, self._client(url, fresh=step.lease.probe), url, step.remaining)
                out = out if parse is None else parse(out, url)
            except GeneratorExit:  # the caller stopped (cancelled, interrupted): nobody to blame
                self.pool.release(step.lease, "neutral")
                raise
            except Exception as e:  # tritonclient raises InferenceServerException; grpc may raise its own
                att.failed(step.lease, classify_error(e, url))
                continue
            att.succeeded(step.lease)
            self._count(att)
            return out

    def _metadata_steps(self, timeout: float | None = None) -> Steps:
        """:meth:`GladClient.metadata`, fetched once (within ``timeout``, default the client's)."""
        if self._meta is None:
            cfg = yield from self._call_steps(
                lambda c, u, t: c.get_model_config(self.model_name, as_json=True, client_timeout=t),
                f"{self.model_name} config", timeout, balance=False)
            self._meta = self._parse_config(cfg["config"])
        return self._meta

    def _health_steps(self, url: str) -> Steps:
        """``(healthy, why not)`` of one replica (:meth:`GladClient.health`); never raises."""
        t = self.timeout
        try:
            c = self._client(url)
            if not (yield partial(c.is_server_live, client_timeout=t)):
                return False, "server not live"
            if not (yield partial(c.is_model_ready, self.model_name, client_timeout=t)):
                return False, f"not ready: {self.model_name}"
            cfg = (yield partial(c.get_model_config, self.model_name, as_json=True, client_timeout=t))["config"]
            down = []
            for n, v in plan.network_models(cfg, self.model_prefix):
                try:
                    ready = yield partial(c.is_model_ready, n, v, client_timeout=t)
                except Exception:  # an unknown model may be an error rather than False
                    ready = False
                if not ready:
                    down.append((n, v))
            index = yield partial(c.get_model_repository_index, as_json=True, client_timeout=t)
            return plan.health_verdict(down, index, self.model_prefix)
        except Exception as e:
            self._forget(url)
            return False, str(classify_error(e, url))

    def _model_ready_steps(self, graph: str) -> Steps:
        """:meth:`GladClient.model_ready`: some replica has ``<prefix>_<graph>`` ready."""
        name = protocol.model_name(self.model_prefix, graph)
        for url in self.urls:
            try:
                if (yield partial(self._client(url).is_model_ready, name, client_timeout=self.timeout)):
                    return True
            except Exception:
                self._forget(url)
        return False

    def _infer_steps(self, req: plan.Request, deadline: float) -> Steps:
        """One planned request to ``<prefix>_glad`` (routed, retried until ``deadline``) -> its Detections."""
        module = importlib.import_module(self._grpc_module)

        def call(c, url, remaining):
            inp = module.InferInput(req.input, list(req.array.shape), req.datatype)
            inp.set_data_from_numpy(req.array)
            return c.infer(self.model_name, [inp], outputs=[module.InferRequestedOutput(n) for n in req.outputs],
                           parameters=dict(req.parameters), **plan.deadline_kwargs(remaining))
        return (yield from self._call_steps(call, f"{self.model_name} infer", deadline - self.pool.clock(),
                                            parse=lambda result, url: self._answer(result, req.sources, url)))

    def _detect_steps(self, images: Iterable[Any], timeout: float | None) -> Steps:
        """:meth:`GladClient.detect`: the metadata if not known yet, then the :class:`plan.DetectPlan`'s requests,
        all within one deadline."""
        deadline = self.pool.clock() + (self.timeout if timeout is None else float(timeout))
        job = plan.DetectPlan(images, (yield from self._metadata_steps(deadline - self.pool.clock())))
        while (req := job.next()) is not None:
            try:
                got = yield from self._infer_steps(req, deadline)
            except BadInputError as e:
                got = e
            job.answer(got)
        return job.results
