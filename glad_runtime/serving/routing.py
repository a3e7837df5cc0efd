"""Routing of client requests over several GLAD replicas: error classification, balancing, circuit breakers and the
retry loop of one call (issue 16). Pure Python (no ``tritonclient``, no gRPC at module level), so every rule is
unit-tested with a fake clock; :mod:`glad_runtime.serving.client` drives it for both the sync and asyncio clients.

**Classification** (:func:`classify`, :func:`classify_error`): a failed attempt is

* *replica-local and retryable* (``retryable=True``): gRPC ``UNAVAILABLE`` (connection refused or lost, server not
  ready, shutting down, ``[UNAVAILABLE] in-flight pool full``: back-pressure), ``CANCELLED`` (a draining server),
  the model unknown / not found / not ready / "has no available versions" on that replica, ``INTERNAL`` whose
  message says "not ready", "not found" or "no available versions" (a BLS sub-request to an unloaded network
  model) or "stub process ... not healthy". A detection is pure, so the request is resent;
* *final* (``retryable=False``): ``INVALID_ARGUMENT`` (:class:`BadInputError`: the request itself is refused), a
  malformed request that Triton's own request parser answers with ``INTERNAL`` / HTTP 500 (its message names the
  parse failure: "failed to parse the request JSON buffer", "Unable to parse 'data'", "Shape does not match true
  shape", "unexpected shape for input", "byte size mismatch", "expected ... got" for an input, "attempt to access
  JSON ...": :class:`BadInputError`), an HTTP 4xx answer (400: :class:`BadInputError`; 404 is a missing model and
  408 a deadline, 429 is back-pressure and retryable), a deadline (``DEADLINE_EXCEEDED`` on the client, or the
  server's ``UNAVAILABLE`` "deadline exceeded: request timeout expired" / Triton's queue "Request timeout expired":
  the caller's budget is spent, :class:`DeadlineExceededError`), and any other server error (:class:`ServingError`).

**Balancing** (:class:`Pool`): each attempt goes to the available replica with the fewest outstanding requests of
this client; ties go round robin. A replica whose breaker is half-open gets the next request as its single probe.

**Circuit breaker** per replica: *closed* -> a replica-local failure (``failure_threshold`` in a row) -> *open* for
``cooldown`` seconds (no traffic) -> *half-open*: one probe (a request, or :meth:`Pool.record_health`) -> success
closes it, failure opens it again for another ``cooldown``. Results of requests sent before the breaker opened do
not close it.

**Retry loop of one call** (:class:`Attempts`): the call has one deadline (``timeout`` seconds); every attempt is
sent with the remaining budget. After a retryable failure the next untried available replica is tried at once
(failover); once every replica failed in a round, the loop sleeps ``backoff * 2**round`` (capped at ``max_backoff``)
with jitter (uniformly in the upper half of that delay) and starts another round, **until the deadline** (``retries``
None, the default; an int caps the extra rounds, the behaviour before issue 27). A sleep never reaches past the
deadline: the last one is shortened so that ``min_attempt`` seconds are left for one more attempt, and with less
than that left the loop gives up. When every replica is ejected it waits for the first cool-down to end, if that
comes before the deadline. A final (non-retryable) failure ends the call at once: it is never resent, to this
replica or another. The loop gives up with a typed error only after every replica failed (or the deadline left no
time): the common class of the replicas' last errors (:class:`ModelNotFoundError` when every replica lacks the
model, :class:`ServerUnavailableError` when none answered or the replicas disagree).
"""

from __future__ import annotations

import random
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from glad_runtime.errors import (BadInputError, DeadlineExceededError, ModelNotFoundError, ServerUnavailableError,
                                 ServingError, UsageError)

__all__ = ["classify", "classify_error", "error_for", "is_retryable", "is_malformed", "backoff_delay", "Pool", "Lease",
           "Attempts", "Step", "CLOSED", "OPEN", "HALF_OPEN"]

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half-open"


# ---------------------------------------------------------------------------------------------- classification
_DEADLINE = ("deadline exceeded", "request timeout expired", "deadline_exceeded")
_MODEL_MISSING = ("unknown model", "is not found", "has no available versions", "no available versions",
                  "model is not ready", "not ready")
