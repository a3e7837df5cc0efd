"""One engine specification and the backend table (issue 29, item 2): ``EngineSpec`` checks against the backend's
row with typed errors, ``open_engines`` dispatches from the table and types the backend's failures, the CLI's
engine options are made from the table, and a new backend with one option of its own is a module plus one row
(here: a row registered by the test). Stub engines only: no networks."""

from __future__ import annotations

import dataclasses

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import StubEngines, stub_config
from glad_runtime.core.bundle import Bundle
from glad_runtime.detector import Detector
from glad_runtime.engines import BACKENDS, Backend, BackendOption, EngineSpec, open_engines, register_backend
from glad_runtime.errors import (BundleError, ConfigError, EngineError, EngineFilesError, EngineSpecError,
                                 MissingExtraError, UsageError)


@pytest.fixture
def bundle(tmp_path):
    b = Bundle.create(tmp_path / "b", stub_config())
    (b.file("weights") / "w.bin").write_bytes(b"weights")
    b.write_manifest()
    return b


@pytest.fixture
def toy():
    """A new backend with one option of its own (``gain``, flag ``--toy-gain``), registered with
    :func:`register_backend` for the test only: its factory returns stub engines with that gain. Yields the specs
    it opened."""
    opened = []

    def factory(bundle, spec):
        opened.append(spec)
        return StubEngines(gain=spec.options["gain"])

    row = Backend("toy", factory, help="stub engines with a gain", extra="runtime", precisions=("fp32", "fp16"),
                  threads=True, options=(BackendOption("gain", float, "the stub's gain", default=0.3,
                                                       flag="--toy-gain", metavar="G"),))
    assert register_backend(row) is None
    try:
        yield opened
    finally:
        BACKENDS.pop("toy")


# ---------------------------------------------------------------------------------------------- the spec
def test_spec_defaults_come_from_the_row():
    assert EngineSpec() == EngineSpec("torch", "fp32", None, 0, "cpu", 16, {})
    ort = EngineSpec("ort")
    assert (ort.precision, ort.provider, ort.device) == ("fp32", "cpu", None)
    tri = EngineSpec("triton", options={"url": "h:1"})
    assert tri.precision is None and dict(tri.options) == {"url": "h:1", "model_prefix": None, "shared_memory": False}
    assert EngineSpec("torch", device="cuda:1").device == "cuda:1"
    assert EngineSpec.of("triton", url="h:1", shared_memory=True, max_batch=4) == EngineSpec(
        "triton", max_batch=4, options={"url": "h:1", "shared_memory": True})
    with pytest.raises(TypeError):
        tri.options["url"] = "other"  # read-only once checked
    assert hash(ort) == hash(EngineSpec("ort"))


@pytest.mark.parametrize("kwargs, words", [
    (dict(backend="onnx"), ["backend must be one of torch, ort", "'onnx'"]),
    (dict(backend="ort", precision="bf16"), ["'ort' accepts precision fp32 / fp16 / int8", "'bf16'"]),
    (dict(backend="openvino", provider="cuda"), ["'openvino' accepts provider cpu", "'cuda'"]),
    (dict(backend="torch", provider="cuda"), ["'torch' has no provider setting"]),
    (dict(backend="ort", device="cuda"), ["'ort' has no device setting"]),
    (dict(backend="torch", device="cuda:x"), ["'torch' accepts device cpu / cuda / auto", "'cuda:x'"]),
    (dict(backend="mix", precision="fp16"), ["'mix' has no precision setting"]),
    (dict(backend="torch", device="auto:1"), ["'torch' accepts device cpu / cuda / auto", "'auto:1'"]),
    (dict(backend="ort", precision="fp32:9"), ["'ort' accepts precision", "'fp32:9'"]),
    (dict(backend="torch", threads=2), ["'torch' has no thread setting"]),
    (dict(backend="ort", threads=-1), ["threads must be an integer >= 0"]),
    (dict(backend="ort", max_batch=0), ["max_batch must be an integer >= 1"]),
    (dict(backend="ort", options={"url": "h:1"}), ["'ort' has no option 'url'", "its options: none"]),
    (dict(backend="triton"), ["'triton' needs the option 'url' (--server HOST:PORT)"]),
    (dict(backend="triton", options={"url": "h:1", "shared_memory": "yes"}), ["'shared_memory'", "must be a bool"]),
])
def test_spec_refuses_what_the_backend_cannot_honour(kwargs, words):
    with pytest.raises(EngineSpecError) as e:
        EngineSpec(**kwargs)
    assert isinstance(e.value, UsageError) and isinstance(e.value, ValueError)  # exit code 2; old except clauses
    assert all(w in str(e.value) for w in words), str(e.value)


