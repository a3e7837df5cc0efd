"""Per-image errors in the client SDK without a server (issue 27): the ``errors`` output mapped to typed errors on
that image's Detection (``detections_from_arrays(..., error_for=...)``), only the outputs a model declares requested
(a new client against a server without ``errors``), a bad image answered once and never resent (sync, asyncio and
stream), counted once in the client's counters, and ``health()`` false for an entry model whose network model is not
ready. Fakes stand in for tritonclient; fast."""

from __future__ import annotations

import asyncio
import queue
import threading

import numpy as np
import pytest

from glad_runtime.core.detection import Detection
from glad_runtime.errors import (BadInputError, ImageLoadError, ImageTooLargeError, InvalidInputError,
                                 ServerUnavailableError, ServingError)
from glad_runtime.serving import protocol, routing
from glad_runtime.serving.client import AsyncGladClient, GladClient, plan, requested_outputs, streaming

tritonutils = pytest.importorskip("tritonclient.utils")
ISE = tritonutils.InferenceServerException

#: the error the fake server gives an image whose first pixel has this value (per image, or whole request)
BAD = {0.5: ImageTooLargeError("image_files[k]: 12000 x 12000 = 144000000 pixels, over the limit of 100000000",
                               144_000_000, 100_000_000),
       0.75: ServerUnavailableError("model closing", "UNAVAILABLE")}
LEGACY_OUTPUTS = tuple(n for n in protocol.GLAD_OUTPUT_NAMES if n != protocol.ERRORS_OUTPUT)


def _config(outputs=protocol.GLAD_OUTPUT_NAMES, version="2", graphs="unet,vae_encoder,vae_decoder,dino") -> dict:
    params = {"dino_resolution": {"string_value": "4"}, "model_prefix": {"string_value": "tiny"},
              "model_version": {"string_value": version}, "served_graphs": {"string_value": graphs}}
    return {"config": {"name": "tiny_glad", "max_batch_size": 4, "parameters": params,
                       "input": [{"name": "images", "dims": ["3", "8", "8"]}, {"name": "image_files", "dims": ["1"]}],
                       "output": [{"name": n, "data_type": "TYPE_FP32", "dims": ["1"]} for n in outputs]}}


def _scored(source: str, value: float) -> Detection:
    return Detection(source=source, score=value, ads_state="off", adaptive_step=-1, original_size=(4, 4),
                     anomaly_map=np.full((4, 4), value, np.float32))


def _arrays(values, per_image_errors: bool) -> dict:
    """What the served model returns for images whose first pixels are ``values`` (a BAD value fails that image;
    without per-image errors, the caller raised before)."""
    dets = [Detection(source=f"#{k}", error=BAD[v]) if per_image_errors and v in BAD else _scored(f"#{k}", v)
            for k, v in enumerate(values)]
    return protocol.glad_output_arrays(dets, "working")


class Result:
    """``InferResult`` of a fake: ``as_numpy`` of a requested output, None for any other (as tritonclient)."""

    def __init__(self, arrays: dict, requested):
        self.arrays, self.requested = arrays, set(requested)

    def as_numpy(self, name):
        return self.arrays.get(name) if name in self.requested else None