_CONNECTION = ("failed to connect", "connection refused", "socket closed", "connection reset", "broken pipe",
               "shutting down", "server not ready", "server is not ready", "closed channel", "goaway",
               "stub process", "not healthy", "connection aborted", "transport closing", "end of tcp stream")
#: A malformed request as Triton's own request parser words it. Its JSON reader (``TritonJson``) reports errors as
#: INTERNAL, so they arrive as HTTP 500 / gRPC INTERNAL although the request is at fault: never retry them.
_MALFORMED = ("failed to parse the request json", "unable to parse", "shape does not match true shape",
              "unexpected shape for input", "byte size mismatch", "attempt to access json",
              "unexpected size for request json", "unexpected additional input data", "json parsing only")
#: "... for input 'images' ... Expected [-1, 3, 64, 64], got [1, 3, 32, 32]", "expected 1 inputs but got 2 inputs"
#: (read only in a message that names an input).
_EXPECTED_GOT = re.compile(r"\bexpected\b.*\bgot\b", re.S)
#: A failure inside the server (a BLS sub-request, the python stub) that quotes another model's message: never
#: read as the caller's malformed request.
_SERVER_SIDE = ("engineerror", "stub process", "failed to process the request(s) for model instance")
#: HTTP status codes (tritonclient.http puts them in ``status()``) -> the gRPC status names Triton maps them from.
_HTTP_STATUS = {400: "INVALID_ARGUMENT", 404: "NOT_FOUND", 408: "DEADLINE_EXCEEDED", 413: "INVALID_ARGUMENT",
                422: "INVALID_ARGUMENT", 429: "UNAVAILABLE", 500: "INTERNAL", 501: "UNIMPLEMENTED",
                502: "UNAVAILABLE", 503: "UNAVAILABLE", 504: "UNAVAILABLE"}


def _status_name(status: str | None) -> str | None:
    """``"StatusCode.UNAVAILABLE"`` -> ``"UNAVAILABLE"``; an HTTP code (``"400"``) -> the gRPC status Triton maps to
    it (:data:`_HTTP_STATUS`; another 4xx: ``"FAILED_PRECONDITION"``, another 5xx: ``"INTERNAL"``)."""
    status = (status or "").replace("StatusCode.", "").strip().upper() or None
    if status is not None and status.isdigit():
        code = int(status)
        status = _HTTP_STATUS.get(code) or ("FAILED_PRECONDITION" if 400 <= code < 500 else
                                            "INTERNAL" if code >= 500 else None)
    return status


def is_malformed(message: str) -> bool:
    """Whether a server message says the request could not be parsed (:data:`_MALFORMED`), and not a failure inside
    the server quoting another model's error."""
    low = (message or "").lower()
    if any(s in low for s in _SERVER_SIDE):
        return False
    return any(s in low for s in _MALFORMED) or ("input" in low and bool(_EXPECTED_GOT.search(low)))


def classify(status: str | None, message: str) -> tuple[type[ServingError], bool]:
    """``(error class, retryable)`` of a failed call from its gRPC status name (or HTTP code) and message.

    Args:
        status: ``"UNAVAILABLE"``, ``"StatusCode.UNAVAILABLE"``, ``"INTERNAL"``, an HTTP code (``"400"``,
            ``"500"``, ...) or None.
        message: the server's (or gRPC's) message.
    Returns:
        the :mod:`glad_runtime.errors` class to raise, and whether another attempt may answer (replica-local or
        transient).
    """
    status = _status_name(status)
    low = (message or "").lower()
    if status in ("INVALID_ARGUMENT", "INVALID_ARG"):
        return BadInputError, False  # also HTTP 400: Triton's INVALID_ARG (and UNKNOWN, CANCELLED): never retried
    if status in (None, "INTERNAL", "UNKNOWN") and is_malformed(message):
        return BadInputError, False  # Triton's request parser: INTERNAL / HTTP 500, but the request's fault
    if status == "DEADLINE_EXCEEDED" or any(s in low for s in _DEADLINE):
        return DeadlineExceededError, False  # the caller's budget is spent (client side or server side)
    if status == "FAILED_PRECONDITION":
        return ServingError, False  # an HTTP 4xx other than the above (auth, method, ...): the request as sent
    if status == "CANCELLED":
        return ServerUnavailableError, True  # a draining server cancels in-flight calls
    if any(s in low for s in _CONNECTION):  # the replica (or its python-backend stub) is down or going down
        return ServerUnavailableError, True
    if status == "NOT_FOUND" or any(s in low for s in _MODEL_MISSING):
        return ModelNotFoundError, True  # missing / unloaded / loading on this replica (also a BLS sub-request)
    if status == "UNAVAILABLE":
        return ServerUnavailableError, True
    return ServingError, False