def test_spec_replace_checks_again():
    spec = EngineSpec("ort", threads=2)
    assert spec.replace(max_batch=3).max_batch == 3 and spec.replace(max_batch=3).threads == 2
    with pytest.raises(EngineSpecError, match="'torch' has no thread setting"):  # ort's settings, checked again
        spec.replace(backend="torch")


def test_spec_accepts_the_neutral_value_of_a_setting_the_backend_lacks():
    """A command line that spells out the defaults works with every backend (``--precision fp32 --device cpu
    --provider cpu``): what the backend does anyway is no conflict; the setting is then None."""
    assert EngineSpec("mix", precision="fp32").precision is None
    assert EngineSpec("ort", device="cpu").device is None
    assert EngineSpec("torch", provider="cpu").provider is None
    assert EngineSpec("triton", precision="fp32", options={"url": "h:1"}).precision is None
    assert EngineSpec("torch", device="cuda:1").device == "cuda:1"


# ---------------------------------------------------------------------------------------------- dispatch
def _row_raising(monkeypatch, name, error):
    def factory(bundle, spec):
        raise error

    monkeypatch.setitem(BACKENDS, name, dataclasses.replace(BACKENDS[name], factory=factory))


@pytest.mark.parametrize("error, typed, words", [
    (BundleError("onnx/unet.onnx modified since export"), EngineFilesError, ["unet.onnx"]),
    (FileNotFoundError("weights/arch.json"), EngineFilesError, ["backend 'ort': weights/arch.json"]),
    (ModuleNotFoundError("No module named 'onnxruntime'", name="onnxruntime"), MissingExtraError,
     ["backend 'ort' needs onnxruntime", "install the 'onnx' extra", "glad-toolkit[onnx]"]),
    (ValueError("provider 'cuda' needs onnxruntime-gpu"), EngineSpecError, ["backend 'ort': provider 'cuda'"]),
    (EngineError("server unreachable"), EngineError, ["unreachable"]),
])
def test_open_engines_types_the_backends_failures(monkeypatch, bundle, error, typed, words):
    _row_raising(monkeypatch, "ort", error)
    with pytest.raises(typed) as e:
        open_engines(bundle, EngineSpec("ort"))
    assert all(w in str(e.value) for w in words), str(e.value)
    if typed is EngineFilesError:  # still a BundleError for `except BundleError`, and a usage error (exit 2)
        assert isinstance(e.value, BundleError) and isinstance(e.value, UsageError) and e.value.__cause__ is error
    if typed is MissingExtraError:
        assert (e.value.module, e.value.extra) == ("onnxruntime", "onnx")
    # Detector.open raises the same typed errors itself
    with pytest.raises(typed):
        Detector.open(bundle.path, EngineSpec("ort"))


def test_detector_open_is_the_one_way(bundle, stub_backends):
    det = Detector.open(bundle.path, EngineSpec("ort", threads=2, max_batch=3), config_changes={"top_k": 2},
                        threshold=0.5)
    assert isinstance(det.engines, StubEngines) and det.config.top_k == 2 and det.threshold == 0.5
    assert stub_backends == [EngineSpec("ort", threads=2, max_batch=3)]
    assert Detector.open(bundle, "openvino").bundle.path == bundle.path  # a name: the backend's defaults
    with pytest.raises(ConfigError, match="config change refused"):
        Detector.open(bundle, "ort", config_changes={"no_such_field": 1})
    with pytest.raises(EngineSpecError):
        Detector.open(bundle, "onnx")
    with pytest.raises(BundleError):  # not a bundle: a BundleError (exit 1), not an engine files error
        Detector.open(bundle.path / "missing", "ort")


