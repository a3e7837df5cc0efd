"""Load generation and measurement of one endpoint: the engine behind ``glad perf URL`` (see ``bench/perf``).

One **point** is one load level on one target (a model on a server):

* closed loop (``mode="concurrency"``): ``load`` worker threads, each sending a request and waiting for its answer
  before sending the next (perf_analyzer's ``--concurrency-range``);
* open loop (``mode="request_rate"``): requests are due at the times of :func:`bench.perf.rules.arrivals` (Poisson
  or constant, fixed seed) whatever is outstanding, sent by up to ``max_threads`` workers (perf_analyzer's
  ``--request-rate-range`` and ``--max-threads``); latency counts from the **scheduled** arrival, so a client that
  falls behind shows it in the latency (and in ``delayed``), not as a lower offered load.

Each request carries ``batch_size`` real encoded image files as BYTES ``image_files [B, 1]`` (the files dealt round
robin), the ``map_size`` request parameter and its deadline twice (Triton's request ``timeout`` in microseconds and
the client-side gRPC / HTTP timeout). ``<prefix>_glad`` is called with unary gRPC or HTTP (binary tensors);
``<prefix>_glad_inflight`` (decoupled) over gRPC streams, one stream per worker.

Measurement (:func:`measure_point`): after ``warmup_requests`` (not counted), either **time windows** of
``interval_s`` until the last three are stable (:func:`bench.perf.rules.is_stable`, perf_analyzer's rule on
throughput and p99) or ``max_trials`` windows ran (then ``stable`` is false and the last three are reported), or a
**fixed count** of ``request_count`` requests. The reported client figures are those of the requests completed in
the reported windows; the server's figures are the deltas of Triton's statistics extension and ``/metrics`` between
snapshots taken at the same window boundaries. The load then stops, every request in flight is answered (or
times out), and one more snapshot gives the **reconciliation**: every request the tool sent in the point against
the entry model's requests in Triton's statistics, and every image answered against the model's
``glad_images_total`` + ``glad_errors_total``. In count mode the reported window is that whole span, so the
reported counts themselves are exact; in time mode the window boundaries are not quiesced and the window's server
counts may differ from the client's by the requests in transit at its two edges (both are reported).
"""

from __future__ import annotations

import itertools
import json
import queue
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from bench.perf import rules
from glad_runtime.errors import ModelNotFoundError, ServerUnavailableError, UsageError
from glad_runtime.serving import protocol

__all__ = ["Target", "connect", "Settings", "Payloads", "measure_point", "Snapshot", "classify_failure",
           "default_images", "load_images"]

#: the outputs always requested (what the figures need), besides whatever ``outputs`` adds
_NEEDED = ("scores", "adaptive_steps", protocol.ERRORS_OUTPUT)
#: seconds past a request's deadline a worker waits for a stream answer before giving up on it
_GRACE_S = 1.0
#: a request sent this much later than its scheduled arrival counts as delayed (perf_analyzer's warning)
_DELAYED_S = 0.01


# ---------------------------------------------------------------------------------------------- target
@dataclass
class Target:
    """One model on one server, as ``glad perf`` measures it.

    Attributes:
        url: ``host:port`` of the HTTP or gRPC endpoint.
        protocol: ``"grpc"`` or ``"http"``.
        model: the entry model's full name (``<prefix>_glad`` or ``<prefix>_glad_inflight``; any model taking
            ``image_files``, such as the no-op model of the overhead check).
        metrics_url: Triton's Prometheus endpoint (``http://host:8002/metrics``), or None to skip the GLAD
            counters.
        streaming: the model is decoupled (answered over gRPC streams); read from its config by :func:`connect`.
        outputs: the outputs each request asks for. max_images: the model's per-request image cap.
        networks: the other models of the prefix (network models, ensemble), whose statistics are reported.
        label: how reports name it (default the model). map_side: the side of its working-size maps (the
            model's ``dino_resolution`` parameter; the no-op model of the overhead check answers maps this size).
    """

    url: str
    protocol: str = "grpc"
    model: str = ""
    metrics_url: str | None = None
    streaming: bool = False
    outputs: tuple[str, ...] = ()
    max_images: int | None = None
    networks: tuple[str, ...] = ()
    label: str = ""
    map_side: int = 224

    @property
    def name(self) -> str:
        """How reports name this target: ``label``, else ``model``."""
        return self.label or self.model

    def client(self, connect_timeout_s: float = 60.0):
        """A new tritonclient client of this target's protocol (one per thread; HTTP: ``connect_timeout_s`` to
        connect, 600 s per call)."""
        if self.protocol == "http":
            try:
                import tritonclient.http as httpclient
            except ImportError as e:
                raise UsageError(f"HTTP needs tritonclient's HTTP client ({e}): pip install 'tritonclient[http]' "
                                 "(the serve extra), or give the gRPC URL") from None
            return httpclient.InferenceServerClient(self.url, connection_timeout=connect_timeout_s,
                                                    network_timeout=600.0)
        import tritonclient.grpc as grpcclient

        return grpcclient.InferenceServerClient(self.url)


