"""Start and stop a real ``tritonserver`` on a model repository (``glad serve --start``, the serving tests).

On CPU the server is the Triton 2.51 binary shipped in ``nvidia-pytriton`` (shared/reference/triton-cpu.md): its
python backend stub must load the ``libpython`` of the interpreter that owns the virtualenv and find the
virtualenv through ``PATH``, so :func:`launch_server` sets ``LD_LIBRARY_PATH=<sysconfig LIBDIR>:<pytriton libs>``
and ``PATH=<venv>/bin:...``, and assembles a backend directory (``triton_backends/python``: the backend library,
its utils and the stub for this Python version; generated, git-ignored) beside the repository. ``PYTHONPATH``
gets the folder this toolkit is imported from, so the python models import the same ``glad_runtime``.
With ``binary=`` (a full Triton install, e.g. ``/opt/tritonserver/bin/tritonserver`` on a GPU host) the server's
own backends are used.

The server runs in its own process group (the python-backend stubs are its children); :meth:`TritonServer.stop`
sends SIGTERM to the group and SIGKILL after a grace period; an ``atexit`` hook stops any server still running
when the interpreter exits, and on Linux the server gets SIGKILL when the launching thread dies
(``PR_SET_PDEATHSIG``, ``die_with_parent=True``), so a killed client never leaves an orphan server.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from glad_runtime.errors import ServerStartError  # noqa: F401 (re-exported)

__all__ = ["TritonServer", "ServerStartError", "launch_server", "free_port", "pytriton_root", "server_available"]

_LIVE: "set[TritonServer]" = set()  # strong references: the atexit hook must see servers whose handle was dropped


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (bind to port 0 and read the number back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pytriton_root() -> Path | None:
    """``.../site-packages/pytriton/tritonserver`` of the installed ``nvidia-pytriton``, or None."""
    import importlib.util

    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    root = Path(list(spec.submodule_search_locations)[0]) / "tritonserver"
    return root if (root / "bin" / "tritonserver").is_file() else None


def server_available() -> bool:
    """True when a ``tritonserver`` binary can be launched here (nvidia-pytriton installed)."""
    return pytriton_root() is not None


@dataclass
class TritonServer:
    """A running ``tritonserver`` (from :func:`launch_server`); a context manager that stops it on exit.

    Attributes:
        process: the server process (leader of its own process group).
        host, http_port, grpc_port, metrics_port: where it listens.
        log_path: its stdout/stderr log.
    """

    process: subprocess.Popen
    host: str
    http_port: int
    grpc_port: int
    metrics_port: int
    log_path: Path
    repo: Path
    _log: object = field(default=None, repr=False)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    def running(self) -> bool:
        return self.process.poll() is None

    def ready(self, timeout: float = 2.0) -> bool:
        """``GET /v2/health/ready`` answered 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=timeout) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def _signal_group(self, sig: int) -> None:
        try:
            os.killpg(self.process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def stop(self, grace: float = 15.0) -> int | None:
        """SIGTERM the process group, wait up to ``grace`` seconds, then SIGKILL it. Returns the exit code."""
        if self.running():
            self._signal_group(signal.SIGTERM)
            try:
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        self._signal_group(signal.SIGKILL)  # stubs that outlived the server
        try:
            code = self.process.wait(5)
        except subprocess.TimeoutExpired:
            code = None
        if self._log is not None:
            self._log.close()
            self._log = None
        _LIVE.discard(self)
        return code

    def kill(self) -> None:
        """SIGKILL the whole process group at once (a crash, as the failover tests simulate)."""
        self._signal_group(signal.SIGKILL)
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            pass

    def __hash__(self) -> int:
        return id(self)

    def __enter__(self) -> "TritonServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(grace=5)


def _backend_dir(root: Path, target: Path) -> Path:
    pyver = "%d.%d" % sys.version_info[:2]
    stub = root / "python_backend_stubs" / pyver / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServerStartError(f"nvidia-pytriton has no python backend stub for Python {pyver} ({stub})")
    py = target / "python"
    py.mkdir(parents=True, exist_ok=True)
    for name in ("libtriton_python.so", "triton_python_backend_utils.py"):
        link = py / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(root / "backends" / "python" / name)
    if not (py / "triton_python_backend_stub").is_file() or \
            (py / "triton_python_backend_stub").stat().st_size != stub.stat().st_size:
        tmp = py / "triton_python_backend_stub.tmp"
        tmp.write_bytes(stub.read_bytes())
        tmp.chmod(0o755)
        os.replace(tmp, py / "triton_python_backend_stub")
    return target


def _pdeathsig() -> None:  # runs in the child between fork and exec
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch_server(repo: str | os.PathLike, *, binary: str | os.PathLike | None = None, host: str = "127.0.0.1",
                  http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                  backends_dir: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None,
                  ready_timeout: float = 180.0, exit_timeout: int = 5, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, die_with_parent: bool = True) -> TritonServer:
    """Start ``tritonserver`` on ``repo`` and wait until ``/v2/health/ready`` answers.

    Args:
        repo: the model repository (``glad serve --repo``).
        binary: a ``tritonserver`` executable of a full install; default the one in ``nvidia-pytriton``.
        host: listen address of the HTTP, gRPC and metrics endpoints.
        http_port, grpc_port, metrics_port: 0 picks a free port.
        backends_dir: where the python backend directory is assembled (pytriton binary only; default
            ``<repo parent>/triton_backends``).
        log_path: server log (default ``<repo parent>/tritonserver-<grpc port>.log``).
        ready_timeout: seconds to wait for readiness.
        exit_timeout: ``--exit-timeout-secs`` (in-flight requests finish within it on SIGTERM).
        extra_args: more ``tritonserver`` flags (e.g. ``--log-verbose=1``).
        die_with_parent: Linux: SIGKILL the server when the thread that launched it exits (launch from a thread
            that lives as long as the server, e.g. the main thread).
    Returns:
        a :class:`TritonServer`.
    Raises:
        ServerStartError: no binary, start-up failure or not ready in time (the server is stopped; the log tail
            is in the message).
    """
    repo = Path(repo).resolve()
    env = dict(os.environ if env is None else env)
    root = pytriton_root()
    if binary is None:
        if root is None:
            raise ServerStartError("no tritonserver: install the serve extra (`pip install -e .[serve]`, "
                                   "nvidia-pytriton) or pass the binary of a Triton install")
        binary = root / "bin" / "tritonserver"
        bdir = _backend_dir(root, Path(backends_dir) if backends_dir else repo.parent / "triton_backends")
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = root.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
        backend_args = [f"--backend-directory={bdir}"]
    else:
        binary = Path(binary)
        if not binary.is_file():
            raise ServerStartError(f"{binary}: no such tritonserver binary")
        backend_args = [f"--backend-directory={backends_dir}"] if backends_dir else []
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    pkg_root = str(Path(__file__).resolve().parent.parent)  # the folder holding glad_runtime/, calib/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    log_path = Path(log_path) if log_path else repo.parent / f"tritonserver-{ports[1]}.log"
    log = open(log_path, "w")
    cmd = [str(binary), f"--model-repository={repo}", *backend_args,
           f"--http-address={host}", f"--http-port={ports[0]}", f"--grpc-address={host}", f"--grpc-port={ports[1]}",
           f"--metrics-address={host}", f"--metrics-port={ports[2]}", "--allow-gpu-metrics=false",
           f"--exit-timeout-secs={int(exit_timeout)}", *extra_args]
    if root is not None and Path(binary) == root / "bin" / "tritonserver":
        cmd += ["--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_pdeathsig if die_with_parent and sys.platform == "linux" else None)
    server = TritonServer(proc, host, *ports, log_path=log_path, repo=repo, _log=log)
    _LIVE.add(server)
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if not server.running():
                server.stop()
                raise ServerStartError(f"tritonserver exited with code {proc.returncode} during start-up:\n"
                                       f"{server.log_tail()}")
            if server.ready(timeout=1.0):
                return server
            time.sleep(0.25)
    except KeyboardInterrupt:  # Ctrl-C while waiting: never leave the server behind
        server.stop()
        raise
    tail = server.log_tail()
    server.stop()
    raise ServerStartError(f"tritonserver not ready after {ready_timeout:.0f} s:\n{tail}")
