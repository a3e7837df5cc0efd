"""Client routing without a server (issues 16 and 27): error classification of the messages replicas really send
(Triton's parser 500s for a malformed request and HTTP codes included: final, never retried), least-outstanding
balancing with round-robin ties, the circuit breaker on a fake clock, backoff with jitter, retries until the deadline
(a restarting replica, back-pressure) with no sleep past it and none after a final error, and the retry loop of
GladClient / AsyncGladClient over fake replicas (16 threads, exactly one answer per image). Fast: no tritonserver,
no network."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import numpy as np
import pytest

from glad_runtime.errors import (BadInputError, DeadlineExceededError, ModelNotFoundError, ServerUnavailableError,
                                 ServingError)
from glad_runtime.serving import routing
from glad_runtime.serving.routing import CLOSED, HALF_OPEN, OPEN, Attempts, Pool, backoff_delay, classify_error

tritonutils = pytest.importorskip("tritonclient.utils")
ISE = tritonutils.InferenceServerException


class Clock:
    """A fake monotonic clock: ``sleep`` advances it."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t

    def sleep(self, s: float) -> None:
        assert s >= 0
        self.t += s


# ---------------------------------------------------------------------------------------------- classification
CASES = [
    # (status, message, class, retryable)
    ("StatusCode.UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:127.0.0.1:1: "
     "Failed to connect to remote host: Connection refused", ServerUnavailableError, True),
    ("StatusCode.UNAVAILABLE", "Socket closed", ServerUnavailableError, True),
    ("StatusCode.UNAVAILABLE", "Server is shutting down", ServerUnavailableError, True),
    ("StatusCode.INTERNAL", "EngineError: triton: tiny_line_unet: Server not ready", ServerUnavailableError, True),
    ("StatusCode.CANCELLED", "request cancelled by the client", ServerUnavailableError, True),
    ("StatusCode.CANCELLED", "Locally cancelled by application!", ServerUnavailableError, True),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'tiny_line_glad' has no available versions",
     ModelNotFoundError, True),
    ("StatusCode.NOT_FOUND", "Request for unknown model: 'tiny_line_glad' is not found", ModelNotFoundError, True),
    ("StatusCode.UNAVAILABLE", "Request for unknown model: 'tiny_line_glad' is not found", ModelNotFoundError,
     True),
    ("StatusCode.UNAVAILABLE", "model 'tiny_line_glad' is not ready", ModelNotFoundError, True),
    ("StatusCode.INTERNAL", "EngineError: tiny_line_unet: Failed for execute the inference request. Model "
     "'tiny_line_unet' is not ready.", ModelNotFoundError, True),
    ("StatusCode.INTERNAL", "EngineError: Request for unknown model: 'tiny_line_unet' has no available versions",
     ModelNotFoundError, True),
    ("StatusCode.INTERNAL", "Failed to process the request(s) for model instance 'tiny_line_glad_0_0', message: "
     "Stub process 'tiny_line_glad_0_0' is not healthy.", ServerUnavailableError, True),
    ("StatusCode.UNAVAILABLE", "deadline exceeded: request timeout expired (1.000 s); stopped before DDIM step 3/5",
     DeadlineExceededError, False),
    ("StatusCode.UNAVAILABLE", "Request timeout expired", DeadlineExceededError, False),
    ("StatusCode.DEADLINE_EXCEEDED", "Deadline Exceeded", DeadlineExceededError, False),
    ("StatusCode.INVALID_ARGUMENT", "image_files[1]: not a readable image", BadInputError, False),
    ("StatusCode.INVALID_ARGUMENT", "[request id: <id_unknown>] unexpected inference input 'x'", BadInputError,
     False),
    ("StatusCode.INTERNAL", "EngineError: tiny_line_unet returned NaN", ServingError, False),
    ("StatusCode.UNAVAILABLE", "some other unavailability", ServerUnavailableError, True),
]


@pytest.mark.parametrize("status,message,cls,retryable", CASES, ids=[c[1][:40] for c in CASES])
def test_classification_of_replica_messages(status, message, cls, retryable):
    err = classify_error(ISE(message, status=status), "h:1")
    assert type(err) is cls, err
    assert err.retryable is retryable and routing.is_retryable(err) is retryable
    assert err.url == "h:1" and str(err).startswith("h:1: ") and message in str(err)
    assert err.status == status.replace("StatusCode.", "")