def parse_url(url: str, transport: str | None = None) -> tuple[str, str]:
    """``(host:port, protocol)`` of ``url``: ``http://h:p`` is HTTP, ``grpc://h:p`` gRPC, a bare ``h:p`` is
    ``transport`` (default gRPC); a missing port is Triton's default (8000 HTTP, 8001 gRPC).

    Raises:
        UsageError: ``transport`` contradicts the URL's scheme, or an unknown scheme.
    """
    u = url.strip().rstrip("/")
    scheme = None
    if "://" in u:
        scheme, u = u.split("://", 1)
        scheme = {"http": "http", "https": "http", "grpc": "grpc"}.get(scheme.lower())
        if scheme is None:
            raise UsageError(f"{url}: the URL scheme must be http:// or grpc:// (or none: host:port)")
    if transport and scheme and transport != scheme:
        raise UsageError(f"{url} is {scheme}, but --protocol {transport} was given")
    proto = scheme or transport or "grpc"
    if ":" not in u.rsplit("]", 1)[-1]:
        u = f"{u}:{8000 if proto == 'http' else 8001}"
    return u, proto


def _as_dict(x):
    return x.get("config", x) if isinstance(x, dict) else x


def connect(url: str, model: str | None = None, transport: str | None = None, metrics_url: str | None = "auto",
            outputs: Sequence[str] | None = None, label: str = "") -> Target:
    """Check the server and describe the target (``Target`` with every field filled).

    Args:
        url: the server (:func:`parse_url`).
        model: the entry model; None: the one ``*_glad`` model the server serves (refused when there are several).
        transport: ``grpc`` / ``http`` (default from the URL, else gRPC).
        metrics_url: ``"auto"``: ``http://<host>:8002/metrics`` (Triton's default port); None: no metrics.
        outputs: outputs to request besides ``scores``, ``adaptive_steps`` and ``errors``; None: every output
            the model declares (what a line receives, perf_analyzer's default).
    Raises:
        ServerUnavailableError: the server does not answer. ModelNotFoundError: no such model, not ready, or none
        / several entry models to choose from. UsageError: a streaming (decoupled) model over HTTP.
    """
    hostport, proto = parse_url(url, transport)
    t = Target(hostport, proto, model or "", label=label)
    c = t.client(connect_timeout_s=10.0)
    kw = {} if proto == "http" else {"as_json": True, "client_timeout": 10.0}
    try:
        try:
            index = c.get_model_repository_index(**kw)
        except Exception as e:  # noqa: BLE001 (any transport failure: the server is not there)
            raise ServerUnavailableError(f"{url}: the server does not answer ({type(e).__name__}: "
                                         f"{str(e).splitlines()[0] if str(e) else ''})", None, hostport) from None
        index = index.get("models", []) if isinstance(index, dict) else index
        ready = {m["name"] for m in index if m.get("state") == "READY"}
        if not model:
            entries = sorted(n for n in ready if n.endswith("_" + protocol.GLAD_MODEL))
            if len(entries) != 1:
                raise ModelNotFoundError(f"{url}: choose the model with --model ({', '.join(entries) or 'no'} "
                                         f"*_glad model ready; ready models: {', '.join(sorted(ready)) or 'none'})")
            t.model = entries[0]
        if t.model not in ready:
            raise ModelNotFoundError(f"{url}: model {t.model} is not ready there (ready: "
                                     f"{', '.join(sorted(ready)) or 'none'})")
        cfg = _as_dict(c.get_model_config(t.model, **kw))
    finally:
        c.close()
    t.streaming = bool((cfg.get("model_transaction_policy") or {}).get("decoupled"))
    if t.streaming and proto == "http":
        raise UsageError(f"{t.model} is decoupled (in-flight): it answers over gRPC streams only; give the gRPC "
                         "URL (port 8001 by default)")
    declared = [o.get("name") for o in cfg.get("output") or []]
    wanted = declared if outputs is None else [o for o in declared if o in set(outputs) | set(_NEEDED)]
    t.outputs = tuple(o for o in declared if o in wanted)
    inputs = {i.get("name") for i in cfg.get("input") or []}
    if protocol.GLAD_FILE_INPUT not in inputs:
        raise ModelNotFoundError(f"{t.model} takes no {protocol.GLAD_FILE_INPUT!r} input: not a GLAD entry model")
    params = cfg.get("parameters") or {}
    mi = (params.get("max_images") or {}).get("string_value")
    t.max_images = int(mi) if mi and str(mi).isdigit() else (int(cfg.get("max_batch_size") or 0) or None)
    side = (params.get("dino_resolution") or {}).get("string_value")
    t.map_side = int(side) if side and str(side).isdigit() else 224
    prefix = t.model
    for suffix in protocol.ENTRY_MODELS:
        if t.model.endswith("_" + suffix):
            prefix = t.model[: -len(suffix) - 1]
            break
    t.networks = tuple(sorted(n for n in ready if n.startswith(prefix + "_") and not protocol.is_entry_model(n)
                              and n != t.model)) if prefix != t.model else ()
    if metrics_url == "auto":
        t.metrics_url = f"http://{hostport.rsplit(':', 1)[0]}:8002/metrics"
    else:
        t.metrics_url = metrics_url
    return t


