"""The pure parts of the CPU container (issue 34): the entrypoint's command line and the podman settings.

The container itself is built and run in ``tests/container``; these run anywhere in a second.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from triton_models import entrypoint
from triton_models import podman as pm
from triton_models.server import PYTRITON_CPU_FLAGS, server_available


@pytest.mark.skipif(not server_available(), reason="nvidia-pytriton not installed")
def test_server_command_adds_backends_and_cpu_flags_unless_given():
    cmd = entrypoint.server_command(["--model-repository=/models", "--http-port=8000"])
    assert cmd[0].endswith("/bin/tritonserver")
    assert cmd[1] == f"--backend-directory={entrypoint.BACKENDS_DIR}"
    assert cmd[2:4] == ["--model-repository=/models", "--http-port=8000"]
    assert cmd[4:] == list(PYTRITON_CPU_FLAGS)
    mine = entrypoint.server_command(["--backend-directory=/b", "--pinned-memory-pool-byte-size=64"])
    assert mine[1:3] == ["--backend-directory=/b", "--pinned-memory-pool-byte-size=64"]
    assert not any(a.startswith("--backend-directory=/opt") for a in mine)
    assert [a for a in mine if a.startswith("--pinned-memory-pool-byte-size")] == ["--pinned-memory-pool-byte-size=64"]


def test_entrypoint_refuses_what_is_not_a_flag():
    res = subprocess.run([sys.executable, "-m", "triton_models.entrypoint", "tritonserver", "--http-port=1"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "tritonserver flags only" in res.stderr


@pytest.mark.skipif(not server_available(), reason="nvidia-pytriton not installed")
def test_prepare_backends_resolves_every_library(tmp_path):
    """What the image build runs: the backend directory, and ldd finds every library under the server's
    environment (the stub needs the wheel's bundled libcudart: a check under LIBDIR alone failed the first build)."""
    res = subprocess.run([sys.executable, "-m", "triton_models.entrypoint", "--prepare-backends", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "python" / "triton_python_backend_stub").is_file()
    assert (tmp_path / "python" / "libtriton_python.so").exists()


def test_podman_env_points_at_our_containers_conf(tmp_path):
    env = pm.podman_env({"XDG_CACHE_HOME": str(tmp_path), "PATH": "/usr/bin"})
    conf = tmp_path / "glad" / "containers.conf"
    assert env["CONTAINERS_CONF"] == str(conf) and conf.read_text() == pm.CONTAINERS_CONF
    assert "default_ulimits = []" in pm.CONTAINERS_CONF and 'runtime = "runc"' in pm.CONTAINERS_CONF
    assert pm.podman_env({"CONTAINERS_CONF": "/x.conf"})["CONTAINERS_CONF"] == "/x.conf"  # the caller's wins


def _supervised(child: str, grace: float = 1.0) -> subprocess.Popen:
    code = ("import os, sys\nfrom triton_models.entrypoint import supervise\n"
            f"sys.exit(supervise([sys.executable, '-c', {child!r}], dict(os.environ), http_url='127.0.0.1:9', "
            f"grace={grace}, drains=False))\n")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def test_supervise_passes_the_servers_exit_code_through():
    proc = _supervised("import sys; sys.exit(3)")
    assert proc.wait(timeout=60) == 3


def test_supervise_forwards_sigterm_after_the_drain_and_returns_the_servers_code():
    """The child (a stand-in for tritonserver, in its own session) gets SIGTERM only from the supervisor, after the
    drain step, and its exit code is the container's."""
    import signal
    import time

    child = ("import signal, sys, time\n"
             "signal.signal(signal.SIGTERM, lambda *a: (print('child got SIGTERM', flush=True), sys.exit(7)))\n"
             "print('child up', flush=True)\ntime.sleep(60)\n")
    proc = _supervised(child)
    assert proc.stdout.readline().strip() == "child up"
    time.sleep(0.3)  # the supervisor's handlers are installed before it starts the child
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 7, out
    lines = out.splitlines()
    drain = next(k for k, ln in enumerate(lines) if "SIGTERM: draining" in ln)
    assert lines.index("child got SIGTERM") > drain and "not in explicit model control" in out