class FakeServer:
    """``tritonclient.grpc.InferenceServerClient`` of one replica serving ``tiny_glad``. ``errors``: the model
    declares the ``errors`` output (issue 27: a bad image fails alone inside the answer); without it (an older
    server) a bad image refuses the whole request with INVALID_ARGUMENT. Every image received is counted (the
    server's ``glad_errors_total`` is one per bad image received)."""

    def __init__(self, errors: bool = True, whole=None):
        self.errors, self.whole = errors, whole
        self.received: list[float] = []
        self.requests: list[list[str]] = []  # the outputs each infer asked for
        self.lock = threading.Lock()

    def get_model_config(self, name, as_json=True, client_timeout=None):
        return _config(protocol.GLAD_OUTPUT_NAMES if self.errors else LEGACY_OUTPUTS)

    def infer(self, name, inputs, outputs=None, **kw):
        requested = [o.name() for o in outputs]
        batch = np.frombuffer(inputs[0]._raw_content, np.float32).reshape(inputs[0].shape()[0], -1)
        values = [float(v) for v in batch[:, 0]]
        with self.lock:
            self.requests.append(requested)
            self.received += values
        unknown = [n for n in requested if n == protocol.ERRORS_OUTPUT and not self.errors]
        if unknown:
            raise ISE(f"unexpected inference output '{unknown[0]}' for model '{name}'",
                      status="StatusCode.INVALID_ARGUMENT")
        if self.whole is not None:
            raise self.whole
        if not self.errors and any(v in BAD for v in values):
            k = next(k for k, v in enumerate(values) if v in BAD)
            raise ISE(f"images[{k}]: values refused", status="StatusCode.INVALID_ARGUMENT")
        return Result(_arrays(values, self.errors), requested)


def _client(fakes: dict, cls=GladClient, **kw):
    c = cls(list(fakes), "tiny", **dict(dict(timeout=10.0, backoff=0.01, cooldown=0.05), **kw))
    c._client = lambda url, fresh=False: fakes[url]
    return c


def _img(v: float) -> np.ndarray:
    return np.full((3, 8, 8), v, np.float32)


# ---------------------------------------------------------------------------------------------- pure
def test_errors_output_maps_to_typed_errors_naming_the_source():
    dets = [_scored("#0", 0.1), Detection(source="#1", error=ImageTooLargeError("image_files[1]: too many pixels")),
            Detection(source="#2", error=ImageLoadError("image_files[2]: not a readable image")),
            Detection(source="#3", error=ServerUnavailableError("in-flight pool full", "UNAVAILABLE")),
            Detection(source="#4", error=RuntimeError("tiny_unet returned NaN"))]
    arrays = protocol.glad_output_arrays(dets, "working")
    assert arrays["errors"][0] == b"" and arrays["errors"][1].startswith(b"[INVALID_ARGUMENT] ImageTooLargeError: ")
    sources = ["good.png", "huge.tif", "broken.png", "#3", "cell.png"]
    got = protocol.detections_from_arrays(arrays, sources, error_for=lambda s, m: plan.image_error(
        s, m, "h:8001"), server="h:8001")
    assert got[0].ok and got[0].score == pytest.approx(0.1) and got[0].server == "h:8001"
    huge, broken, full, nan = (d.error for d in got[1:])
    assert type(huge) is BadInputError and isinstance(huge, ValueError) and huge.status == "INVALID_ARGUMENT"
    assert str(huge).startswith("huge.tif: ImageTooLargeError: ") and huge.retryable is False
    assert type(broken) is BadInputError and "broken.png: ImageLoadError: image_files[2]" in str(broken)
    assert type(full) is ServerUnavailableError and full.retryable and full.status == "UNAVAILABLE"
    assert type(nan) is ServingError and nan.status == "INTERNAL" and "cell.png: RuntimeError" in str(nan)
    assert all(d.url == "h:8001" for d in (huge, broken, full, nan))
    assert all(d.score is None for d in got[1:])
    # no errors output (a server before it): every image counts as scored
    legacy = {k: v for k, v in protocol.glad_output_arrays([_scored("#0", 0.2)], "working").items()
              if k != protocol.ERRORS_OUTPUT}
    (only,) = protocol.detections_from_arrays(legacy, ["a.png"], error_for=routing.error_for)
    assert only.ok and only.score == pytest.approx(0.2)