# ---------------------------------------------------------------------------------------------- images
def default_images(folder: str | Path, count: int = 16) -> list[Path]:
    """``count`` real ELPV mono cells (``elpv_dataset``), normal and defective alternating, written as PNG files
    into ``folder`` (``elpv-<index>-<good|defect>.png``; kept when already there). Returns their paths.

    Raises:
        UsageError: the ``elpv_dataset`` package is not installed (then pass ``--images DIR``).
    """
    try:
        from elpv_dataset.utils import load_dataset
    except ImportError:
        raise UsageError("no images: the default ELPV cells need the elpv-dataset package; pass --images DIR") \
            from None
    from PIL import Image

    images, probs, types = load_dataset()
    mono = types == "mono"
    good, bad = np.where(mono & (probs == 0))[0], np.where(mono & (probs == 1))[0]
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for k in range(count):
        i = int((good if k % 2 == 0 else bad)[k // 2])
        p = folder / f"elpv-{i:04d}-{'good' if k % 2 == 0 else 'defect'}.png"
        if not p.is_file():
            tmp = p.with_suffix(".tmp")
            Image.fromarray(images[i]).save(tmp, format="PNG")
            tmp.replace(p)
        out.append(p)
    return out


def load_images(paths: Sequence[str | Path]) -> list[tuple[str, bytes]]:
    """``(name, encoded bytes)`` of image files, sorted by path (what is sent, as it is).

    Raises:
        UsageError: no image file among ``paths`` (folders are listed with the formats ``glad detect`` reads).
    """
    from glad_runtime.core.images import list_images

    files = list_images([str(p) for p in paths])
    if not files:
        raise UsageError(f"no image files in {', '.join(str(p) for p in paths)}")
    return [(Path(f).name, Path(f).read_bytes()) for f in files]


@dataclass
class Payloads:
    """The requests' contents: request ``k`` carries ``batch_size`` files, ``files[(k * B + j) % n]``."""

    files: list[tuple[str, bytes]]
    batch_size: int = 1

    def request(self, k: int) -> tuple[list[str], np.ndarray]:
        """``(names, BYTES array [B, 1])`` of request ``k``."""
        n = len(self.files)
        picks = [self.files[(k * self.batch_size + j) % n] for j in range(self.batch_size)]
        return [p[0] for p in picks], np.array([p[1] for p in picks], dtype=np.object_).reshape(-1, 1)


# ---------------------------------------------------------------------------------------------- settings
@dataclass
class Settings:
    """How each point is measured (units in the names).

    Attributes:
        interval_s: measurement window (perf_analyzer ``--measurement-interval``, there in ms; default 5 s).
        tolerance: stability tolerance (``--stability-percentage`` / 100).
        max_trials: windows at most per point (``--max-trials``).
        request_count: > 0: measure exactly this many requests per point instead of windows.
        warmup_requests: requests sent and answered before the point's first snapshot (not counted); None:
            the concurrency (closed loop) or 2 (open loop).
        timeout_s: each request's deadline (server request timeout and client timeout).
        map_size: the ``map_size`` request parameter (``working`` / ``original``).
        max_threads: open loop: workers sending (the most requests outstanding).
        distribution: open loop: ``poisson`` or ``constant``. seed: the arrival schedule's seed.
    """

    interval_s: float = 5.0
    tolerance: float = 0.10
    max_trials: int = 10
    request_count: int = 0
    warmup_requests: int | None = None
    timeout_s: float = 60.0
    map_size: str = protocol.DEFAULT_MAP_SIZE
    max_threads: int = 16
    distribution: str = "poisson"
    seed: int = 0


# ---------------------------------------------------------------------------------------------- failures
def classify_failure(text: str, status: str | None = None) -> str:
    """The error type a failed request is counted under: ``rejected: pool full`` / ``rejected: closing`` (the
    in-flight pool's back-pressure), ``rejected: queue timeout`` (Triton's queue policy), ``deadline (server)``,
    ``deadline (client)``, else the status name (``INVALID_ARGUMENT``, ``UNAVAILABLE``, ``INTERNAL``, ...).
    Types starting with ``rejected`` are the rejections."""
    t = (text or "").lower()
    tag, _ = protocol.stream_error_status(text or "")
    if "in-flight pool full" in t:
        return "rejected: pool full"
    if "closing" in t and "unavailable" in (t + (status or "").lower()):
        return "rejected: closing"
    if "request timeout expired" in t and "deadline exceeded" not in t:
        return "rejected: queue timeout"
    s = (status or tag or "").upper().replace("STATUSCODE.", "")
    if s == "DEADLINE_EXCEEDED" or "timed out" in t:  # the client's own deadline (gRPC, HTTP, stream wait)
        return "deadline (client)"
    if "deadline exceeded" in t:  # the server's: the request timeout passed while it ran
        return "deadline (server)"
    if s in ("400",):
        return "INVALID_ARGUMENT"
    if s in ("503",):
        return "UNAVAILABLE"
    if s in ("500",):
        return "INTERNAL"
    return s or "error"


# ---------------------------------------------------------------------------------------------- one request
@dataclass
class Record:
    """One sent request: ``k`` (index), times on the monotonic clock (``due``: scheduled arrival, ``sent``,
    ``done``), ``images`` sent, ``error`` type (None when answered) and text, the answered images' per-image
    error types, adaptive steps and ``(file, score)`` pairs."""

    k: int
    due: float
    sent: float
    done: float
    images: int
    error: str | None = None
    text: str = ""
    image_errors: tuple = ()
    steps: tuple = ()
    scores: tuple = ()

    @property
    def latency(self) -> float:
        return self.done - self.due


def _parse(result, names: list[str], has_errors: bool):
    """``(image error types, adaptive steps, (file, score) pairs)`` of one answered request."""
    scores = result.as_numpy("scores")
    steps = result.as_numpy("adaptive_steps")
    errs = result.as_numpy(protocol.ERRORS_OUTPUT) if has_errors else None
    image_errors, out_steps, out_scores = [], [], []
    for j, name in enumerate(names):
        e = protocol.parse_image_error(errs.reshape(-1)[j]) if errs is not None else None
        if e is not None:
            image_errors.append(e[1])
            continue
        if steps is not None:
            out_steps.append(int(steps.reshape(-1)[j]))
        if scores is not None:
            out_scores.append((name, float(scores.reshape(-1)[j])))
    return tuple(image_errors), tuple(out_steps), tuple(out_scores)


class _Channel:
    """One worker's connection: ``call(k, due)`` sends request ``k`` and returns its :class:`Record`."""

    def __init__(self, target: Target, payloads: Payloads, settings: Settings):
        self.t, self.payloads, self.s = target, payloads, settings
        self.has_errors = protocol.ERRORS_OUTPUT in target.outputs
        self.params = {protocol.MAP_SIZE_PARAMETER: settings.map_size}
        self.timeout_us = max(1, int(settings.timeout_s * 1e6))
        self.client = target.client()
        if target.protocol == "http":
            import tritonclient.http as mod
        else:
            import tritonclient.grpc as mod
        self.mod = mod
        self.outputs = [mod.InferRequestedOutput(n, binary_data=True) if target.protocol == "http"
                        else mod.InferRequestedOutput(n) for n in target.outputs]
        self.responses: queue.Queue | None = None
        if target.streaming:
            self._start_stream()

    def _start_stream(self) -> None:
        self.responses = queue.Queue()
        q = self.responses
        self.client.start_stream(callback=lambda result, error: q.put((result, error)))

    def _inputs(self, k: int):
        names, arr = self.payloads.request(k)
        inp = self.mod.InferInput(protocol.GLAD_FILE_INPUT, list(arr.shape), "BYTES")
        if self.t.protocol == "http":
            inp.set_data_from_numpy(arr, binary_data=True)
        else:
            inp.set_data_from_numpy(arr)
        return names, [inp]

    def call(self, k: int, due: float) -> Record:
        names, inputs = self._inputs(k)
        sent = time.monotonic()
        result, err_text, status = None, "", None
        try:
            if self.t.streaming:
                self.client.async_stream_infer(self.t.model, inputs, outputs=self.outputs, request_id=str(k),
                                               timeout=self.timeout_us, parameters=self.params)
                try:
                    result, error = self.responses.get(timeout=self.s.timeout_s + _GRACE_S)
                except queue.Empty:
                    result, error = None, None
                    err_text, status = "no answer on the stream within the deadline (client)", "DEADLINE_EXCEEDED"
                    self._restart()  # a late answer must not be read as the next request's
                if error is not None:
                    err_text, status = str(error), getattr(error, "status", lambda: None)()
                    result = None
            elif self.t.protocol == "http":
                result = self.client.infer(self.t.model, inputs, outputs=self.outputs, request_id=str(k),
                                           timeout=self.timeout_us, parameters=self.params)
            else:
                result = self.client.infer(self.t.model, inputs, outputs=self.outputs, request_id=str(k),
                                           timeout=self.timeout_us, client_timeout=self.s.timeout_s,
                                           parameters=self.params)
        except Exception as e:  # noqa: BLE001 (every failure is counted by type)
            result = None
            err_text = str(e)
            st = getattr(e, "status", None)
            status = st() if callable(st) else st
        done = time.monotonic()
        if result is None:
            return Record(k, due, sent, done, len(names), classify_failure(err_text, status), err_text[:300])
        try:
            image_errors, steps, scores = _parse(result, names, self.has_errors)
        except Exception as e:  # noqa: BLE001 (a response the tool cannot read: counted, never hidden)
            return Record(k, due, sent, done, len(names), "unreadable response", f"{type(e).__name__}: {e}")
        return Record(k, due, sent, done, len(names), None, "", image_errors, steps, scores)

    def _restart(self) -> None:
        try:
            self.client.stop_stream(cancel_requests=True)
        except TypeError:
            self.client.stop_stream()
        except Exception:  # noqa: BLE001
            pass
        self._start_stream()

    def close(self) -> None:
        try:
            if self.t.streaming:
                self.client.stop_stream()
            self.client.close()
        except Exception:  # noqa: BLE001
            pass


# ---------------------------------------------------------------------------------------------- a running load
class _Load:
    """The workers of one load level (closed or open loop), appending :class:`Record` s to ``records``.

    ``limit``: send at most this many requests (count mode, warm-up); ``stop()`` ends sending: workers finish
    the request they are in (bounded by its deadline), requests due but not yet sent are dropped (never sent,
    never counted)."""

    def __init__(self, target: Target, payloads: Payloads, mode: str, load: float, settings: Settings,
                 limit: int | None = None, first_index: int = 0):
        self.target, self.payloads, self.mode, self.load, self.s = target, payloads, mode, load, settings
        self.limit = limit
        self.records: list[Record] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._next = itertools.count(first_index)
        self._sent = 0
        self._threads: list[threading.Thread] = []
        self._due: queue.Queue = queue.Queue()
        self.t0 = 0.0
        self.errors: list[str] = []  # worker crashes (a bug here), reported

    # -- closed loop
    def _take(self) -> int | None:
        with self._lock:
            if self._stop.is_set() or (self.limit is not None and self._sent >= self.limit):
                return None
            self._sent += 1
            return next(self._next)

    def _closed_worker(self) -> None:
        ch = self._open_channel()
        if ch is None:
            return
        try:
            while True:
                k = self._take()
                if k is None:
                    break
                now = time.monotonic()
                self.records.append(ch.call(k, now))
        finally:
            ch.close()

    # -- open loop
    def _dispatcher(self) -> None:
        sched = rules.arrivals(self.load, self.s.distribution, self.s.seed)
        for i, at in enumerate(sched):
            if self.limit is not None and i >= self.limit:
                break
            due = self.t0 + at
            if self._stop.wait(max(0.0, due - time.monotonic())):
                break
            self._due.put((next(self._next), due))
        for _ in self._threads:
            self._due.put(None)

    def _open_worker(self) -> None:
        ch = self._open_channel()
        if ch is None:
            return
        try:
            while True:
                item = self._due.get()
                if item is None or self._stop.is_set():
                    break
                self.records.append(ch.call(*item))
        finally:
            ch.close()

    def _open_channel(self) -> _Channel | None:
        try:
            return _Channel(self.target, self.payloads, self.s)
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"{type(e).__name__}: {e}")
            return None

    def start(self) -> "_Load":
        self.t0 = time.monotonic()
        if self.mode == "concurrency":
            self._threads = [threading.Thread(target=self._closed_worker, daemon=True, name=f"perf-{i}")
                             for i in range(int(self.load))]
            for t in self._threads:
                t.start()
        else:
            n = self.s.max_threads if self.limit is None else max(1, min(self.s.max_threads, self.limit))
            self._threads = [threading.Thread(target=self._open_worker, daemon=True, name=f"perf-{i}")
                             for i in range(n)]
            for t in self._threads:
                t.start()
            self._dispatch = threading.Thread(target=self._dispatcher, daemon=True, name="perf-dispatch")
            self._dispatch.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def running(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> bool:
        """Wait for every worker; True when all ended."""
        end = None if timeout is None else time.monotonic() + timeout
        if self.mode != "concurrency":
            self._dispatch.join(None if end is None else max(0.0, end - time.monotonic()))
        for t in self._threads:
            t.join(None if end is None else max(0.0, end - time.monotonic()))
        return not self.running()


# ---------------------------------------------------------------------------------------------- server snapshots
@dataclass
class Snapshot:
    """The server's counters at one time: ``stats`` (Triton's statistics extension, every model) and
    ``metrics`` (:func:`bench.perf.rules.parse_prometheus` of ``/metrics``; empty when unavailable)."""

    t: float
    stats: dict
    metrics: dict = field(default_factory=dict)
    metrics_error: str | None = None


def snapshot(target: Target, client=None) -> Snapshot:
    """Read the statistics of every model and the metrics now (one call each)."""
    own = client is None
    c = client or target.client()
    try:
        stats = c.get_inference_statistics(**({} if target.protocol == "http" else {"as_json": True}))
    finally:
        if own:
            c.close()
    metrics, err = {}, None
    if target.metrics_url:
        try:
            with urllib.request.urlopen(target.metrics_url, timeout=5) as r:
                metrics = rules.parse_prometheus(r.read().decode("utf-8", "replace"))
        except Exception as e:  # noqa: BLE001 (metrics are optional: say why they are missing)
            err = f"{target.metrics_url}: {type(e).__name__}: {e}"
    return Snapshot(time.monotonic(), stats, metrics, err)


def _counts(target: Target, s: Snapshot) -> tuple:
    flat = rules.model_stats_delta({}, s.stats).get(target.model, {})
    images = sum(v for (n, lab), v in s.metrics.items() if n in ("glad_images_total", "glad_errors_total")
                 and dict(lab).get("model") == target.model)
    return flat.get("success_count", 0), flat.get("fail_count", 0), images


def settled_snapshot(target: Target, client=None, pause_s: float = 0.25, max_s: float = 5.0) -> Snapshot:
    """A snapshot once the entry model's counts stopped moving: Triton updates a request's statistics after its
    response went out, so a snapshot taken the moment the last answer arrived can miss it. Reads again every
    ``pause_s`` until two reads agree (at most ``max_s``; no load is running then)."""
    s = snapshot(target, client)
    end = time.monotonic() + max_s
    while time.monotonic() < end:
        time.sleep(pause_s)
        nxt = snapshot(target, client)
        if _counts(target, nxt) == _counts(target, s):
            return nxt
        s = nxt
    return s


def server_figures(target: Target, a: Snapshot, b: Snapshot) -> dict:
    """The server's side between two snapshots: ``models`` (:func:`bench.perf.rules.model_figures` of the entry
    model and each network model), ``glad`` (:func:`bench.perf.rules.glad_counters` of the entry model; None
    without metrics) and ``metrics_error``."""
    delta = rules.model_stats_delta(a.stats, b.stats)
    models = {m: rules.model_figures(delta.get(m, {})) for m in (target.model, *target.networks)}
    glad = None
    if a.metrics and b.metrics:
        glad = rules.glad_counters(rules.metrics_delta(a.metrics, b.metrics), target.model)
    return {"models": models, "glad": glad, "metrics_error": b.metrics_error or a.metrics_error,
            "seconds": b.t - a.t}


# ---------------------------------------------------------------------------------------------- figures
def client_figures(records: Sequence[Record], seconds: float) -> dict:
    """The client's side of a set of requests over ``seconds``: counts (``requests`` sent and completed in the
    span, ``ok``, ``errors``, ``rejections``, ``images``, ``images_ok``), ``requests_per_s`` (completed / s,
    perf_analyzer's Inferences/Second for this model), ``images_per_s`` (images scored / s), ``latency_us``
    of the answered requests (:func:`bench.perf.rules.latency_summary`), ``errors_by_type``,
    ``image_errors_by_type``, ``adaptive_steps`` (``{step: images}``; -1: ADS off or undecided) and ``delayed``
    (open loop: sent over 10 ms after the schedule)."""
    ok = [r for r in records if r.error is None]
    errors = Counter(r.error for r in records if r.error is not None)
    img_err = Counter(e for r in ok for e in r.image_errors)
    steps = Counter(s for r in ok for s in r.steps)
    scored = sum(len(r.scores) for r in ok)
    return {"requests": len(records), "ok": len(ok), "errors": sum(errors.values()),
            "rejections": sum(v for k, v in errors.items() if k.startswith("rejected")),
            "images": sum(r.images for r in records), "images_ok": scored,
            "requests_per_s": len(records) / seconds if seconds > 0 else float("nan"),
            "ok_per_s": len(ok) / seconds if seconds > 0 else float("nan"),
            "images_per_s": scored / seconds if seconds > 0 else float("nan"),
            "latency_us": rules.latency_summary([r.latency for r in ok]),
            "errors_by_type": dict(sorted(errors.items())), "image_errors_by_type": dict(sorted(img_err.items())),
            "error_examples": {k: next(r.text for r in records if r.error == k) for k in errors},
            "adaptive_steps": {str(k): v for k, v in sorted(steps.items())},
            "delayed": sum(1 for r in records if r.sent - r.due > _DELAYED_S)}


def _images_counted_by_server(records: Sequence[Record]) -> int:
    """Images the server counts in ``glad_images_total`` + ``glad_errors_total``: every image of an answered
    request, and the one image of a one-image request failed by that image (an ``INVALID_ARGUMENT``)."""
    return sum(r.images for r in records if r.error is None) + \
        sum(r.images for r in records if r.error == "INVALID_ARGUMENT" and r.images == 1)


def _scores(records: Sequence[Record]) -> dict:
    """``{file: first score}`` and the largest difference between two answers for the same file."""
    first: dict[str, float] = {}
    spread = 0.0
    for r in records:
        for name, s in r.scores:
            if name in first:
                spread = max(spread, abs(s - first[name]))
            else:
                first[name] = s
    return {"by_file": dict(sorted(first.items())), "max_spread": spread}


# ---------------------------------------------------------------------------------------------- one point
def measure_point(target: Target, payloads: Payloads, mode: str, load: float, settings: Settings,
                  stop: threading.Event | None = None,
                  on_window: Callable[[dict], None] | None = None) -> dict:
    """Measure one load level on one target (module docstring).

    Args:
        target: from :func:`connect`. payloads: the requests' images.
        mode: ``"concurrency"`` (``load`` workers, closed loop) or ``"request_rate"`` (``load`` requests/s).
        settings: windows or count, deadline, map size, open-loop threads and schedule.
        stop: set (Ctrl-C) to end the point early: sending stops, outstanding requests finish, and what was
            measured is returned with ``interrupted`` true.
        on_window: called after each window with its figures (the progress bar).
    Returns:
        a dict: ``model``, ``target`` (URL), ``protocol``, ``streaming``, ``mode``, ``load``, ``batch_size``,
        ``client`` (:func:`client_figures` of the reported windows), ``windows`` (per window: ``seconds``,
        ``requests``, ``requests_per_s``, ``p99_us``), ``windows_run``, ``stable``, ``server``
        (:func:`server_figures` over the reported windows), ``reconciliation`` (whole point: ``client_requests``,
        ``server_requests``, ``client_images``, ``server_images``, ``match``; plus the reported windows'
        ``window_client_requests`` / ``window_server_requests``), ``scores`` (first score per file, largest spread),
        ``interrupted``, ``worker_errors``.
    Raises:
        UsageError: ``batch_size`` above the model's ``max_images``, or an unknown mode.
    """
    if mode not in ("concurrency", "request_rate"):
        raise UsageError(f"mode must be concurrency or request_rate, got {mode!r}")
    if target.max_images and payloads.batch_size > target.max_images:
        raise UsageError(f"--batch-size {payloads.batch_size} is above {target.model}'s max_images "
                         f"{target.max_images} (such requests are refused whole)")
    stop = stop or threading.Event()
    admin = target.client()
    try:
        warm = settings.warmup_requests
        if warm is None:
            warm = int(load) if mode == "concurrency" else 2
        if warm > 0 and not stop.is_set():  # first calls of each worker / instance, not measured
            w = _Load(target, payloads, "concurrency", int(load) if mode == "concurrency" else 1, settings,
                      limit=warm, first_index=10**9).start()
            _wait(w, stop)
            w.stop()
            w.join()
        s0 = settled_snapshot(target, admin)  # the warm-up's last statistics included
        run = _Load(target, payloads, mode, load, settings,
                    limit=settings.request_count if settings.request_count > 0 else None).start()
        windows: list[dict] = []
        bounds = [s0]
        if settings.request_count > 0:
            _wait(run, stop)
        else:
            for _ in range(settings.max_trials):
                end = bounds[-1].t + settings.interval_s
                if stop.wait(max(0.0, end - time.monotonic())):
                    break
                bounds.append(snapshot(target, admin))
                a, b = bounds[-2].t, bounds[-1].t
                recs = [r for r in list(run.records) if a <= r.done < b]
                ok = [r.latency for r in recs if r.error is None]
                win = {"seconds": b - a, "requests": len(recs), "requests_per_s": len(recs) / (b - a),
                       "p99_us": rules.latency_summary(ok)["p99"]}
                windows.append(win)
                if on_window:
                    on_window(win)
                if rules.is_stable([w["requests_per_s"] for w in windows], [w["p99_us"] for w in windows],
                                   settings.tolerance):
                    break
        interrupted = stop.is_set()
        run.stop()
        run.join(settings.timeout_s + 2 * _GRACE_S)
        s_end = settled_snapshot(target, admin)
        all_records = sorted(run.records, key=lambda r: r.k)
        if settings.request_count > 0 or len(bounds) < 2:
            span_a, span_b = s0, s_end
            measured = all_records
            seconds = (max((r.done for r in all_records), default=s0.t) - run.t0)
        else:
            k = min(rules.STABILITY_WINDOWS, len(windows))
            span_a, span_b = bounds[-1 - k], bounds[-1]
            measured = [r for r in all_records if span_a.t <= r.done < span_b.t]
            seconds = span_b.t - span_a.t
        server = server_figures(target, span_a, span_b)
        whole = server_figures(target, s0, s_end)
        entry_whole = whole["models"][target.model]
        rec = {"client_requests": len(all_records), "server_requests": entry_whole["requests"],
               "client_images": _images_counted_by_server(all_records),
               "server_images": (whole["glad"]["images"] + sum(whole["glad"]["image_errors"].values()))
               if whole["glad"] else None,
               "window_client_requests": len(measured),
               "window_server_requests": server["models"][target.model]["requests"]}
        rec["match"] = rec["client_requests"] == rec["server_requests"] and \
            (rec["server_images"] is None or rec["client_images"] == rec["server_images"])
        stable = settings.request_count > 0 or rules.is_stable(
            [w["requests_per_s"] for w in windows], [w["p99_us"] for w in windows], settings.tolerance)
        return {"model": target.model, "label": target.name, "target": target.url, "protocol": target.protocol,
                "streaming": target.streaming, "mode": mode, "load": load, "batch_size": payloads.batch_size,
                "map_size": settings.map_size, "client": client_figures(measured, seconds), "windows": windows,
                "windows_run": len(windows), "stable": bool(stable and not interrupted),
                "server": server, "reconciliation": rec, "scores": _scores(all_records),
                "interrupted": interrupted, "worker_errors": run.errors,
                "measured_seconds": seconds, "unanswered": run.running()}
    finally:
        admin.close()


def _wait(run: _Load, stop: threading.Event) -> None:
    """Until ``run``'s workers end (its request limit reached) or ``stop`` is set."""
    while run.running() and not stop.is_set():
        time.sleep(0.05)


def dumps(obj) -> str:
    """JSON text of a results dict (NaN written as null: strict JSON)."""
    def clean(x):
        if isinstance(x, float) and not np.isfinite(x):
            return None
        if isinstance(x, dict):
            return {str(k): clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        if isinstance(x, (np.integer,)):
            return int(x)
        if isinstance(x, (np.floating,)):
            return clean(float(x))
        return x

    return json.dumps(clean(obj), indent=2, allow_nan=False)