def test_classification_of_other_exceptions():
    from glad_runtime.serving.client import classify_error as client_classify

    closed = classify_error(ValueError("Cannot invoke RPC on closed channel!"))
    assert isinstance(closed, ServerUnavailableError) and closed.retryable
    other = classify_error(RuntimeError("boom"))
    assert type(other) is ServingError and not other.retryable
    typed = ModelNotFoundError("x")
    assert client_classify(typed) is typed and typed.retryable  # a typed error keeps its class; flag by class
    assert client_classify(ISE("x", status="StatusCode.UNAVAILABLE")).retryable


#: Malformed requests as Triton's own request parser words them: INTERNAL (HTTP 500; its JSON reader reports every
#: error as INTERNAL) although the request is at fault, so never retried. (status, message)
MALFORMED = [
    ("500", "failed to parse the request JSON buffer: Invalid value. at 0"),
    ("500", "failed to parse the request JSON buffer: The document is empty. at 0"),
    ("500", "Unable to parse 'data': Shape does not match true shape of 'data' field"),
    ("500", "Unable to parse 'binary_data_size': attempt to access JSON non-unsigned-integer as unsigned-integer"),
    ("500", "Unable to parse JSON bytes array"),
    ("StatusCode.INTERNAL", "[request id: <id_unknown>] unexpected shape for input 'images' for model "
     "'tiny_line_glad'. Expected [-1,3,128,128], got [1,3,64,64]. "),
    ("500", "input byte size mismatch for input 'images' for model 'tiny_line_glad'. Expected 196608, got 100"),
    ("500", "expected 1 inputs but got 2 inputs for model 'tiny_line_glad'"),
    (None, "failed to parse the request JSON buffer: Missing a name for object member. at 1"),
    ("StatusCode.UNKNOWN", "attempt to access JSON non-string as string"),
]


@pytest.mark.parametrize("status,message", MALFORMED, ids=[m[1][:40] for m in MALFORMED])
def test_parser_500s_of_a_malformed_request_are_final(status, message):
    err = classify_error(ISE(message, status=status), "h:8000")
    assert type(err) is BadInputError and err.retryable is False and not routing.is_retryable(err)
    assert routing.is_malformed(message)
    # the retry loop sends it once and blames nobody
    clock = Clock()
    pool = Pool(["a", "b"], clock=clock)
    out, seen, sleeps = _drive(Attempts(pool, timeout=30.0), clock,
                               lambda u, r: (_ for _ in ()).throw(ISE(message, status=status)))
    assert type(out) is BadInputError and len(seen) == 1 and not sleeps
    assert {v["state"] for v in pool.snapshot().values()} == {CLOSED}


HTTP = [
    # (HTTP status, message, class, retryable): Triton's HttpCodeFromError (400 = INVALID_ARG, UNKNOWN, CANCELLED)
    ("400", "image_files[1]: not a readable image", BadInputError, False),
    ("400", "in-flight requests cancelled", BadInputError, False),  # 400-class: never retried
    ("413", "request entity too large", BadInputError, False),
    ("401", "unauthorized", ServingError, False),
    ("404", "Request for unknown model: 'tiny_line_glad' is not found", ModelNotFoundError, True),
    ("408", "request timeout", DeadlineExceededError, False),
    ("429", "too many requests", ServerUnavailableError, True),
    ("503", "Server is shutting down", ServerUnavailableError, True),
    ("503", "Request timeout expired", DeadlineExceededError, False),
    ("500", "EngineError: tiny_line_unet returned NaN", ServingError, False),
    ("500", "EngineError: tiny_line_unet: Failed for execute the inference request. Model 'tiny_line_unet' is not "
     "ready.", ModelNotFoundError, True),
    ("501", "not implemented", ServingError, False),
]


@pytest.mark.parametrize("status,message,cls,retryable", HTTP, ids=[f"{h[0]}-{h[1][:30]}" for h in HTTP])
def test_http_status_codes(status, message, cls, retryable):
    err = classify_error(ISE(message, status=status), "h:8000")
    assert type(err) is cls and err.retryable is retryable and err.status == status


def test_server_side_errors_quoting_a_shape_are_not_the_callers():
    """A BLS sub-request's error quoting a network model's shape check, or a crashed stub, is the server's: it
    keeps its own class (not BadInputError)."""
    quoted = "EngineError: tiny_line_unet: unexpected shape for input 'sample' for model 'tiny_line_unet'. " \
             "Expected [-1,4,16,16], got [2,4,8,8]"
    assert not routing.is_malformed(quoted)
    err = classify_error(ISE(quoted, status="StatusCode.INTERNAL"))
    assert type(err) is ServingError and not err.retryable
    stub = "Failed to process the request(s) for model instance 'x_glad_0_0', message: Stub process 'x' is not " \
           "healthy. Unable to parse the request."
    assert type(classify_error(ISE(stub, status="StatusCode.INTERNAL"))) is ServerUnavailableError


