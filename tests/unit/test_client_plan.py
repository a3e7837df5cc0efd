"""The client SDK's pure parts without a server (issue 29, item 3): request planning (inputs, the outputs a server
declares, chunking, parameters, deadline), response parsing (arrays -> Detections with per-image errors), the
detect plan (refusals, splitting against an older server) and the step-generator drivers the sync and asyncio
clients share (errors thrown back in, cancellation releasing the replica)."""

from __future__ import annotations

import asyncio
from functools import partial

import numpy as np
import pytest
from PIL import Image as PILImage

from glad_runtime.core.calibration import Calibration
from glad_runtime.core.detection import Detection
from glad_runtime.errors import (BadInputError, ImageTooLargeError, ServerUnavailableError, ServingError)
from glad_runtime.serving import protocol
from glad_runtime.serving.client import core, plan

LEGACY = tuple(n for n in protocol.GLAD_OUTPUT_NAMES if n not in protocol.LATER_OUTPUTS)


def _config(outputs=protocol.GLAD_OUTPUT_NAMES, max_batch_size=0, **params) -> dict:
    params = {k: {"string_value": str(v)} for k, v in dict(dict(dino_resolution=4), **params).items()}
    return {"name": "tiny_glad", "max_batch_size": max_batch_size, "parameters": params,
            "input": [{"name": "images", "dims": ["-1", "3", "8", "8"]}, {"name": "image_files", "dims": ["-1", "1"]}],
            "output": [{"name": n} for n in outputs]}


def _info(outputs=protocol.GLAD_OUTPUT_NAMES, max_images=3) -> dict:
    return plan.parse_config(_config(outputs, max_images=max_images), "tiny_glad")


def _scored(source: str, value: float) -> Detection:
    return Detection(source=source, score=value, ads_state="off", adaptive_step=-1, original_size=(4, 4),
                     anomaly_map=np.full((4, 4), value, np.float32))


# ---------------------------------------------------------------------------------------------- inputs
def test_prepare_every_input_kind(tmp_path):
    path = tmp_path / "a.png"
    PILImage.fromarray(np.zeros((5, 7), np.uint8)).save(path)
    got = [plan.prepare(x, i, 8) for i, x in enumerate(
        [str(path), path, b"raw", np.zeros((5, 7), np.uint16), np.zeros((5, 7, 3), np.uint8),
         PILImage.new("RGB", (4, 4)), np.zeros((3, 8, 8), np.float64)])]
    assert [g.kind for g in got] == [plan.FILES] * 6 + [plan.TENSOR]
    assert got[0].source == str(path) and got[2].source == "#2" and got[0].payload == path.read_bytes()
    assert got[3].payload.startswith(b"\x89PNG") and got[6].payload.dtype == np.float32
    for bad, match in [(str(tmp_path / "missing.png"), "cannot open"), (np.zeros((3, 8, 9), np.float32), "expected"),
                       (np.full((3, 8, 8), np.nan, np.float32), "NaN"), (np.zeros((4, 4), np.int32), "arrays must"),
                       (object(), "unsupported")]:
        with pytest.raises(BadInputError, match=match):
            plan.prepare(bad, 0, 8)
    slots, good = plan.prepare_all([b"x", object(), np.zeros((3, 8, 8), np.float32)], 8)
    assert slots[0] is None and slots[2] is None and type(slots[1].error) is BadInputError
    assert [g.index for g in good] == [0, 2] and slots[1].source == "#1"


# ---------------------------------------------------------------------------------------------- the server
def test_parse_config_asks_only_for_declared_outputs():
    info = _info()
    assert info["outputs"] == protocol.GLAD_OUTPUT_NAMES and info["errors"] and info["max_batch"] == 3
    assert info["resolution"] == 8 and info["dino_resolution"] == 4 and info["calibration"] is None
    older = _info(LEGACY)
    assert older["outputs"] == LEGACY and not older["errors"]
    assert plan.parse_config(_config(max_batch_size=5), "m")["max_batch"] == 5  # no max_images: the batch size
    with pytest.raises(ServingError, match="scores"):
        plan.parse_config(_config(LEGACY[1:]), "tiny_glad")
    no_files = _config()
    no_files["input"] = no_files["input"][:1]
    with pytest.raises(ServingError, match="image_files"):
        plan.parse_config(no_files, "tiny_glad")


def test_a_new_contract_output_is_followed_without_a_client_change(monkeypatch):
    """The client derives its outputs from the contract: an output added there (a later one) is asked for where the
    server declares it and left out where it does not."""
    monkeypatch.setattr(protocol, "GLAD_OUTPUT_NAMES", protocol.GLAD_OUTPUT_NAMES + ("new_field",))
    monkeypatch.setattr(protocol, "LATER_OUTPUTS", protocol.LATER_OUTPUTS + ("new_field",))
    assert _info(protocol.GLAD_OUTPUT_NAMES)["outputs"][-1] == "new_field"
    assert "new_field" not in _info(LEGACY)["outputs"]


def test_health_helpers():
    cfg = _config(model_prefix="tiny", model_version="2", served_graphs="unet, dino")
    assert plan.network_models(cfg, "x") == [("tiny_unet", "2"), ("tiny_dino", "2")]
    index = {"models": [{"name": "tiny_glad", "state": "READY"}, {"name": "tiny_dino", "state": "UNAVAILABLE"}]}
    assert plan.health_verdict([("tiny_unet", "2")], index, "tiny") == \
        (False, "not ready: tiny_unet (version 2), tiny_dino")
    assert plan.health_verdict([], {"models": [{"name": "tiny_glad", "state": "READY"}]}, "tiny") == (True, "")