def classify_error(exc: BaseException, url: str | None = None) -> ServingError:
    """A typed :class:`ServingError` for an exception of a client call, with ``retryable`` set (never raises).

    Args:
        exc: ``tritonclient.utils.InferenceServerException`` (duck-typed: ``status()`` / ``message()``), a gRPC
            error, or any exception; a :class:`ServingError` is returned as it is.
        url: the replica's URL, prefixed to the message and kept as ``url``.
    """
    if isinstance(exc, ServingError):
        if not hasattr(exc, "retryable"):
            exc.retryable = is_retryable(exc)
        return exc
    status = exc.status() if callable(getattr(exc, "status", None)) else None
    if status is None and callable(getattr(exc, "code", None)):  # a bare grpc.RpcError
        try:
            status = str(exc.code())
        except Exception:
            status = None
    msg = exc.message() if callable(getattr(exc, "message", None)) else None
    if msg is None and callable(getattr(exc, "details", None)):
        try:
            msg = exc.details()
        except Exception:
            msg = None
    msg = str(msg if msg is not None else exc)
    status = (str(status).replace("StatusCode.", "") if status else None) or None
    err = error_for(status, msg, url)
    err.__cause__ = exc if isinstance(exc, Exception) else None
    return err


def error_for(status: str | None, message: str, url: str | None = None) -> ServingError:
    """The typed :class:`ServingError` (:func:`classify`) for a failure's status name and message, ``retryable``
    set, the message prefixed with ``url``. Used for exceptions (:func:`classify_error`) and for the error text of
    a gRPC stream response (``GladClient.stream``)."""
    cls, retryable = classify(status, message)
    err = cls(f"{url}: {message}" if url else message, status, url)
    err.retryable = retryable
    return err


def is_retryable(err: BaseException) -> bool:
    """Whether another replica may answer: the ``retryable`` flag :func:`classify_error` set, else by class."""
    flag = getattr(err, "retryable", None)
    if flag is not None:
        return bool(flag)
    return isinstance(err, (ServerUnavailableError, ModelNotFoundError))


def backoff_delay(round_: int, base: float, cap: float, rng: Callable[[], float] = random.random) -> float:
    """Sleep before retry round ``round_ + 1``: ``d = min(cap, base * 2**round_)``, jittered uniformly in
    ``[d/2, d]`` (spreads the retries of many clients; never longer than ``d``)."""
    d = max(0.0, min(cap, base * (2 ** max(0, round_))))
    return d * (0.5 + 0.5 * rng())


# ---------------------------------------------------------------------------------------------- pool
@dataclass
class _Replica:
    url: str
    index: int
    outstanding: int = 0
    state: str = CLOSED  # CLOSED or OPEN (HALF_OPEN is OPEN past open_until)
    open_until: float = 0.0
    opened_at: float = -1.0
    probing: bool = False
    consecutive_failures: int = 0
    requests: int = 0
    successes: int = 0
    failures: int = 0
    ejections: int = 0
    probes: int = 0
    last_error: BaseException | None = None
    generation: int = 0  # bumped when the breaker opens: results of older requests do not close it


@dataclass(frozen=True)
class Lease:
    """One attempt on one replica (from :meth:`Pool.acquire`); give it back with :meth:`Pool.release`."""

    url: str
    index: int
    probe: bool
    generation: int