# ---------------------------------------------------------------------------------------------- balancing
def test_round_robin_over_idle_replicas_and_least_outstanding_exactly():
    pool = Pool(["a", "b", "c"], clock=Clock())
    seq = []
    for _ in range(6):  # released at once: every replica idle each time, so strict round robin
        lease = pool.acquire()
        seq.append(lease.url)
        pool.release(lease, "ok")
    assert seq == ["a", "b", "c", "a", "b", "c"]
    held = [pool.acquire(), pool.acquire()]  # a, b busy
    assert [h.url for h in held] == ["a", "b"]
    assert pool.acquire().url == "c"  # the only idle one
    leases = [pool.acquire() for _ in range(3)]  # all at 1: round robin again a, b, c
    assert [x.url for x in leases] == ["a", "b", "c"]
    pool.release(held[1], "ok")  # b at 1, a and c at 2
    assert pool.acquire().url == "b"
    assert pool.acquire(exclude={"a"}).url in ("b", "c")


def test_control_calls_do_not_move_the_round_robin():
    pool = Pool(["a", "b"], clock=Clock())
    for _ in range(3):
        pool.release(pool.acquire(advance=False), "ok")  # e.g. the model config: always the preferred replica
    seq = []
    for _ in range(4):
        lease = pool.acquire()
        seq.append(lease.url)
        pool.release(lease, "ok")
    assert seq == ["a", "b", "a", "b"]