# ---------------------------------------------------------------------------------------------- requests
def test_requests_are_runs_of_one_kind_up_to_max_batch():
    info = _info(max_images=2)
    images = [plan.prepare(x, i, 8) for i, x in enumerate(
        [b"a", b"b", b"c", np.zeros((3, 8, 8), np.float32), np.ones((3, 8, 8), np.float32), b"d"])]
    reqs = plan.plan_requests(images, info)
    assert [r.sources for r in reqs] == [["#0", "#1"], ["#2"], ["#3", "#4"], ["#5"]]
    files, tensors = reqs[0], reqs[2]
    assert (files.input, files.datatype, files.array.shape, files.array.dtype) == ("image_files", "BYTES", (2, 1),
                                                                                    np.object_)
    assert (tensors.input, tensors.datatype, tensors.array.shape) == ("images", "FP32", (2, 3, 8, 8))
    assert files.outputs == protocol.GLAD_OUTPUT_NAMES and dict(files.parameters) == {"map_size": "working"}
    assert plan.deadline_kwargs(2.5) == {"client_timeout": 2.5, "timeout": 2_500_000}
    assert plan.deadline_kwargs(0.0) == {"client_timeout": 1e-3, "timeout": 1}  # never "no timeout"


@pytest.mark.parametrize("errors_served", [True, False])
def test_detect_plan_refusals(errors_served):
    """A request refused whole: every image gets the refusal (``errors`` served), or, against an older server, the
    request is resent one image at a time and only the refused image fails."""
    info = _info(protocol.GLAD_OUTPUT_NAMES if errors_served else LEGACY, max_images=4)
    job = plan.DetectPlan([b"a", object(), b"b", b"c"], info)
    assert job.results[1] is not None and type(job.results[1].error) is BadInputError  # never sent
    sent = []
    while (req := job.next()) is not None:
        sent.append(req.sources)
        if req.sources == ["#0", "#2", "#3"] or req.sources == ["#2"]:
            job.answer(BadInputError("images[1]: refused", "INVALID_ARGUMENT"))
        else:
            job.answer([_scored(s, 0.1) for s in req.sources])
    if errors_served:
        assert sent == [["#0", "#2", "#3"]]
        assert [str(d.error).split(":")[0] for d in job.results] == ["#0", "#1", "#2", "#3"]
    else:
        assert sent == [["#0", "#2", "#3"], ["#0"], ["#2"], ["#3"]]
        assert [d.ok for d in job.results] == [True, False, False, True]
        assert str(job.results[2].error).startswith("#2: images[1]: refused")


# ---------------------------------------------------------------------------------------------- answers
def test_parse_response_labels_and_per_image_errors():
    cal = Calibration(rule="normal_quantile", image_threshold=0.3, image_min=0.0, image_max=1.0, n_images=10,
                      n_normal=10)
    dets = [_scored("#0", 0.2), Detection(source="#1", error=ImageTooLargeError("image_files[1]: too large")),
            _scored("#2", 0.5)]
    arrays = {k: protocol.to_wire(v) for k, v in protocol.glad_output_arrays(dets, "working").items()}
    info = dict(_info(), calibration=cal)
    got = plan.parse_response(arrays, ["a.png", "b.png", "c.png"], info, None, "h:1")
    assert [d.label for d in got] == ["normal", None, "anomalous"] and got[0].server == "h:1"
    assert type(got[1].error) is BadInputError and str(got[1].error).startswith("b.png: ImageTooLargeError")
    assert got[1].error.url == "h:1"
    assert [d.label for d in plan.parse_response(arrays, ["a", "b", "c"], info, 0.1, "h:1")] == \
        ["anomalous", None, "anomalous"]  # a client threshold relabels
    # errors not returned: a failed image is known by its sentinel score, not taken for a score
    no_text = dict(arrays, errors=None)
    got = plan.parse_response(no_text, ["a", "b", "c"], info, None, "h:1")
    assert got[0].ok and type(got[1].error) is ServingError and got[1].error.status == "INTERNAL"
    err = plan.image_error("UNAVAILABLE", "x: ServerUnavailableError: closing", "h:2")
    assert type(err) is ServerUnavailableError and err.retryable and err.url == "h:2"


# ---------------------------------------------------------------------------------------------- drivers
def _steps(log: list):
    """A step generator: two calls, the second failing (thrown back in and caught), then a return value."""
    first = yield partial(log.append, "one")
    try:
        yield partial(int, "not a number")
    except ValueError as e:
        log.append(f"caught {type(e).__name__}")
    return first, "done"


def test_sync_and_async_drivers_run_the_same_steps():
    log: list = []
    assert core.run(_steps(log)) == (None, "done") and log == ["one", "caught ValueError"]

    async def append(x):
        log.append(x)

    def async_steps():
        got = yield partial(append, "a")
        try:
            yield partial(asyncio.sleep, "not a number")
        except TypeError:
            log.append("caught")
        return got, "done"
    log.clear()
    assert asyncio.run(core.run_async(async_steps())) == (None, "done") and log == ["a", "caught"]


def test_a_cancelled_async_call_releases_its_replica_without_blame():
    from glad_runtime.serving.client import AsyncGladClient

    started = asyncio.Event()

    class Hanging:
        async def get_model_config(self, name, as_json=True, client_timeout=None):
            return {"config": _config()}

        async def infer(self, *a, **kw):
            started.set()
            await asyncio.sleep(60)

    c = AsyncGladClient("a:1", "tiny", timeout=30)
    c._client = lambda url, fresh=False: Hanging()

    async def main():
        task = asyncio.create_task(c.detect([np.zeros((3, 8, 8), np.float32)]))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    asyncio.run(main())
    replica = c.stats()["replicas"]["a:1"]
    assert replica["outstanding"] == 0 and replica["failures"] == 0 and replica["state"] == "closed"