class Pool:
    """The replicas of one client: least-outstanding balancing (ties round robin) and a circuit breaker each.

    Thread-safe (one lock; no call blocks while holding it), so one pool serves many threads or an event loop.

    Args:
        urls: the replicas (``host:port``), in the caller's preference order (the round-robin start).
        cooldown: seconds a failed replica is ejected before a probe may go to it.
        failure_threshold: consecutive replica-local failures that open a closed breaker (1: the first).
        clock: monotonic seconds (a fake in the tests).
    """

    def __init__(self, urls: Sequence[str], *, cooldown: float = 1.0, failure_threshold: int = 1,
                 clock: Callable[[], float] = time.monotonic):
        if not urls:
            raise UsageError("at least one replica URL is needed")
        self.replicas = [_Replica(u, i) for i, u in enumerate(urls)]
        self.cooldown, self.failure_threshold = float(cooldown), max(1, int(failure_threshold))
        self.clock = clock
        self._rr = 0
        self._lock = threading.Lock()

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def _state(self, r: _Replica, now: float) -> str:
        if r.state == OPEN and now >= r.open_until:
            return HALF_OPEN
        return r.state

    def state(self, url: str) -> str:
        """``closed``, ``open`` or ``half-open`` (open with its cool-down over) of ``url``."""
        with self._lock:
            return self._state(self._find(url), self.clock())

    def _find(self, url: str) -> _Replica:
        for r in self.replicas:
            if r.url == url:
                return r
        raise KeyError(url)

    def acquire(self, exclude: Iterable[str] = (), advance: bool = True) -> Lease | None:
        """The replica for the next attempt, or None when none is available now.

        A half-open replica with no probe in flight is chosen first (its probe); otherwise the closed replica with
        the fewest outstanding requests, ties broken round robin. Replicas in ``exclude`` (the ones this call
        already tried in its current round) are skipped. ``advance=False`` (control calls such as fetching the
        model config) leaves the round-robin position where it is, so they do not shift the balancing of
        inference requests.
        """
        skip = set(exclude)
        with self._lock:
            now = self.clock()
            n = len(self.replicas)
            order = [self.replicas[(self._rr + k) % n] for k in range(n)]
            order = [r for r in order if r.url not in skip]
            pick, probe = None, False
            for r in order:
                if self._state(r, now) == HALF_OPEN and not r.probing:
                    pick, probe = r, True
                    break
            if pick is None:
                closed = [r for r in order if r.state == CLOSED]
                if closed:
                    pick = min(closed, key=lambda r: r.outstanding)  # first of the minimum in round-robin order
            if pick is None:
                return None
            if advance:
                self._rr = (pick.index + 1) % n
            pick.outstanding += 1
            pick.requests += 1
            if probe:
                pick.probing = True
                pick.probes += 1
            return Lease(pick.url, pick.index, probe, pick.generation)

    def release(self, lease: Lease, outcome: str, error: BaseException | None = None) -> None:
        """Give back an attempt: ``outcome`` ``"ok"`` (answered), ``"fail"`` (replica-local failure: counts
        towards opening the breaker) or ``"neutral"`` (the request's own fault or its deadline: the replica is
        not blamed; an inconclusive probe frees the probe slot)."""
        with self._lock:
            now = self.clock()
            r = self.replicas[lease.index]
            r.outstanding = max(0, r.outstanding - 1)
            if lease.probe:
                r.probing = False
            if outcome == "ok":
                r.successes += 1
                if lease.probe or (r.state == CLOSED):
                    r.state, r.consecutive_failures = CLOSED, 0
                # a success of a request sent before the breaker opened says nothing about the replica now
            elif outcome == "fail":
                r.failures += 1
                r.last_error = error
                if lease.probe:
                    self._open(r, now)
                elif r.state == CLOSED:
                    r.consecutive_failures += 1
                    if r.consecutive_failures >= self.failure_threshold:
                        self._open(r, now)
                # a failure of a request sent before the breaker opened changes nothing more

    def _open(self, r: _Replica, now: float) -> None:
        r.state, r.open_until, r.opened_at = OPEN, now + self.cooldown, now
        r.consecutive_failures = 0
        r.ejections += 1
        r.generation += 1

    def record_health(self, url: str, ok: bool, error: BaseException | None = None) -> None:
        """A health probe's result: ready closes the breaker (the replica gets traffic again), not ready opens it
        for a cool-down (unless already open)."""
        with self._lock:
            r = self._find(url)
            if ok:
                r.state, r.consecutive_failures = CLOSED, 0
            elif r.state == CLOSED:
                r.last_error = error
                self._open(r, self.clock())

    def wait_hint(self, exclude: Iterable[str] = ()) -> float | None:
        """Seconds until some replica not in ``exclude`` can take a request (0: now), None when that depends on a
        probe in flight (its result is not known yet) or every replica is excluded."""
        skip = set(exclude)
        with self._lock:
            now = self.clock()
            waits = []
            for r in self.replicas:
                if r.url in skip:
                    continue
                st = self._state(r, now)
                if st == CLOSED or (st == HALF_OPEN and not r.probing):
                    return 0.0
                if st == OPEN:
                    waits.append(r.open_until - now)
            return min(waits) if waits else None

    def last_errors(self) -> dict[str, BaseException]:
        with self._lock:
            return {r.url: r.last_error for r in self.replicas if r.last_error is not None}

    def snapshot(self) -> dict[str, dict]:
        """Per URL: ``state``, ``outstanding``, ``requests``, ``successes``, ``failures``, ``ejections``,
        ``probes``."""
        with self._lock:
            now = self.clock()
            return {r.url: {"state": self._state(r, now), "outstanding": r.outstanding, "requests": r.requests,
                            "successes": r.successes, "failures": r.failures, "ejections": r.ejections,
                            "probes": r.probes} for r in self.replicas}


