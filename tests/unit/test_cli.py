"""The ``glad`` CLI's error handler, the typed ``--set KEY=VALUE`` and the one-line usage errors (fast: no
training, no network builds; stub engines where a bundle runs)."""

from __future__ import annotations

import json

import click
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from conftest import stub_config
from glad_cli.main import GladGroup, cli
from glad_runtime.core.bundle import Bundle
from glad_runtime.core.config import FIELD_CHOICES, GladConfig, get_preset, parse_overrides, parse_value
from glad_runtime.errors import (BundleError, ConfigError, EngineError, GladError, UnknownPresetError,
                                 UsageError)


def _run(*args, group=cli):
    return CliRunner().invoke(group, [str(a) for a in args])


def _one_error_line(res) -> str:
    """The result's stderr is exactly one ``error: ...`` line and nothing has a traceback."""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert "Traceback" not in res.output and not isinstance(res.exception, GladError)
    return lines[0]


# ---------------------------------------------------------------------------------------------- error handler
def _raising_group():
    group = GladGroup()

    @group.command("runtime")
    def runtime():
        raise BundleError("the bundle is broken\n  second line")

    @group.command("engine")
    def engine():
        raise EngineError("")

    @group.command("usage")
    def usage():
        raise UsageError("bad choice")

    def refuse(ctx, param, value):
        if value:
            raise ConfigError("bad --x")
        return value

    @group.command("config")
    @click.option("--x", callback=refuse)
    def config(x):
        pass

    @group.command("clicky")
    def clicky():
        raise click.BadParameter("nope", param_hint="--y")

    @group.group("sub")
    def sub():
        pass

    @sub.command("deep")
    def deep():
        raise GladError("deep failure")

    return group


def test_glad_error_is_one_line_exit_1():
    res = _run("runtime", group=_raising_group())
    assert res.exit_code == 1
    assert _one_error_line(res) == "error: the bundle is broken | second line"
    res = _run("engine", group=_raising_group())
    assert res.exit_code == 1 and _one_error_line(res) == "error: EngineError"  # empty message: the class name
    res = _run("sub", "deep", group=_raising_group())  # a nested group's command goes through the same handler
    assert res.exit_code == 1 and _one_error_line(res) == "error: deep failure"


def test_usage_error_and_subclasses_exit_2():
    res = _run("usage", group=_raising_group())
    assert res.exit_code == 2 and _one_error_line(res) == "error: bad choice"
    res = _run("config", "--x", "1", group=_raising_group())  # raised while the arguments are parsed
    assert res.exit_code == 2 and _one_error_line(res) == "error: bad --x"


def test_click_usage_errors_keep_click_format():
    res = _run("clicky", group=_raising_group())
    assert res.exit_code == 2 and "Usage:" in res.output and "Invalid value for --y: nope" in res.output
    res = _run("detect", "--no-such-option")
    assert res.exit_code == 2 and "No such option" in res.output


def test_real_command_bundle_error_exit_1(tmp_path):
    (tmp_path / "img.png").write_bytes(b"")
    res = _run("detect", tmp_path, tmp_path / "img.png", "--out", tmp_path / "out")
    assert res.exit_code == 1 and "not a GLAD bundle" in _one_error_line(res)


def test_every_verb_is_registered():
    assert set(cli.commands) == {"presets", "init", "export", "build", "bench", "serve", "detect", "calibrate",
                                 "data", "train", "eval", "demo", "perf", "container"}
    assert set(cli.commands["data"].commands) == {"elpv", "textures"}
    assert set(cli.commands["container"].commands) == {"base", "build", "run", "up"}


# ---------------------------------------------------------------------------------------------- typed --set
@pytest.mark.parametrize("text", ["false", "False", "FALSE", "no", "No", "off", "0", " false "])
def test_bool_false_spellings(text):
    assert parse_overrides([f"ads_enabled={text}"]) == {"ads_enabled": False}