def test_requested_outputs_follow_the_declared_ones():
    outputs, missing = requested_outputs(_config()["config"])
    assert outputs == protocol.GLAD_OUTPUT_NAMES and protocol.ERRORS_OUTPUT in outputs and not missing
    outputs, missing = requested_outputs(_config(LEGACY_OUTPUTS)["config"])
    assert outputs == LEGACY_OUTPUTS and protocol.ERRORS_OUTPUT not in outputs and not missing
    shuffled = _config(tuple(reversed(protocol.GLAD_OUTPUT_NAMES)) + ("extra",))["config"]
    assert requested_outputs(shuffled)[0] == protocol.GLAD_OUTPUT_NAMES  # contract order, unknown ones left out
    outputs, missing = requested_outputs(_config(LEGACY_OUTPUTS[1:])["config"])
    assert missing == ["scores"]
    c = GladClient("x:1", "tiny")
    meta = c._parse_config(_config(LEGACY_OUTPUTS)["config"])
    assert meta["outputs"] == LEGACY_OUTPUTS and meta["errors"] is False
    assert c._parse_config(_config()["config"])["errors"] is True
    with pytest.raises(ServingError, match="scores"):
        c._parse_config(_config(LEGACY_OUTPUTS[1:])["config"])


# ---------------------------------------------------------------------------------------------- detect
def test_detect_good_bad_good_gives_three_detections_and_sends_the_bad_one_once():
    server = FakeServer(errors=True)
    c = _client({"a:1": server})
    dets = c.detect([_img(0.1), _img(0.5), _img(0.2)])
    assert len(dets) == 3 and dets[0].ok and dets[2].ok
    assert [d.score for d in (dets[0], dets[2])] == pytest.approx([0.1, 0.2])
    bad = dets[1]
    assert type(bad.error) is BadInputError and str(bad.error).startswith("#1: ImageTooLargeError: ")
    assert bad.server == "a:1" and bad.error.url == "a:1"
    assert server.received == pytest.approx([0.1, 0.5, 0.2])  # one request: the bad image reached it once
    assert server.requests == [list(protocol.GLAD_OUTPUT_NAMES)]  # errors asked for: the model declares it
    s = c.stats()
    assert s["calls"] == 2 and s["retries"] == 0  # the config, one infer
    assert s["attempt_errors"] == {"BadInputError": 1} and s["raised"] == {"BadInputError": 1}
    assert s["replicas"]["a:1"]["state"] == "closed" and s["replicas"]["a:1"]["failures"] == 0
    # an UNAVAILABLE image error is the image's too: on its Detection (retryable, for the caller), not resent
    dets = c.detect([_img(0.75), _img(0.3)])
    assert type(dets[0].error) is ServerUnavailableError and dets[0].error.retryable and dets[1].ok
    assert server.received[-2:] == pytest.approx([0.75, 0.3]) and len(server.received) == 5


def test_two_replicas_a_bad_image_is_not_resent_elsewhere():
    a, b = FakeServer(), FakeServer()
    c = _client({"a:1": a, "b:1": b})
    for _ in range(4):
        dets = c.detect([_img(0.5)])
        assert type(dets[0].error) is BadInputError
    assert len(a.received) + len(b.received) == 4  # each bad image sent once, to one replica
    assert c.stats()["raised"] == {"BadInputError": 4} and c.stats()["retries"] == 0


def test_a_request_refused_whole_fails_its_images_without_resending():
    """Malformed as a whole (INVALID_ARGUMENT for the request, or Triton's parser 500): each image gets the
    refusal, nothing raised, nothing resent, counted once."""
    for whole in (ISE("unexpected shape for input 'images' for model 'tiny_glad'. Expected [-1,3,8,8], got "
                      "[3,3,8,9]", status="StatusCode.INVALID_ARGUMENT"),
                  ISE("failed to parse the request JSON buffer: Invalid value. at 0", status="500")):
        server = FakeServer(whole=whole)
        c = _client({"a:1": server})
        dets = c.detect([_img(0.1), _img(0.2), _img(0.3)])
        assert [type(d.error) for d in dets] == [BadInputError] * 3
        assert [str(d.error).split(":")[0] for d in dets] == ["#0", "#1", "#2"]
        assert len(server.received) == 3 and len(server.requests) == 1
        assert c.stats()["raised"] == {"BadInputError": 1}