# ---------------------------------------------------------------------------------------------- one call
@dataclass(frozen=True)
class Step:
    """What the caller does next: ``"try"`` ``lease`` with ``remaining`` seconds, ``"sleep"`` ``seconds``, or
    ``"raise"`` ``error``."""

    kind: str
    lease: Lease | None = None
    remaining: float = 0.0
    seconds: float = 0.0
    error: BaseException | None = None


@dataclass
class Attempts:
    """The retry loop of one call as a state machine (the same for the sync and asyncio clients)::

        att = Attempts(pool, timeout=10)
        while True:
            step = att.next()
            if step.kind == "sleep": sleep(step.seconds); continue
            if step.kind == "raise": raise step.error
            try: out = call(step.lease.url, step.remaining)
            except Exception as e: att.failed(step.lease, classify_error(e, step.lease.url)); continue
            att.succeeded(step.lease); return out

    Retryable failures are retried until the deadline (``retries=None``); a final one ends the call at once and is
    never resent. No sleep reaches past the deadline (see the module docstring).

    Args:
        pool: the client's :class:`Pool`.
        timeout: the call's budget in seconds (its deadline is ``clock() + timeout`` at construction).
        retries: None (default): rounds over the replicas go on until the deadline. An int caps the extra rounds
            after every replica failed once (0: one round), the rule before issue 27, for callers that want to
            give up sooner than their deadline.
        backoff, max_backoff: base and cap of the sleep between rounds (:func:`backoff_delay`).
        what: the call, for messages (``"tiny_line_glad infer"``).
        rng: uniform [0, 1) for the jitter.
        min_wait: shortest sleep while waiting for a probe in flight elsewhere.
        balance: advance the pool's round robin (inference requests); False for control calls.
        min_attempt: the least budget worth one more attempt after a sleep: the last backoff is shortened to
            leave this much before the deadline, and with less left the loop gives up instead of sleeping.
    """

    pool: Pool
    timeout: float
    retries: int | None = None
    backoff: float = 0.2
    max_backoff: float = 5.0
    what: str = "request"
    rng: Callable[[], float] = random.random
    min_wait: float = 0.02
    balance: bool = True
    min_attempt: float = 0.1
    deadline: float = field(init=False)
    attempts: int = field(default=0, init=False)
    round: int = field(default=0, init=False)
    errors: list = field(default_factory=list, init=False)  # (url, error) of every failed attempt
    _tried: set = field(default_factory=set, init=False)
    _final: BaseException | None = field(default=None, init=False)
    _backoff_due: bool = field(default=False, init=False)
    _waited: bool = field(default=False, init=False)  # waited for ejected replicas (blamed by other calls)

    def __post_init__(self):
        self.deadline = self.pool.clock() + float(self.timeout)

    @property
    def retried(self) -> int:
        """Attempts beyond the first."""
        return max(0, self.attempts - 1)

    def remaining(self) -> float:
        return self.deadline - self.pool.clock()

    def next(self) -> Step:
        """The next step of the loop (see the class docstring)."""
        if self._final is not None:
            return Step("raise", error=self._final)
        while True:
            remaining = self.remaining()
            if remaining <= 0:
                return Step("raise", error=self._give_up(deadline=True))
            if self._backoff_due:
                self._backoff_due = False
                self.round += 1
                self._tried.clear()
                if self.retries is not None and self.round > self.retries:
                    return Step("raise", error=self._give_up())
                spare = remaining - self.min_attempt  # what a sleep may take and still leave one attempt
                if spare < 1e-3:  # (the last, shortened sleep is over: no time for another)
                    return Step("raise", error=self._give_up(deadline=True))
                delay = backoff_delay(self.round - 1, self.backoff, self.max_backoff, self.rng)
                return Step("sleep", seconds=min(delay, spare))
            lease = self.pool.acquire(exclude=self._tried, advance=self.balance)
            if lease is not None:
                self.attempts += 1
                return Step("try", lease=lease, remaining=remaining)
            if self._tried:  # every available replica failed in this round
                self._backoff_due = True
                continue
            # nothing tried this round and every replica is ejected (by this call or others): wait for one
            hint = self.pool.wait_hint()
            wait = max(self.min_wait, hint if hint is not None else
                       backoff_delay(0, self.backoff, self.max_backoff, self.rng))
            self._waited = True
            if wait > remaining - self.min_attempt:  # no replica can take it with time left for an attempt
                return Step("raise", error=self._give_up(deadline=True))
            return Step("sleep", seconds=wait)

    def succeeded(self, lease: Lease) -> None:
        self.pool.release(lease, "ok")

    def failed(self, lease: Lease, err: BaseException) -> None:
        """Record a failed attempt: a retryable error blames the replica (breaker) and lets the loop go on; any
        other (the request's own fault, its deadline, a server error) ends the call with ``err`` at the next
        :meth:`next`: it is not resent to any replica."""
        self.errors.append((lease.url, err))
        if is_retryable(err):
            self.pool.release(lease, "fail", err)
            self._tried.add(lease.url)
        else:
            self.pool.release(lease, "neutral", err)
            self._final = err

    def _give_up(self, deadline: bool = False) -> ServingError:
        """The typed error once no replica can answer: the common class of the replicas' last errors."""
        last: dict[str, BaseException] = {}
        for url, e in self.errors:
            last[url] = e
        if not last and self._waited:  # every replica was ejected by other calls' failures: their errors
            last = self.pool.last_errors()
        classes = {type(e) for e in last.values()}
        why = (f"the deadline ({self.timeout:.3g} s) passed" if deadline or self.retries is None else
               f"{self.retries + 1} rounds over the replicas")
        detail = "; ".join(str(e) for e in last.values()) or "no attempt could be made in time"
        msg = f"{self.what}: no replica answered ({self.attempts} attempts, {why}): {detail}"
        if not last:
            cls = DeadlineExceededError if deadline else ServerUnavailableError
        elif len(classes) == 1 and issubclass(next(iter(classes)), ServingError):
            cls = next(iter(classes))
        else:
            cls = ServerUnavailableError
        lasterr = list(last.values())[-1] if last else None
        err = cls(msg, getattr(lasterr, "status", None), getattr(lasterr, "url", None))
        err.retryable = False
        err.__cause__ = lasterr
        self._final = err
        return err
