"""Port options of the ``glad`` CLI (issue 27): a TCP port in [0, 65535] (0: a free port), a bad value is click's
usage error (exit 2, no traceback), checked before anything runs."""

from __future__ import annotations

import click
import pytest
from click.testing import CliRunner

from glad_cli.main import cli


def _commands(group, path=()):
    for name, cmd in group.commands.items():
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, path + (name,))
        else:
            yield path + (name,), cmd


def _port_options():
    return [(path, p) for path, cmd in _commands(cli) for p in cmd.params
            if isinstance(p, click.Option) and (p.name == "port" or p.name.endswith("_port"))]


def test_every_port_option_is_a_tcp_port_range():
    options = _port_options()
    assert {"/".join(path) + ":" + p.name for path, p in options} >= {
        "serve:http_port", "serve:grpc_port", "serve:metrics_port"}
    for path, p in options:
        assert isinstance(p.type, click.IntRange), (path, p.name)
        assert (p.type.min, p.type.max, p.type.min_open, p.type.max_open) == (0, 65535, False, False), (path, p.name)


@pytest.mark.parametrize("flag", ["--http-port", "--grpc-port", "--metrics-port"])
@pytest.mark.parametrize("value", ["99999", "-1", "65536", "http"])
def test_bad_port_is_a_usage_error(tmp_path, flag, value):
    res = CliRunner().invoke(cli, ["serve", str(tmp_path), "--repo", str(tmp_path / "repo"), "--start",
                                   f"{flag}={value}"])
    assert res.exit_code == 2, res.output
    assert f"Invalid value for '{flag}'" in res.output
    assert "Traceback" not in res.output and isinstance(res.exception, SystemExit)
    assert not (tmp_path / "repo").exists()  # refused before anything ran


@pytest.mark.parametrize("value", ["0", "65535"])
def test_edge_ports_pass_the_check(tmp_path, value):
    # past option parsing: the folder is no bundle, a runtime error (exit 1), not a usage error
    res = CliRunner().invoke(cli, ["serve", str(tmp_path), "--repo", str(tmp_path / "repo"), "--http-port", value])
    assert res.exit_code == 1, res.output
    assert "Invalid value" not in res.output