@pytest.mark.parametrize("text", ["true", "True", "yes", "YES", "on", "1"])
def test_bool_true_spellings(text):
    assert parse_overrides([f"saff_enabled={text}"]) == {"saff_enabled": True}


def test_typed_values():
    got = parse_overrides(["t_max=250", "tau=0.1", "guidance_scale=3", "noise_at=first_timestep",
                           "feature_layers=2,5,8", "ads_resolution=none", "top_k=7", "top_k=9",
                           'conditioning={"prompt": "p", "negative": ""}', "foreground_mode=2"])
    assert got == {"t_max": 250, "tau": 0.1, "guidance_scale": 3.0, "noise_at": "first_timestep",
                   "feature_layers": (2, 5, 8), "ads_resolution": None, "top_k": 9,
                   "conditioning": {"prompt": "p", "negative": ""}, "foreground_mode": 2}
    assert type(got["t_max"]) is int and type(got["guidance_scale"]) is float
    assert parse_value("feature_layers", "[7]") == (7,) and parse_value("ads_resolution", "NULL") is None
    assert parse_value("ads_resolution", "112") == 112
    assert get_preset("tiny", **parse_overrides(["ads_enabled=off"])).ads_enabled is False


@pytest.mark.parametrize("item, words", [
    ("t_max=1.5", ["t_max", "an int"]),
    ("t_max=abc", ["t_max", "an int"]),
    ("tau=high", ["tau", "a finite float"]),
    ("tau=nan", ["tau", "a finite float"]),
    ("ads_enabled=maybe", ["ads_enabled", "a bool", "yes/no"]),
    ("ads_resolution=big", ["ads_resolution", "an int or none"]),
    ("feature_layers=a,b", ["feature_layers", "a list of ints"]),
    ("conditioning=3", ["conditioning", "JSON object"]),
    ("bidirectional=both", ["bidirectional", "'none', 'sum', 'mean'"]),
    ("foreground_mode=4", ["foreground_mode", "1, 2, 3"]),
])
def test_bad_value_names_field_and_type(item, words):
    with pytest.raises(ConfigError) as info:
        parse_overrides([item])
    assert all(w in str(info.value) for w in words), str(info.value)