def test_pool_is_thread_safe():
    pool = Pool([f"r{k}" for k in range(4)], clock=time.monotonic)
    per = {f"r{k}": 0 for k in range(4)}
    lock = threading.Lock()

    def work():
        for _ in range(500):
            lease = pool.acquire()
            with lock:
                per[lease.url] += 1
            pool.release(lease, "ok")

    threads = [threading.Thread(target=work) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = pool.snapshot()
    assert all(v["outstanding"] == 0 for v in snap.values())
    assert sum(v["requests"] for v in snap.values()) == 16 * 500 == sum(per.values())
    assert min(per.values()) > 1000  # spread, not all on one replica


# ---------------------------------------------------------------------------------------------- breaker
def test_breaker_closed_open_half_open_closed():
    clock = Clock()
    pool = Pool(["a", "b"], cooldown=2.0, clock=clock)
    a = pool.acquire()
    assert a.url == "a"
    pool.release(a, "fail", ServerUnavailableError("down"))
    assert pool.state("a") == OPEN and pool.snapshot()["a"]["ejections"] == 1
    for _ in range(3):  # ejected: every request goes to b
        lease = pool.acquire()
        assert lease.url == "b"
        pool.release(lease, "ok")
    clock.sleep(1.99)
    assert pool.state("a") == OPEN and pool.wait_hint(exclude={"b"}) == pytest.approx(0.01)
    clock.sleep(0.02)
    assert pool.state("a") == HALF_OPEN
    probe = pool.acquire()
    assert probe.url == "a" and probe.probe  # the half-open replica gets the next request as its probe
    assert pool.acquire().url == "b"  # only one probe at a time
    assert pool.wait_hint(exclude={"b"}) is None  # depends on the probe in flight
    pool.release(probe, "fail", ServerUnavailableError("still down"))
    assert pool.state("a") == OPEN  # failed probe: another cool-down
    clock.sleep(2.0)
    probe = pool.acquire()
    assert probe.url == "a" and probe.probe
    pool.release(probe, "ok")
    assert pool.state("a") == CLOSED
    assert pool.snapshot()["a"]["probes"] == 2 and pool.snapshot()["a"]["ejections"] == 2


def test_breaker_ignores_stale_results_and_neutral_outcomes():
    clock = Clock()
    pool = Pool(["a"], cooldown=1.0, clock=clock)
    old1, old2, old3 = pool.acquire(), pool.acquire(), pool.acquire()  # three in flight on a
    pool.release(old1, "fail", ServerUnavailableError("x"))
    assert pool.state("a") == OPEN
    pool.release(old2, "ok")  # sent before the ejection: says nothing about a now
    assert pool.state("a") == OPEN
    pool.release(old3, "fail")  # stale failure: no second ejection, no longer cool-down
    assert pool.snapshot()["a"]["ejections"] == 1 and pool.wait_hint() == pytest.approx(1.0)
    assert pool.acquire() is None
    clock.sleep(1.0)
    probe = pool.acquire()
    pool.release(probe, "neutral")  # a bad request or its deadline: inconclusive, the slot is freed
    assert pool.state("a") == HALF_OPEN and pool.acquire().probe


def test_failure_threshold_and_health_probe():
    clock = Clock()
    pool = Pool(["a", "b"], cooldown=5.0, failure_threshold=2, clock=clock)
    pool.release(pool.acquire(exclude={"b"}), "fail")
    assert pool.state("a") == CLOSED  # one failure of two
    pool.release(pool.acquire(exclude={"b"}), "ok")  # a success resets the count
    pool.release(pool.acquire(exclude={"b"}), "fail")
    assert pool.state("a") == CLOSED
    pool.release(pool.acquire(exclude={"b"}), "fail")
    assert pool.state("a") == OPEN
    pool.record_health("a", True)  # a health probe that finds a ready closes it before the cool-down
    assert pool.state("a") == CLOSED
    pool.record_health("b", False, ServerUnavailableError("b: not ready: tiny_line_unet"))
    assert pool.state("b") == OPEN and "tiny_line_unet" in str(pool.last_errors()["b"])


# ---------------------------------------------------------------------------------------------- backoff, deadline
def test_backoff_exponential_with_jitter_and_cap():
    for k in range(8):
        d = min(5.0, 0.2 * 2 ** k)
        lo, hi = backoff_delay(k, 0.2, 5.0, rng=lambda: 0.0), backoff_delay(k, 0.2, 5.0, rng=lambda: 0.999999)
        assert lo == pytest.approx(d / 2) and hi == pytest.approx(d, rel=1e-5)
    rng = random.Random(0)
    draws = {round(backoff_delay(2, 0.2, 5.0, rng=rng.random), 6) for _ in range(50)}
    assert len(draws) > 40 and min(draws) >= 0.4 and max(draws) <= 0.8  # jittered in [d/2, d]


def _drive(att: Attempts, clock: Clock, outcome):
    """Run the loop of ``att``: ``outcome(url, remaining)`` returns a result or raises. Returns
    ``(result or raised error, [(url, remaining)], [sleeps])``."""
    tries, sleeps = [], []
    while True:
        step = att.next()
        if step.kind == "sleep":
            assert step.seconds < att.deadline - clock() + 1e-9, "slept past the deadline"
            sleeps.append(step.seconds)
            clock.sleep(step.seconds)
            continue
        if step.kind == "raise":
            return step.error, tries, sleeps
        tries.append((step.lease.url, step.remaining))
        try:
            out = outcome(step.lease.url, step.remaining)
        except Exception as e:
            att.failed(step.lease, classify_error(e, step.lease.url))
            continue
        att.succeeded(step.lease)
        return out, tries, sleeps


def test_failover_at_once_then_backoff_rounds_within_the_deadline():
    clock = Clock()
    pool = Pool(["a", "b"], cooldown=0.5, clock=clock)
    att = Attempts(pool, timeout=10.0, retries=3, backoff=0.2, max_backoff=5.0, rng=lambda: 0.5)
    calls = []

    def outcome(url, remaining):
        calls.append(url)
        clock.sleep(0.01)
        if len(calls) <= 4:
            raise ISE("Socket closed", status="StatusCode.UNAVAILABLE")
        return f"answer from {url}"
    out, seen, sleeps = _drive(att, clock, outcome)
    assert out.startswith("answer from") and att.attempts == 5 and att.retried == 4
    assert calls[:2] == ["a", "b"]  # failover to b at once
    remaining = [r for _, r in seen]
    assert remaining[0] == pytest.approx(10.0) and all(x > y for x, y in zip(remaining, remaining[1:]))
    assert sleeps[0] == pytest.approx(0.15)  # round 0 over: 0.2 * 2**0 jittered to 3/4 (rng 0.5)
    assert att.deadline - clock() > 0


def test_bad_input_and_deadline_are_not_retried():
    clock = Clock()
    pool = Pool(["a", "b"], clock=clock)
    for msg, status, cls in (("image_files[0]: not a readable image", "StatusCode.INVALID_ARGUMENT", BadInputError),
                             ("deadline exceeded: request timeout expired (2.000 s)", "StatusCode.UNAVAILABLE",
                              DeadlineExceededError)):
        att = Attempts(pool, timeout=5.0)
        err, seen, _ = _drive(att, clock, lambda u, r: (_ for _ in ()).throw(ISE(msg, status=status)))
        assert type(err) is cls and len(seen) == 1
        assert pool.state(seen[0][0]) == CLOSED  # the replica is not blamed
    assert all(v["outstanding"] == 0 for v in pool.snapshot().values())


def test_typed_error_only_after_every_replica_failed():
    clock = Clock()
    pool = Pool(["empty", "b"], cooldown=0.3, clock=clock)
    att = Attempts(pool, timeout=30.0, retries=2, backoff=0.05, what="tiny_line_glad infer")
    missing = ISE("Request for unknown model: 'tiny_line_glad' is not found", status="StatusCode.NOT_FOUND")
    err, seen, _ = _drive(att, clock, lambda u, r: (_ for _ in ()).throw(missing))
    assert type(err) is ModelNotFoundError and {u for u, _ in seen} == {"empty", "b"}
    assert len(seen) == 6 and "3 rounds" in str(err) and "tiny_line_glad infer" in str(err)
    # replicas failing differently: ServerUnavailableError naming both
    pool = Pool(["empty", "dead"], cooldown=0.3, clock=clock)
    att = Attempts(pool, timeout=30.0, retries=1, backoff=0.05)

    def mixed(url, remaining):
        if url == "empty":
            raise missing
        raise ISE("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    err, seen, _ = _drive(att, clock, mixed)
    assert type(err) is ServerUnavailableError and "empty" in str(err) and "dead" in str(err)
    # one replica healthy: no error at all
    pool = Pool(["empty", "good"], clock=clock)
    for _ in range(5):
        out, seen, _ = _drive(Attempts(pool, timeout=30.0), clock,
                              lambda u, r: "ok" if u == "good" else (_ for _ in ()).throw(missing))
        assert out == "ok"


def test_waits_for_ejected_replicas_but_never_past_the_deadline():
    clock = Clock()
    pool = Pool(["a"], cooldown=2.0, clock=clock)
    down = ISE("failed to connect to all addresses", status="StatusCode.UNAVAILABLE")
    start = clock()
    att = Attempts(pool, timeout=3.0, retries=10, backoff=0.05)
    err, seen, sleeps = _drive(att, clock, lambda u, r: (_ for _ in ()).throw(down))
    assert type(err) is ServerUnavailableError and "deadline" in str(err)
    assert clock() - start <= 3.0 and len(seen) == 2  # t=0, then the probe after the 2 s cool-down
    # a call that starts while the only replica is ejected by others: waits for the cool-down, then probes
    clock.sleep(0.5)
    hint = pool.wait_hint()
    assert 0 < hint < 2.0
    att = Attempts(pool, timeout=5.0)
    out, seen, sleeps = _drive(att, clock, lambda u, r: "back")
    assert out == "back" and sleeps == [pytest.approx(hint)] and pool.state("a") == CLOSED
    # no budget at all
    err = Attempts(pool, timeout=0.0).next().error
    assert type(err) is DeadlineExceededError
    # ejected and the cool-down ends after the deadline: give up now, with the replica's error
    pool.release(pool.acquire(), "fail", classify_error(down, "a"))
    err, seen, sleeps = _drive(Attempts(pool, timeout=1.0), clock, lambda u, r: "never")
    assert type(err) is ServerUnavailableError and not seen and not sleeps


class Replica:
    """A replica on the fake clock that is down (``down`` error) until ``back_at``, then answers."""

    def __init__(self, clock: Clock, back_at: float, down: Exception):
        self.clock, self.back_at, self.down, self.tries = clock, back_at, down, []

    def __call__(self, url, remaining):
        self.tries.append(self.clock())
        self.clock.sleep(0.002)
        if self.clock() < self.back_at:
            raise self.down
        return "answered"


def test_retries_until_the_deadline_not_a_fixed_count():
    """One replica restarting for 31 s, a 60 s deadline: the call waits it out (the fixed 3 retry rounds gave up
    after about 4 s), every sleep within the deadline."""
    clock = Clock()
    start = clock()
    pool = Pool(["only:1"], cooldown=1.0, clock=clock)
    replica = Replica(clock, start + 31.0, ISE("failed to connect to all addresses; last error: Connection refused",
                                               status="StatusCode.UNAVAILABLE"))
    att = Attempts(pool, timeout=60.0, rng=random.Random(3).random)
    out, seen, sleeps = _drive(att, clock, replica)
    assert out == "answered" and att.round > 4  # far more than the old 4 rounds
    assert 31.0 <= clock() - start <= 31.0 + 5.0 + 1.0 + 0.1  # within one capped backoff (+ cool-down) of recovery
    assert max(sleeps) <= 5.0  # max_backoff
    # the same with the old rule (retries=3): gives up early, ServerUnavailableError
    clock2 = Clock()
    pool2 = Pool(["only:1"], cooldown=1.0, clock=clock2)
    replica2 = Replica(clock2, clock2() + 31.0, replica.down)
    err, _, _ = _drive(Attempts(pool2, timeout=60.0, retries=3, rng=lambda: 0.5), clock2, replica2)
    assert type(err) is ServerUnavailableError and clock2() - 100.0 < 10 and "4 rounds" in str(err)


def test_back_pressure_is_retried_until_the_pool_frees():
    """``[UNAVAILABLE] in-flight pool full`` (a stream refusal's text) on the only replica for 12 s of a 30 s
    deadline: retried (ejected, probed) until it is accepted."""
    from glad_runtime.serving import protocol

    clock = Clock()
    pool = Pool(["line1:8001"], cooldown=1.0, clock=clock)
    full = routing.error_for(*protocol.stream_error_status(
        protocol.tag_stream_error("UNAVAILABLE", "in-flight pool full: 8 active, 32 queued")), "line1:8001")
    assert type(full) is ServerUnavailableError and full.retryable
    replica = Replica(clock, clock() + 12.0, full)
    out, seen, sleeps = _drive(Attempts(pool, timeout=30.0, backoff=0.2, max_backoff=2.0), clock, replica)
    assert out == "answered" and len(seen) > 5 and max(sleeps) <= 2.0


@pytest.mark.parametrize("seed", range(20))
def test_never_sleeps_past_the_deadline_and_ends(seed):
    """Random budgets, backoffs, cool-downs and jitter against replicas that never answer: every sleep ends before
    the deadline (checked in _drive), the loop ends with a typed error at or before the deadline, and the budget is
    used: the last attempt leaves less than a sleep's worth unused."""
    rng = random.Random(seed)
    clock = Clock()
    start = clock()
    urls = [f"r{k}" for k in range(rng.randint(1, 3))]
    cooldown = rng.uniform(0.05, 3.0)
    pool = Pool(urls, cooldown=cooldown, failure_threshold=rng.randint(1, 3), clock=clock)
    timeout = rng.uniform(0.5, 40.0)
    max_backoff = rng.uniform(0.1, 6.0)
    down = ISE("Socket closed", status="StatusCode.UNAVAILABLE")
    att = Attempts(pool, timeout=timeout, backoff=rng.uniform(0.01, 0.5), max_backoff=max_backoff,
                   rng=rng.random)
    tries = []

    def never(url, remaining):
        tries.append(clock())
        clock.sleep(rng.uniform(0.0, 0.05))
        raise down
    err, seen, sleeps = _drive(att, clock, never)
    assert isinstance(err, (ServerUnavailableError, DeadlineExceededError))
    assert clock() - start <= timeout + 0.05 + 1e-9  # an attempt may run into the deadline, a sleep never
    assert tries[-1] >= start + timeout - max(cooldown, max_backoff) - 0.15
    assert att.retries is None and "deadline" in str(err)


def test_last_backoff_is_shortened_to_leave_one_attempt():
    clock = Clock()
    pool = Pool(["a"], failure_threshold=1000, clock=clock)  # never ejected: only the backoff spaces attempts
    att = Attempts(pool, timeout=2.0, backoff=0.2, max_backoff=5.0, rng=lambda: 0.999999)
    down = ISE("Socket closed", status="StatusCode.UNAVAILABLE")
    err, seen, sleeps = _drive(att, clock, lambda u, r: (_ for _ in ()).throw(down))
    assert sleeps == pytest.approx([0.2, 0.4, 0.8, 0.5], abs=1e-5)  # 1.6 would pass the deadline: 0.5 leaves 0.1
    assert len(seen) == 5 and seen[-1][1] == pytest.approx(att.min_attempt, abs=1e-5)
    assert type(err) is ServerUnavailableError and clock() <= att.deadline


def test_a_final_error_stops_the_retries_at_once():
    """Two replica-local failures, then the server refuses the request (INVALID_ARGUMENT): no further attempt, no
    sleep after it, the refusal is the result and it was sent once."""
    clock = Clock()
    pool = Pool(["a", "b"], cooldown=0.1, clock=clock)
    calls = []

    def outcome(url, remaining):
        calls.append(url)
        if len(calls) <= 2:
            raise ISE("Socket closed", status="StatusCode.UNAVAILABLE")
        raise ISE("image_files[0]: ImageTooLargeError: 12000 x 12000 pixels over the limit",
                  status="StatusCode.INVALID_ARGUMENT")
    att = Attempts(pool, timeout=60.0)
    err, seen, sleeps = _drive(att, clock, outcome)
    assert type(err) is BadInputError and len(calls) == 3 and len(sleeps) == 1
    assert att.next().error is err and len(calls) == 3  # asking again raises the same, sends nothing


# ---------------------------------------------------------------------------------------------- the SDK on fakes
def _response(score: float):
    from glad_runtime.core.detection import Detection
    from glad_runtime.serving import protocol

    d = Detection(source="#0", score=score, ads_state="off", adaptive_step=-1, original_size=(4, 4),
                  anomaly_map=np.full((4, 4), score, np.float32))
    arrays = protocol.glad_output_arrays([d], "working")

    class Result:
        def as_numpy(self, name):
            return arrays[name]
    return Result()


def _config(outputs=None) -> dict:
    """``get_model_config(as_json=True)`` of a served ``tiny_glad`` declaring ``outputs`` (default: the contract's,
    ``errors`` included)."""
    from glad_runtime.serving import protocol

    names = protocol.GLAD_OUTPUT_NAMES if outputs is None else outputs
    return {"config": {"max_batch_size": 4, "parameters": {"dino_resolution": {"string_value": "4"}},
                       "input": [{"name": "images", "dims": ["3", "8", "8"]}, {"name": "image_files", "dims": ["1"]}],
                       "output": [{"name": n} for n in names]}}


CONFIG = _config()


class FakeReplica:
    """Stands in for ``tritonclient.grpc.InferenceServerClient``: answers the image's first pixel as score, or
    raises ``fail(call_number)``; records every infer's keyword arguments."""

    def __init__(self, fail=None, delay=0.0, config_fail=None):
        self.fail, self.delay, self.calls, self.lock = fail, delay, [], threading.Lock()
        self.config_fail = config_fail

    def get_model_config(self, name, as_json=True, client_timeout=None):
        if self.config_fail is not None:
            raise self.config_fail
        return CONFIG

    def infer(self, name, inputs, **kw):
        with self.lock:
            self.calls.append(kw)
            n = len(self.calls)
        time.sleep(self.delay)
        exc = self.fail(n) if self.fail else None
        if exc is not None:
            raise exc
        return _response(float(np.frombuffer(inputs[0]._raw_content, np.float32)[0]))


def _fake_client(cls, fakes, **kw):
    client = cls(list(fakes), "tiny", **kw)
    client._client = lambda url, fresh=False: fakes[url]
    return client


def test_sdk_sends_the_remaining_budget_as_triton_timeout_and_fails_over():
    from glad_runtime.serving.client import GladClient

    missing = ISE("Request for unknown model: 'tiny_glad' has no available versions", status="StatusCode.UNAVAILABLE")
    fakes = {"a:1": FakeReplica(fail=lambda n: missing), "b:1": FakeReplica()}
    client = _fake_client(GladClient, fakes, timeout=7.0)
    client.metadata()  # from a:1 (its config answers); a control call does not move the round robin
    img = np.full((3, 8, 8), 0.25, np.float32)
    (d,) = client.detect([img])
    assert d.error is None and d.server == "b:1" and d.score == pytest.approx(0.25)
    assert len(fakes["a:1"].calls) == len(fakes["b:1"].calls) == 1
    for kw in fakes["a:1"].calls + fakes["b:1"].calls:
        assert 0 < kw["timeout"] <= 7_000_000 and isinstance(kw["timeout"], int)
        assert kw["client_timeout"] == pytest.approx(kw["timeout"] / 1e6, abs=1e-3)
    assert fakes["b:1"].calls[0]["timeout"] <= fakes["a:1"].calls[0]["timeout"]
    s = client.stats()
    assert s["retries"] == 1 and s["attempt_errors"] == {"ModelNotFoundError": 1} and s["calls"] == 2
    # a replica without the bundle listed first: metadata fails over too
    fresh = {"e:1": FakeReplica(config_fail=missing), "b:1": FakeReplica()}
    client2 = _fake_client(GladClient, fresh, timeout=7.0)
    assert client2.detect([img])[0].server == "b:1" and client2.stats()["raised"] == {}
    assert s["replicas"]["a:1"]["state"] == OPEN and s["replicas"]["a:1"]["successes"] == 1  # its config
    assert s["replicas"]["b:1"]["successes"] == 1
    # a refused image is not retried and fails alone
    fakes["b:1"].fail = lambda n: ISE("images[0]: values outside [-1, 1]", status="StatusCode.INVALID_ARGUMENT")
    n = len(fakes["b:1"].calls)
    (d,) = client.detect([img])
    assert isinstance(d.error, BadInputError) and len(fakes["b:1"].calls) == n + 1


def test_sdk_shared_by_16_threads_answers_each_image_exactly_once():
    from glad_runtime.serving.client import GladClient

    rng = random.Random(1)
    lock = threading.Lock()

    def flaky(n):
        with lock:
            r = rng.random()
        if r < 0.3:
            return ISE("Socket closed", status="StatusCode.UNAVAILABLE")
        if r < 0.4:
            return ISE("EngineError: tiny_unet: Model 'tiny_unet' is not ready.", status="StatusCode.INTERNAL")
        return None
    fakes = {"a:1": FakeReplica(fail=flaky, delay=0.001), "b:1": FakeReplica(delay=0.001),
             "c:1": FakeReplica(fail=lambda n: ISE("failed to connect", status="StatusCode.UNAVAILABLE"))}
    client = _fake_client(GladClient, fakes, timeout=30.0, cooldown=0.05, backoff=0.01)
    answers: dict[int, list] = {}
    errors = []

    def work(ids):
        for k in ids:
            try:
                (d,) = client.detect([np.full((3, 8, 8), k / 1000, np.float32)])
                with lock:
                    answers.setdefault(k, []).append(d)
            except Exception as e:  # pragma: no cover - asserted below
                errors.append(e)

    threads = [threading.Thread(target=work, args=(range(t, 320, 16),)) for t in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and sorted(answers) == list(range(320)) and all(len(v) == 1 for v in answers.values())
    for k, (d,) in answers.items():
        assert d.score == pytest.approx(k / 1000, abs=1e-6) and d.server in ("a:1", "b:1")
    s = client.stats()
    assert all(v["outstanding"] == 0 for v in s["replicas"].values())
    assert s["replicas"]["c:1"]["successes"] == 0 and s["retries"] > 0


def test_async_client_uses_the_same_routing():
    from glad_runtime.serving.client import AsyncGladClient

    class AsyncFake(FakeReplica):
        async def get_model_config(self, name, as_json=True, client_timeout=None):
            return CONFIG

        async def infer(self, name, inputs, **kw):
            await asyncio.sleep(0.001)
            return FakeReplica.infer(self, name, inputs, **kw)

    down = ISE("Server is shutting down", status="StatusCode.UNAVAILABLE")
    fakes = {"a:1": AsyncFake(fail=lambda n: down), "b:1": AsyncFake()}
    client = _fake_client(AsyncGladClient, fakes, timeout=10.0, cooldown=60)

    async def main():
        return await asyncio.gather(*(client.detect([np.full((3, 8, 8), k / 100, np.float32)]) for k in range(32)))
    outs = asyncio.run(main())
    assert [o[0].score for o in outs] == pytest.approx([k / 100 for k in range(32)], abs=1e-6)
    assert {o[0].server for o in outs} == {"b:1"} and len(fakes["a:1"].calls) >= 1
    assert all(0 < kw["timeout"] <= 10_000_000 for kw in fakes["b:1"].calls)
    assert client.stats()["replicas"]["a:1"]["state"] == OPEN


def test_health_requires_every_model_of_the_bundle():
    from glad_runtime.serving.client import GladClient

    client = GladClient("x:1", "line")

    def idx(*pairs):
        return {"models": [{"name": n, "version": "1", "state": s} if s else {"name": n} for n, s in pairs]}
    ok = idx(("line_glad", "READY"), ("line_unet", "READY"), ("line_dino", "READY"), ("other_unet", "UNAVAILABLE"))
    assert client._required_ready(ok) == (True, [])
    unloaded = idx(("line_glad", "READY"), ("line_unet", "UNAVAILABLE"), ("line_dino", "READY"))
    assert client._required_ready(unloaded) == (False, ["line_unet"])
    assert client._required_ready(idx(("line_unet", "READY"))) == (False, ["line_glad"])
    assert client._required_ready(idx(("line_glad", None))) == (False, ["line_glad"])
    # a longer prefix with its own bundle (line_b_*) is not part of line's
    shared = idx(("line_glad", "READY"), ("line_unet", "READY"), ("line_b_glad", "READY"),
                 ("line_b_unet", "LOADING"))
    assert client._required_ready(shared) == (True, [])
    # two versions during a rollout: one READY is enough
    rollout = idx(("line_glad", "READY"), ("line_unet", "UNLOADING"), ("line_unet", "READY"))
    assert client._required_ready(rollout) == (True, [])