# ---------------------------------------------------------------------------------------------- a new backend
def test_a_new_backend_with_one_option_is_one_row(toy, bundle, tmp_path):
    """The row alone makes the spec check it, the dispatch open it, Detector.open score with it, and the CLI's
    engine options offer it (choice, help, its own flag) and pass the option through."""
    spec = EngineSpec.of("toy", gain=0.5, threads=2)
    assert dict(spec.options) == {"gain": 0.5} and EngineSpec("toy").options["gain"] == 0.3
    with pytest.raises(EngineSpecError, match="'toy' accepts precision fp32 / fp16"):
        EngineSpec("toy", precision="int8")
    with pytest.raises(EngineSpecError, match="already registered"):
        register_backend(BACKENDS["toy"])
    det = Detector.open(bundle, spec)
    assert toy == [spec] and det.engines.gain == 0.5
    src = tmp_path / "img.png"
    Image.fromarray(np.full((10, 12), 120, np.uint8)).save(src)
    assert next(det.detect([src]))[0].ok

    from glad_cli.options import engine_options

    @click.command()
    @engine_options
    def cmd(engine):
        click.echo(repr((engine.backend, engine.precision, engine.threads, dict(engine.options))))

    helped = CliRunner().invoke(cmd, ["--help"]).output
    assert "toy: stub engines with a gain" in helped and "--toy-gain G" in helped and "toy: fp32|fp16" in helped
    res = CliRunner().invoke(cmd, ["--engine", "toy", "--toy-gain", "0.7", "--threads", "3", "--precision", "fp16"])
    assert res.exit_code == 0, res.output
    assert res.output.strip() == repr(("toy", "fp16", 3, {"gain": 0.7}))
    res = CliRunner().invoke(cmd, ["--engine", "ort", "--toy-gain", "0.7"])
    assert isinstance(res.exception, EngineSpecError) and "--toy-gain (toy)" in str(res.exception)


# ---------------------------------------------------------------------------------------------- the CLI
def test_cli_engine_options_come_from_the_table():
    from glad_cli.main import cli

    detect = cli.commands["detect"]
    params = {p.name: p for p in detect.params}
    assert list(params["engine_backend"].type.choices) == list(BACKENDS)
    flags = {"--engine", "--device", "--precision", "--provider", "--threads"} | {
        o.flag for row in BACKENDS.values() for o in row.options if o.flag}
    assert flags <= {o for p in detect.params for o in p.opts}
    precisions = set(params["engine_precision"].type.choices)
    assert precisions == {p for row in BACKENDS.values() for p in row.precisions}
    for name in ("eval", "calibrate"):
        assert {o for p in cli.commands[name].params for o in p.opts} >= flags


@pytest.mark.parametrize("args, words", [
    (["--engine", "ort", "--server", "h:1"], ["--server (triton)", "--engine ort"]),
    (["--engine", "torch", "--threads", "2"], ["'torch' has no thread setting"]),
    (["--engine", "openvino", "--provider", "cuda"], ["'openvino' accepts provider cpu"]),
    (["--precision", "int8"], ["'torch' accepts precision fp32 / fp16 / bf16"]),
])
def test_cli_refuses_a_spec_in_one_line_before_opening(stub_backends, bundle, tmp_path, args, words):
    from glad_cli.main import cli

    res = CliRunner().invoke(cli, ["detect", str(bundle.path), str(tmp_path), "--out", str(tmp_path / "o"), *args])
    lines = res.output.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert all(w in lines[0] for w in words), lines[0]
    assert stub_backends == []


def test_cli_server_selects_triton(stub_backends, bundle, tmp_path):
    from glad_cli.main import cli

    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(np.full((10, 12), 120, np.uint8)).save(src / "a.png")
    res = CliRunner().invoke(cli, ["detect", str(bundle.path), str(src), "--out", str(tmp_path / "o"), "--quiet",
                                   "--server", "h:1", "--model-prefix", "p", "--shared-memory"])
    assert res.exit_code == 0, res.output
    assert stub_backends == [EngineSpec("triton", max_batch=4,
                                        options={"url": "h:1", "model_prefix": "p", "shared_memory": True})]


def test_calibrate_quantize_opens_onnx_runtime_by_default():
    """`glad calibrate --quantize int8 --threads 4` (no --engine): the threads are ONNX Runtime's, as before the
    engine table, so the spec is ort's, not the default torch's (which has no thread setting)."""
    from glad_cli import options as o

    kw = {"engine_backend": None, "engine_threads": 4, "quantize_mode": "int8",
          **{f"engine_{k}": None for k in ("precision", "provider", "device")},
          **{o._option_dest(r.name, opt.name): None for r in BACKENDS.values() for opt in r.options if opt.flag}}
    spec = o._engine_spec(dict(kw))
    assert (spec.backend, spec.threads) == ("ort", 4)
    with pytest.raises(EngineSpecError, match="'torch' has no thread setting"):
        o._engine_spec(dict(kw, quantize_mode=None))