def test_unknown_key_and_malformed_item():
    with pytest.raises(ConfigError, match="'ads_enabeld' is not a GladConfig field; did you mean ads_enabled"):
        parse_overrides(["ads_enabeld=true"])
    with pytest.raises(ConfigError, match="fields: preset, architecture"):  # nothing close: the field list
        parse_overrides(["zzzzzz=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_overrides(["t_max"])
    assert issubclass(ConfigError, UsageError) and issubclass(ConfigError, ValueError)


def test_choices_checked_by_validate():
    for name, choices in FIELD_CHOICES.items():
        assert getattr(GladConfig(), name) in choices
    with pytest.raises(ConfigError, match="bidirectional must be one of"):
        GladConfig(bidirectional="both")
    with pytest.raises(ValueError):  # ConfigError stays a ValueError for older callers
        get_preset("tiny", bidirectional="both")


def test_unknown_preset_error():
    with pytest.raises(UnknownPresetError) as info:
        get_preset("visa-pcb")
    e = info.value
    assert isinstance(e, ConfigError) and isinstance(e, KeyError)
    assert str(e).startswith("unknown preset 'visa-pcb'; did you mean") and "visa-pcb1" in str(e)
    assert "known presets: " in str(e) and "tiny" in str(e)


# ---------------------------------------------------------------------------------------------- CLI usage errors
def test_presets_show_unknown_exit_2():
    res = _run("presets", "--show", "nope")
    assert res.exit_code == 2 and res.stdout == ""
    line = _one_error_line(res)
    assert "unknown preset 'nope'" in line and "tiny" in line and "sd14-dino-vitb8" in line and "mvtec-screw" in line


def test_presets_show_known():
    res = _run("presets", "--show", "tiny")
    assert res.exit_code == 0 and GladConfig.from_dict(json.loads(res.stdout)) == get_preset("tiny")


@pytest.mark.parametrize("item, words", [("bidirectional=both", ["--set", "bidirectional", "'sum'"]),
                                         ("ads_enabld=no", ["--set", "did you mean ads_enabled"]),
                                         ("t_max=2000", ["--set", "t_max <= 999"])])
def test_train_bad_set_exit_2_before_training(tmp_path, item, words):
    data, bundle = tmp_path / "data", tmp_path / "bundle"
    data.mkdir()
    res = _run("train", data, bundle, "--preset", "tiny", "--set", item)
    assert res.exit_code == 2
    line = _one_error_line(res)
    assert all(w in line for w in words), line
    assert not bundle.exists()


# ---------------------------------------------------------------------------------------------- --set reaches the run
@pytest.fixture
def stub_cli(tmp_path, monkeypatch, stub_backends):
    """A stub bundle, two images, every backend opening stub engines (``stub_backends``) and ``Detector.open``
    recording what each command asked it for: ``(EngineSpec, config_changes)``."""
    from glad_runtime.detector import Detector

    b = Bundle.create(tmp_path / "b", stub_config())
    (b.file("weights") / "w.bin").write_bytes(b"weights")
    b.write_manifest()
    src = tmp_path / "in"
    src.mkdir()
    for k, v in enumerate((100, 200)):
        Image.fromarray(np.full((10, 12), v, np.uint8)).save(src / f"im{k}.png")
    calls = []
    real_open = Detector.open.__func__

    def recording_open(cls, bundle, spec="torch", **kw):
        calls.append((spec, kw.get("config_changes") or {}))
        return real_open(cls, bundle, spec, **kw)

    monkeypatch.setattr(Detector, "open", classmethod(recording_open))
    return b, src, calls


def test_detect_set_values_are_typed(stub_cli, stub_backends, tmp_path):
    b, src, calls = stub_cli
    res = _run("detect", b.path, src, "--out", tmp_path / "out", "--quiet", "--set", "ads_enabled=False",
               "--set", "top_k=3", "--set", "tau=0.1", "--engine", "ort", "--threads", "2")
    assert res.exit_code == 0, res.output
    engine, changes = calls[-1]
    assert changes == {"ads_enabled": False, "top_k": 3, "tau": 0.1}  # "False" no longer turns ADS on
    assert engine.backend == "ort" and engine.threads == 2 and engine.options == {}  # no server
    assert stub_backends[-1] == engine.replace(max_batch=4)  # what the backend opened: --batch-size per call


def test_detect_seed_and_set_seed_together(stub_cli, tmp_path):
    b, src, calls = stub_cli
    res = _run("detect", b.path, src, "--out", tmp_path / "out", "--quiet", "--set", "seed=5", "--seed", "7")
    assert res.exit_code == 0, res.output
    assert calls[-1][1] == {"seed": 7}  # --seed wins, no duplicate-keyword crash


def test_detect_bad_set_value_exit_2(stub_cli, tmp_path):
    b, src, calls = stub_cli
    res = _run("detect", b.path, src, "--out", tmp_path / "out", "--set", "ads_enabled=maybe")
    assert res.exit_code == 2 and not calls
    line = _one_error_line(res)
    assert "--set" in line and "ads_enabled" in line and "a bool" in line


def test_detect_missing_input_exit_2(stub_cli, tmp_path):
    """A missing input is a PathNotFoundError (a UsageError): one line, exit 2, before any engine is opened."""
    b, src, calls = stub_cli
    res = _run("detect", b.path, src / "im0.png", tmp_path / "nope.png", "--out", tmp_path / "out")
    assert res.exit_code == 2 and not calls
    assert "no such file or folder" in _one_error_line(res) and "nope.png" in res.stderr


@pytest.mark.parametrize("batch", ["4:2:1", "x", "1:2"])
def test_build_bad_batch_exit_2(stub_cli, batch):
    res = _run("build", stub_cli[0].path, "--batch", batch)
    assert res.exit_code == 2
    assert "batch must be N or MIN:OPT:MAX" in _one_error_line(res) and repr(batch) in res.stderr
