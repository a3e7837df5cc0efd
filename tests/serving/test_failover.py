"""Client failover and balancing against REAL tritonservers (issue 16, client side), no mocks.

Two servers on the tiny exported bundle (``A``: default model control; ``B``: ``--model-control-mode=explicit
--load-model=*``, so a network model can be unloaded on it), 16 threads sharing one :class:`GladClient`, each
sending single-image requests of a bounded stream, while a fault happens mid-run: a network model unloaded and
reloaded on B, a replica without the bundle listed first, B stopped with SIGTERM and restarted on the same ports,
B killed with SIGKILL. Each scenario must end with every image answered exactly once, with the in-process score
(``tests/serving/test_serving.py``'s reference, same tolerance), and zero errors; its figures (requests, results, errors by
type, retries, failed attempts by type, p50/p99 latency, requests answered per replica) are printed as a table row
(``pytest -s``) so a note can quote them.

Fixtures come from ``tests/serving/test_serving.py``. Timings on this shared 2-core machine are indicative only.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter

import numpy as np
import pytest

pytest.importorskip("onnxruntime")
grpcclient = pytest.importorskip("tritonclient.grpc")

from test_serving import ATOL, images, reference, repo, served_bundle  # noqa: E402,F401 (fixtures)
from triton_models.server import launch_server, server_available  # noqa: E402

pytestmark = pytest.mark.skipif(not server_available(), reason="nvidia-pytriton (the tritonserver binary) not "
                                "installed; pip install -e .[serve]")

PREFIX = "tiny_line"
#: requests per scenario (single images); GLAD_FAILOVER_REQUESTS overrides
N = int(os.environ.get("GLAD_FAILOVER_REQUESTS", "32"))
THREADS = 16
EXPLICIT = ("--model-control-mode=explicit", "--load-model=*")
ROWS: list[str] = []
HEADER = ("| scenario | requests | results | errors by type | retries | failed attempts by type | p50 s | p99 s | "
          "answered per replica |\n|---|---|---|---|---|---|---|---|---|")


class Cluster:
    """Server A (default model control) and B (explicit model control), launched from the main thread."""

    def __init__(self, repo):
        self.repo = repo
        self.a = launch_server(repo, ready_timeout=240)
        self.b = launch_server(repo, ready_timeout=240, extra_args=EXPLICIT)
        self.restarts = 0

    def restart_b(self, same_ports: bool = True):
        """Start B again (after stop or kill), on its former ports when ``same_ports``."""
        old = self.b
        old.stop()
        self.restarts += 1
        ports = dict(http_port=old.http_port, grpc_port=old.grpc_port, metrics_port=old.metrics_port) \
            if same_ports else {}
        log = self.repo.parent / f"tritonserver-b-{self.restarts}.log"
        # die_with_parent=False: no preexec_fn, so subprocess spawns with vfork. A plain fork() while the client
        # threads are inside gRPC runs gRPC's fork handlers in the child, which aborted it once here
        # ("ev_epoll1_linux.cc Check failed: next_worker->state == KICKED"). The fixture and atexit still stop it.
        self.b = launch_server(self.repo, ready_timeout=240, extra_args=EXPLICIT, log_path=log,
                               die_with_parent=False, **ports)
        return self.b

    def ensure_b(self):
        if not (self.b.running() and self.b.ready()):
            self.restart_b(same_ports=False)
        return self.b

    def stop(self):
        for s in (self.a, self.b):
            s.stop()


@pytest.fixture(scope="module")
def cluster(repo):
    c = Cluster(repo)
    yield c
    c.stop()
    if ROWS:
        print("\n\nfailover figures (tests/serving/test_failover.py, %d threads, 2-core CPU):\n%s\n%s" % (
            THREADS, HEADER, "\n".join(ROWS)))


@pytest.fixture(scope="module")
def inputs(images):
    """The four ELPV cells as PNG bytes (sent as ``image_files``, decoded on the server as the reference was)."""
    from test_serving import _png

    return [_png(i) for i in images]


class Stream:
    """A bounded stream of single-image requests from ``threads`` threads sharing ``client``."""

    def __init__(self, client, inputs, n=N, threads=THREADS):
        self.client, self.inputs, self.n, self.threads = client, inputs, n, threads
        self.answers: dict[int, list] = {}
        self.errors: list[tuple[int, BaseException]] = []
        self.latency: list[float] = []
        self._next = 0
        self._lock = threading.Lock()

    @property
    def done(self) -> int:
        with self._lock:
            return sum(len(v) for v in self.answers.values()) + len(self.errors)

    def _work(self):
        while True:
            with self._lock:
                if self._next >= self.n:
                    return
                k, self._next = self._next, self._next + 1
            t0 = time.perf_counter()
            try:
                (d,) = self.client.detect([self.inputs[k % 4]])
            except Exception as e:  # asserted to be empty
                with self._lock:
                    self.errors.append((k, e))
                continue
            with self._lock:
                self.latency.append(time.perf_counter() - t0)
                self.answers.setdefault(k, []).append(d)

    def run(self, fault=None, at: float = 0.25):
        """Run the stream; once ``at`` of it is answered, call ``fault()`` in this (the main) thread while the
        workers go on. Returns what ``fault`` returned."""
        workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.threads)]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        info = None
        if fault is not None:
            while self.done < at * self.n and any(w.is_alive() for w in workers):
                time.sleep(0.02)
            info = fault()
        for w in workers:
            w.join(600)
        self.wall = time.perf_counter() - t0
        return info

    def check(self, reference, scenario: str, extra: str = ""):
        """Every image answered exactly once with the in-process score, no errors; prints and records the row."""
        _, ref = reference
        stats = self.client.stats()
        lat = np.array(self.latency) if self.latency else np.zeros(1)
        served = Counter(d.server for v in self.answers.values() for d in v)
        row = "| %s | %d | %d | %s | %d | %s | %.2f | %.2f | %s |" % (
            scenario, self.n, sum(len(v) for v in self.answers.values()),
            dict(Counter(type(e).__name__ for _, e in self.errors)) or 0, stats["retries"],
            stats["attempt_errors"] or "-", float(np.percentile(lat, 50)), float(np.percentile(lat, 99)),
            ", ".join(f"{_name(u)} {c}" for u, c in sorted(served.items())) + (f"; {extra}" if extra else ""))
        ROWS.append(row)
        last = {_name(u): str(e)[:200] for u, e in self.client.pool.last_errors().items()}
        print(f"\n{HEADER}\n{row}\n(wall {self.wall:.1f} s; replicas {stats['replicas']}; last errors {last})")
        assert not self.errors, self.errors[:3]
        assert sorted(self.answers) == list(range(self.n)), "an image was not answered"
        assert all(len(v) == 1 for v in self.answers.values()), "an image was answered twice"
        for k, (d,) in self.answers.items():
            assert d.error is None, d.error
            assert d.score == pytest.approx(float(ref.scores[k % 4]), abs=ATOL), (k, d.server)
            assert d.adaptive_step == int(ref.adaptive_steps[k % 4])
        return stats, served


_NAMES: dict[str, str] = {}


def _name(url: str) -> str:
    return _NAMES.get(url, url)


def _client(urls, **kw):
    from glad_runtime.serving.client import GladClient

    return GladClient(urls, PREFIX, **dict(dict(timeout=120, retries=3, backoff=0.1, cooldown=1.0), **kw))


def _wait(predicate, timeout=60.0, every=0.2):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return False


def _back_in_service(client, inputs, reference, url) -> int:
    """After a fault is repaired: the same client (same pool, same channels) sends one request per thread; every
    one is answered once with the reference score and ``url`` answers some again. Returns how many it answered."""
    assert _wait(lambda: client.health()[url], 60), f"{url} not healthy again"  # a health probe closes its breaker
    again = Stream(client, inputs, n=THREADS)
    again.run()
    _, ref = reference
    assert not again.errors and sorted(again.answers) == list(range(THREADS))
    assert all(len(v) == 1 for v in again.answers.values())
    for k, (d,) in again.answers.items():
        assert d.score == pytest.approx(float(ref.scores[k % 4]), abs=ATOL)
    return sum(d.server == url for v in again.answers.values() for d in v)


# ---------------------------------------------------------------------------------------------- scenarios
def test_unload_and_reload_network_model_mid_run(cluster, inputs, reference):
    """``<prefix>_unet`` unloaded on B mid-run (B's BLS model answers INTERNAL "not ready"), then reloaded: the
    client fails those requests over to A, health() reports B unhealthy meanwhile, and B gets traffic again."""
    a, b = cluster.a, cluster.ensure_b()
    _NAMES.update({a.grpc_url: "A", b.grpc_url: "B"})
    client = _client([b.grpc_url, a.grpc_url])
    assert client.health() == {b.grpc_url: True, a.grpc_url: True}
    stream = Stream(client, inputs)
    seen = {}

    def fault():
        with grpcclient.InferenceServerClient(b.grpc_url) as admin:
            admin.unload_model(f"{PREFIX}_unet")
            assert _wait(lambda: not admin.is_model_ready(f"{PREFIX}_unet"), 30)
            seen["health_unloaded"] = client.health()
            target = stream.done + max(8, N // 4)  # traffic goes on without B's network model for a while
            _wait(lambda: stream.done >= target, 120, 0.05)
            served_before = Counter(d.server for v in list(stream.answers.values()) for d in v)[b.grpc_url]
            admin.load_model(f"{PREFIX}_unet")
            assert _wait(lambda: admin.is_model_ready(f"{PREFIX}_unet"), 60)
            seen["served_by_b_at_reload"] = served_before
            seen["health_reloaded"] = client.health()

    with client:
        stream.run(fault)
        stats, served = stream.check(reference, "unload + reload `unet` on B",
                                     f"B healthy while unloaded: {seen['health_unloaded'][b.grpc_url]}")
        back = _back_in_service(client, inputs, reference, b.grpc_url)
        print(f"after the reload B answered {back} of the next {THREADS} requests")
        assert back >= 1
    assert seen["health_unloaded"] == {b.grpc_url: False, a.grpc_url: True}  # health covers the network models
    assert seen["health_reloaded"] == {b.grpc_url: True, a.grpc_url: True}
    assert stats["attempt_errors"], "the unload was not noticed: no failed attempt"
    assert stats["replicas"][b.grpc_url]["ejections"] >= 1


def test_replica_missing_the_bundle_listed_first(cluster, tmp_path_factory, inputs, reference):
    """A server with an empty repository listed first: its ModelNotFoundError is replica-local, so the healthy
    replicas answer everything; health() says which replica lacks the bundle. The asyncio client the same."""
    from glad_runtime.serving.client import AsyncGladClient, ModelNotFoundError

    a, b = cluster.a, cluster.ensure_b()
    empty_repo = tmp_path_factory.mktemp("empty") / "models"
    empty_repo.mkdir()
    with launch_server(empty_repo, ready_timeout=120) as empty:
        _NAMES.update({a.grpc_url: "A", b.grpc_url: "B", empty.grpc_url: "E (empty)"})
        urls = [empty.grpc_url, a.grpc_url, b.grpc_url]
        with _client(urls) as client:
            assert client.health() == {empty.grpc_url: False, a.grpc_url: True, b.grpc_url: True}
            stream = Stream(client, inputs)
            stream.run()
            stats, served = stream.check(reference, "replica without the bundle listed first (E, A, B)")
        assert served[empty.grpc_url] == 0 and served[a.grpc_url] > 0 and served[b.grpc_url] > 0
        assert stats["attempt_errors"].get("ModelNotFoundError", 0) >= 1
        with _client([empty.grpc_url], retries=1, backoff=0.05, timeout=10) as only_empty:
            with pytest.raises(ModelNotFoundError):  # typed only when every replica lacks it
                only_empty.detect([inputs[0]])

        # the asyncio client: 16 coroutines sharing one AsyncGladClient, the same routing
        n_async = THREADS

        async def main():
            async with AsyncGladClient(urls, PREFIX, timeout=120, backoff=0.1, cooldown=1.0) as ac:
                assert await ac.health() == {empty.grpc_url: False, a.grpc_url: True, b.grpc_url: True}
                sem = asyncio.Semaphore(THREADS)
                lat = []

                async def one(k):
                    async with sem:
                        t0 = time.perf_counter()
                        (d,) = await ac.detect([inputs[k % 4]])
                        lat.append(time.perf_counter() - t0)
                        return d
                dets = await asyncio.gather(*(one(k) for k in range(n_async)), return_exceptions=True)
                return dets, ac.stats(), lat
        dets, astats, lat = asyncio.run(main())
    errors = [d for d in dets if isinstance(d, BaseException)]
    _, ref = reference
    row = "| %s | %d | %d | %s | %d | %s | %.2f | %.2f | %s |" % (
        "same, AsyncGladClient (16 coroutines)", n_async, len(dets) - len(errors),
        dict(Counter(type(e).__name__ for e in errors)) or 0, astats["retries"], astats["attempt_errors"] or "-",
        float(np.percentile(lat or [0], 50)), float(np.percentile(lat or [0], 99)),
        ", ".join(f"{_name(u)} {c}" for u, c in sorted(Counter(d.server for d in dets
                                                               if not isinstance(d, BaseException)).items())))
    ROWS.append(row)
    print(f"\n{row}")
    assert not errors, errors[:3]
    for k, d in enumerate(dets):
        assert d.error is None and d.score == pytest.approx(float(ref.scores[k % 4]), abs=ATOL)
        assert d.server != empty.grpc_url


def test_sigterm_and_restart_on_the_same_ports(cluster, inputs, reference):
    """B stopped with SIGTERM mid-run (drain, then exit) and started again on the same ports: requests in flight
    or refused there are resent to A; B's breaker probes it back once it answers."""
    a, b = cluster.a, cluster.ensure_b()
    _NAMES.update({a.grpc_url: "A", b.grpc_url: "B"})
    client = _client([b.grpc_url, a.grpc_url])
    stream = Stream(client, inputs)
    info = {}

    def fault():
        t0 = time.perf_counter()
        b.stop()  # SIGTERM to the process group, wait for the exit
        info["stop_s"] = time.perf_counter() - t0
        new = cluster.restart_b(same_ports=True)  # start again on the same ports, wait for ready
        assert new.grpc_url == b.grpc_url
        info["down_s"] = time.perf_counter() - t0
        info["done_at_restart"] = stream.done

    with client:
        stream.run(fault)
        stats, served = stream.check(reference, "SIGTERM + restart B (same ports)",
                                     f"B stopping {info['stop_s']:.1f} s, down {info['down_s']:.1f} s in all, "
                                     f"ready again after {info['done_at_restart']}/{N} answers")
        back = _back_in_service(client, inputs, reference, b.grpc_url)  # the old channel's port, a new server
        print(f"after the restart B answered {back} of the next {THREADS} requests")
        assert back >= 1
    assert stats["replicas"][b.grpc_url]["ejections"] >= 1 and stats["attempt_errors"]


def test_single_replica_sigterm_restart_within_the_deadline(cluster, inputs, reference):
    """Issue 27: a client listing ONE replica that is SIGTERM-restarted on the same ports keeps retrying with backoff
    until each call's 60 s deadline (not a fixed count), so every image is answered once with its score."""
    b = cluster.ensure_b()
    _NAMES.update({b.grpc_url: "B"})
    client = _client([b.grpc_url], timeout=60, retries=None, backoff=0.2, max_backoff=2.0)
    stream = Stream(client, inputs)
    info = {}

    def fault():
        t0 = time.perf_counter()
        b.stop()
        new = cluster.restart_b(same_ports=True)
        assert new.grpc_url == b.grpc_url
        info["down_s"] = time.perf_counter() - t0

    with client:
        stream.run(fault)
        stats, _ = stream.check(reference, "one replica, SIGTERM + restart (same ports), 60 s deadline",
                                f"down {info['down_s']:.1f} s")
    assert info["down_s"] < 60 and stats["retries"] >= 1


def test_sigkill_mid_run(cluster, inputs, reference):
    """B killed with SIGKILL (process group) mid-run: its requests in flight fail with UNAVAILABLE and are
    answered by A; nothing lost, nothing answered twice."""
    a, b = cluster.a, cluster.ensure_b()
    _NAMES.update({a.grpc_url: "A", b.grpc_url: "B"})
    client = _client([b.grpc_url, a.grpc_url])
    stream = Stream(client, inputs)
    with client:
        stream.run(b.kill)
        stats, served = stream.check(reference, "SIGKILL B")
        assert client.health() == {b.grpc_url: False, a.grpc_url: True}
    assert served[a.grpc_url] > 0 and stats["attempt_errors"].get("ServerUnavailableError", 0) >= 1