def test_older_server_without_errors_output():
    """A new client against a model without ``errors``: it is not asked for (Triton would refuse the request),
    every returned image counts as scored, and a refused request is split to find the refused image (the only
    way there)."""
    server = FakeServer(errors=False)
    c = _client({"a:1": server})
    dets = c.detect([_img(0.1), _img(0.2)])
    assert all(d.ok for d in dets) and server.requests == [list(LEGACY_OUTPUTS)]
    assert c.metadata()["errors"] is False
    dets = c.detect([_img(0.1), _img(0.5), _img(0.2)])
    assert [d.ok for d in dets] == [True, False, True] and type(dets[1].error) is BadInputError
    assert "#1" in str(dets[1].error)
    assert all(protocol.ERRORS_OUTPUT not in r for r in server.requests)


def test_a_failed_image_without_error_text_is_not_taken_for_a_score():
    """The output ``errors`` not asked for (the metadata came from an older replica) but the image failed on a
    newer one: its sentinel score (-1) marks it failed, not scored."""
    server = FakeServer(errors=True)
    c = _client({"a:1": server})
    c._meta = c._parse_config(_config(LEGACY_OUTPUTS)["config"])
    dets = c.detect([_img(0.5), _img(0.25)])
    assert type(dets[0].error) is ServingError and "could not score" in str(dets[0].error)
    assert dets[1].ok and dets[1].score == pytest.approx(0.25)


def test_async_client_per_image_errors():
    class AsyncServer(FakeServer):
        async def get_model_config(self, name, as_json=True, client_timeout=None):
            return FakeServer.get_model_config(self, name)

        async def infer(self, name, inputs, **kw):
            await asyncio.sleep(0)
            return FakeServer.infer(self, name, inputs, **kw)

    server = AsyncServer()
    c = _client({"a:1": server}, cls=AsyncGladClient)
    dets = asyncio.run(c.detect([_img(0.1), _img(0.5), _img(0.2)]))
    assert [d.ok for d in dets] == [True, False, True] and type(dets[1].error) is BadInputError
    assert len(server.received) == 3 and c.stats()["raised"] == {"BadInputError": 1}


# ---------------------------------------------------------------------------------------------- stream
class FakeStreams:
    """Stands in for ``client.streaming.Streams``: each request is answered at once by ``answer(url, request)``, which
    returns ``(error_message, arrays)``; the answer lands in the client's event queue like a real stream's."""

    sent: list = []
    answer = None

    def __init__(self, events):
        self.events = events

    def send(self, url, request):
        from tritonclient.grpc import service_pb2
        from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

        FakeStreams.sent.append((url, request))
        error, arrays = FakeStreams.answer(url, request)
        reply = service_pb2.ModelStreamInferResponse(error_message=error or "")
        reply.infer_response.id = request.id
        for o in request.outputs:
            a = arrays[o.name] if arrays else None
            if a is None:
                continue
            t = reply.infer_response.outputs.add()
            t.name, t.datatype = o.name, np_to_triton_dtype(a.dtype)
            a = protocol.to_wire(a)
            t.shape.extend(a.shape)
            reply.infer_response.raw_output_contents.append(
                serialize_byte_tensor(a).item() if a.dtype == np.object_ else a.tobytes())
        self.events.put(("response", url, 1, reply))
        return 1

    def forget(self, url, token):
        pass

    def close(self):
        pass


def _value(request) -> float:
    return float(np.frombuffer(request.raw_input_contents[0], np.float32)[0])


def test_stream_per_image_error_is_yielded_once_and_not_resent(monkeypatch):
    monkeypatch.setattr(streaming, "Streams", FakeStreams)
    FakeStreams.sent = []
    FakeStreams.answer = staticmethod(lambda url, r: (None, _arrays([_value(r)], True)))
    c = _client({"a:1": FakeServer()})
    out = list(c.stream([_img(0.1), _img(0.5), _img(0.2)], window=2))
    assert sorted(d.source for d in out) == ["#0", "#1", "#2"]
    by = {d.source: d for d in out}
    assert by["#0"].ok and by["#2"].ok and type(by["#1"].error) is BadInputError
    assert "ImageTooLargeError" in str(by["#1"].error)
    assert len(FakeStreams.sent) == 3  # the bad image sent once
    assert [o.name for o in FakeStreams.sent[0][1].outputs] == list(protocol.GLAD_OUTPUT_NAMES)
    s = c.stats()
    assert s["raised"] == {"BadInputError": 1} and s["attempt_errors"] == {"BadInputError": 1} and s["retries"] == 0


def test_stream_back_pressure_is_retried_until_the_deadline(monkeypatch):
    """``[UNAVAILABLE] in-flight pool full`` for the first 12 answers on the only replica: the image is resent
    (more than the old 4 rounds) and answered within its deadline; the per-image outputs a legacy model lacks are
    not asked for."""
    monkeypatch.setattr(streaming, "Streams", FakeStreams)
    FakeStreams.sent = []
    full = protocol.tag_stream_error("UNAVAILABLE", "in-flight pool full: 8 active, 32 queued")
    FakeStreams.answer = staticmethod(lambda url, r: (full, None) if len(FakeStreams.sent) <= 12 else
                                      (None, _arrays([_value(r)], False)))
    c = _client({"a:1": FakeServer(errors=False)}, timeout=20.0, backoff=0.005, max_backoff=0.02, cooldown=0.01)
    (d,) = list(c.stream([_img(0.3)]))
    assert d.ok and d.score == pytest.approx(0.3) and len(FakeStreams.sent) == 13
    assert all(protocol.ERRORS_OUTPUT not in [o.name for o in r.outputs] for _, r in FakeStreams.sent)
    assert c.stats()["attempt_errors"] == {"ServerUnavailableError": 12} and c.stats()["raised"] == {}


# ---------------------------------------------------------------------------------------------- health
class HealthServer:
    def __init__(self, ready: dict, index=None):
        self.ready, self.index = ready, index
        self.asked: list = []

    def is_server_live(self, client_timeout=None):
        return True

    def is_model_ready(self, name, model_version="", client_timeout=None):
        self.asked.append((name, model_version))
        if name not in self.ready:
            raise ISE(f"Request for unknown model: '{name}' is not found", status="StatusCode.NOT_FOUND")
        return self.ready[name]

    def get_model_config(self, name, as_json=True, client_timeout=None):
        return _config()

    def get_model_repository_index(self, as_json=True, client_timeout=None):
        names = self.index if self.index is not None else list(self.ready)
        return {"models": [{"name": n, "version": "2", "state": "READY"} for n in names]}


def test_health_is_false_when_a_network_model_of_the_entry_model_is_not_ready():
    nets = ["tiny_unet", "tiny_vae_encoder", "tiny_vae_decoder", "tiny_dino"]
    full = HealthServer({"tiny_glad": True, **{n: True for n in nets}})
    partial = HealthServer({"tiny_glad": True, **{n: n != "tiny_unet" for n in nets}},
                           index=["tiny_glad"] + nets)  # the index still lists a READY tiny_unet (version 1)
    gone = HealthServer({"tiny_glad": True, **{n: True for n in nets if n != "tiny_dino"}})  # not in the index
    c = _client({"full:1": full, "partial:1": partial, "gone:1": gone})
    assert c.health() == {"full:1": True, "partial:1": False, "gone:1": False}
    assert ("tiny_unet", "2") in partial.asked  # asked at the entry model's own version
    assert c.pool.state("partial:1") == "open" and c.pool.state("full:1") == "closed"
    why = c.pool.last_errors()
    assert "tiny_unet (version 2)" in str(why["partial:1"]) and "tiny_dino" in str(why["gone:1"])
    assert c.ready()
    entry_down = HealthServer({"tiny_glad": False, **{n: True for n in nets}})
    assert _client({"e:1": entry_down}).health() == {"e:1": False}
