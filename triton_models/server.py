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
from glad_runtime.errors import PortInUseError, ServerStartError, UsageError  # noqa: F401 (re-exported)
from glad_runtime.serving import protocol

__all__ = ["TritonServer", "ServerStartError", "PortInUseError", "launch_server", "free_port", "port_holder",
           "check_ports", "load_model", "model_index", "rollout", "pytriton_root", "server_available",
           "MODEL_CONTROL_MODES", "drain", "unload_model", "prepare_backend_dir", "pytriton_environment", "PYTRITON_CPU_FLAGS"]

#: ``--model-control-mode`` values :func:`launch_server` accepts. ``explicit`` (the default) loads every model at
#: start (``--load-model=*``) and allows load / unload through the client (rollouts, :meth:`TritonServer.drain`).
MODEL_CONTROL_MODES = ("explicit", "none", "poll")

_LIVE: "set[TritonServer]" = set()  # strong references: the atexit hook must see servers whose handle was dropped


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free right now (bind to port 0 and read the number back)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _socket_inodes(port: int) -> set[str]:
    """Inodes of the listening TCP sockets on ``port`` (``/proc/net/tcp*``, state 0A = LISTEN)."""
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            f = line.split()
            if len(f) > 9 and f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:
                out.add(f[9])
    return out


def port_holder(port: int) -> str | None:
    """``"pid 1234 (tritonserver)"`` of the process listening on TCP ``port`` when this user can see it
    (``/proc``, Linux), ``"another user's process"`` when the socket exists but its owner is hidden, else None."""
    inodes = _socket_inodes(port)
    if not inodes:
        return None
    targets = {f"socket:[{i}]" for i in inodes}
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            for fd in (pid_dir / "fd").iterdir():
                if os.readlink(fd) in targets:
                    name = (pid_dir / "comm").read_text().strip()
                    return f"pid {pid_dir.name} ({name})"
        except OSError:
            continue
    return "another user's process"


def check_ports(host: str, ports: dict[str, int]) -> None:
    """Refuse ports that are already taken, before anything is started or any log is opened.

    Args:
        host: the listen address.
        ports: ``{"http": 8000, "grpc": 8001, "metrics": 8002}``; 0 entries are skipped.
    Raises:
        PortInUseError: one line naming the first busy port, its role and, where ``/proc`` shows it, the pid and
            name of the process holding it; or a port listed twice.
    """
    seen: dict[int, str] = {}
    for role, port in ports.items():
        if not port:
            continue
        if port in seen:
            raise PortInUseError(f"port {port} given for both {seen[port]} and {role}")
        seen[port] = role
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            # SO_REUSEADDR as Triton's own listeners: connections of a server that just stopped (TIME_WAIT) do
            # not count; a socket still listening does
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as e:
                holder = port_holder(port)
                raise PortInUseError(f"{role} port {host}:{port} is already in use"
                                     + (f" by {holder}" if holder else f" ({e.strerror or e})")
                                     + "; stop it or choose another port (0 picks a free one)") from None


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
    model_control: str = "explicit"
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
        """This server process is running, its log shows its own HTTP and gRPC endpoints started, and
        ``GET /v2/health/ready`` answered 200 (so another server answering on the same port never counts)."""
        if not self.running():
            return False
        log = self.log_tail(10**7)
        if "Started HTTPService at" not in log or "Started GRPCInferenceService at" not in log:
            return False
        return self._http("GET", "/v2/health/ready", timeout=timeout)[0] == 200

    def _http(self, method: str, path: str, body: bytes | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
        return _http(self.http_url, method, path, body, timeout)

    def model_index(self) -> list[dict]:
        """The repository index (``POST /v2/repository/index``): ``[{"name", "version", "state"}, ...]``."""
        return model_index(self.http_url)

    def load_model(self, name: str, timeout: float = 300.0) -> None:
        """See :func:`load_model`."""
        load_model(self.http_url, name, timeout)

    def unload_model(self, name: str, timeout: float = 300.0) -> None:
        """Unload ``name`` (explicit mode): new requests for it are refused at once (clients fail over), the ones
        in flight finish first. Raises ServerStartError with the server's message when it fails."""
        unload_model(self.http_url, name, timeout)

    def drain(self, grace: float = 30.0) -> list[str]:
        """Stop taking new images and let the ones in flight finish (a rolling restart's first half).

        In ``explicit`` mode every entry model (``*_glad`` and ``*_glad_inflight``) is unloaded: requests for it are refused at once with
        "model not found / no available versions" (clients fail over to another replica), while the loops in
        flight keep their network models and finish; Triton removes the model when the last one ends. Waits up
        to ``grace`` seconds for that. Other modes cannot unload: nothing is done (``stop`` then relies on
        Triton's ``--exit-timeout-secs``). Returns the models drained.
        """
        if self.model_control != "explicit" or not self.running():
            return []
        return drain(self.http_url, grace)

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

    def stop(self, grace: float = 15.0, drain: bool = True) -> int | None:
        """Drain (:meth:`drain`, explicit mode; ``drain=False`` skips it), SIGTERM the process group, wait up to
        ``grace`` seconds, then SIGKILL it. Returns the exit code."""
        if self.running() and drain:
            self.drain(grace)
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


def _http(http_url: str, method: str, path: str, body: bytes | None = None,
          timeout: float = 5.0) -> tuple[int, bytes]:
    """One HTTP call to a server at ``host:port``: ``(status, body)``; status 0 when it could not connect."""
    req = urllib.request.Request(f"http://{http_url}{path}", data=body, method=method)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, OSError):
        return 0, b""


def model_index(http_url: str) -> list[dict]:
    """The repository index of the server at ``http_url`` (``POST /v2/repository/index``):
    ``[{"name", "version", "state", "reason"}, ...]``; empty when it does not answer."""
    import json

    status, body = _http(http_url, "POST", "/v2/repository/index", b"{}")
    return json.loads(body) if status == 200 and body else []


def load_model(http_url: str, name: str, timeout: float = 300.0) -> None:
    """Load or reload ``name`` on the server at ``http_url`` (``--model-control-mode=explicit``). A reload loads
    the versions the version policy now selects and retires the others once they are idle, with no gap in
    availability (Triton's model management). Raises ServerStartError with the server's message on failure."""
    status, body = _http(http_url, "POST", f"/v2/repository/models/{name}/load", b"{}", timeout=timeout)
    if status != 200:
        raise ServerStartError(f"{http_url}: load of {name} failed ({status}): {body.decode(errors='replace')}")


def unload_model(http_url: str, name: str, timeout: float = 300.0) -> None:
    """Unload ``name`` on the server at ``http_url`` (explicit mode): new requests for it are refused at once
    (clients fail over), the ones in flight finish first. Raises ServerStartError with the server's message."""
    status, body = _http(http_url, "POST", f"/v2/repository/models/{name}/unload", b"{}", timeout=timeout)
    if status != 200:
        raise ServerStartError(f"{http_url}: unload of {name} failed ({status}): {body.decode(errors='replace')}")


def drain(http_url: str, grace: float = 30.0) -> list[str]:
    """Stop the server at ``http_url`` taking new images and let the ones it holds finish (explicit model control).

    Every entry model (``*_glad`` and ``*_glad_inflight``) is unloaded: requests for it are refused at once with
    "model not found / no available versions" (clients fail over to another replica), while the requests it has
    accepted, queued ones included, keep their network models and finish; Triton removes the model when the last
    one ends. Waits up to ``grace`` seconds for that. Returns the models drained (none when the server does not
    answer or is not in explicit mode).

    Why not SIGTERM alone: on SIGTERM Triton refuses every new inference request, the BLS requests the entry
    models send to the network models included ("Server not ready"), so the images it had accepted fail; draining
    the entry models first, then SIGTERM, answers them (tests/container, issue 34).
    """
    names = sorted({m["name"] for m in model_index(http_url) if protocol.is_entry_model(m.get("name", ""))
                    and m.get("state") == "READY"})
    deadline = time.monotonic() + grace
    for name in names:
        try:
            unload_model(http_url, name, timeout=max(1.0, deadline - time.monotonic()))
        except ServerStartError:
            pass
    while time.monotonic() < deadline and any(
            m.get("name") in names and m.get("state") in ("READY", "UNLOADING") for m in model_index(http_url)):
        time.sleep(0.1)
    return names


def rollout(http_urls: "str | list[str]", repo: str | os.PathLike, bundle, *, prefix: str | None = None,
            timeout: float = 300.0, **generate_options) -> int:
    """Zero-downtime rollout of a new bundle under a served prefix (issue 16, item 5).

    Writes ``bundle`` as a new version beside the served one (:func:`triton_models.repository.generate_repository`
    with ``version=None``), then, one server at a time: reloads the network models (old and new versions both
    loaded, ``num_versions: 2``), the resize model and the ensemble, then the BLS model ``<prefix>_glad``, which
    switches to the new version once it is ready while requests already running finish on the old one (each BLS
    version calls its own networks). Requests sent meanwhile are answered by one version or the other, never a
    mix, and never refused. The servers must read ``repo`` (the same folder or a synchronised copy) and run in
    explicit model-control mode (:func:`launch_server`'s default).

    Args:
        http_urls: ``host:port`` HTTP endpoint(s) of the servers, rolled one after another.
        repo: the model repository. bundle: the new bundle (exported). prefix: the served prefix.
        generate_options: more :func:`generate_repository` arguments (``max_batch``, ``target`` ...).
    Returns:
        the new version number.
    Raises:
        ServerStartError: a load failed (the server keeps serving the old version); BundleError from generation.
    """
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.engines.triton import default_model_prefix
    from triton_models.repository import generate_repository, next_version

    b = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
    p = prefix or default_model_prefix(b)
    version = next_version(repo, p, b.checksum())
    names = generate_repository(b, repo, prefix=p, version=version, **generate_options)
    glad = [n for n in names if protocol.is_entry_model(n)]  # <prefix>_glad first, then _glad_inflight
    order = [n for n in names if n not in glad] + glad
    for url in [http_urls] if isinstance(http_urls, str) else list(http_urls):
        for name in order:
            load_model(url, name, timeout)
        ready = {(m.get("name"), str(m.get("version"))) for m in model_index(url) if m.get("state") == "READY"}
        for name in glad:
            if (name, str(version)) not in ready:
                raise ServerStartError(f"{url}: {name} version {version} is not ready after the rollout")
    return version


@atexit.register
def _kill_leftovers() -> None:
    for server in list(_LIVE):
        server.stop(grace=5)


def prepare_backend_dir(target: str | os.PathLike, root: Path | None = None) -> Path:
    """Assemble the python backend directory ``target/python`` for the ``tritonserver`` of ``nvidia-pytriton``:
    links to its ``libtriton_python.so`` and ``triton_python_backend_utils.py`` and a copy of the stub built for
    this interpreter's Python version (``--backend-directory=target``). Idempotent; the container image runs it at
    build time so a read-only root file system needs nothing written at start.

    Raises:
        ServerStartError: no ``nvidia-pytriton``, or it has no stub for this Python version.
    """
    root = root if root is not None else pytriton_root()
    if root is None:
        raise ServerStartError("no tritonserver: install the serve extra (`pip install -e .[serve]`, nvidia-pytriton)")
    target = Path(target)
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


def pytriton_environment(env: dict[str, str], root: Path | None = None) -> dict[str, str]:
    """``env`` with what the ``nvidia-pytriton`` server and its python-backend stubs need (triton-cpu.md):
    ``LD_LIBRARY_PATH`` = this interpreter's ``LIBDIR`` (its ``libpython``) and the wheel's bundled libraries
    (when ``root``, :func:`pytriton_root`, is given), ``PATH`` = this interpreter's folder first (the stub finds
    the virtualenv through it), ``PYTHONPATH`` = the folder this toolkit is imported from (the python models
    import the same ``glad_runtime``). Returns a new dict."""
    env = dict(env)
    if root is not None:
        libdir = sysconfig.get_config_var("LIBDIR") or ""
        libs = root.parent.parent / "nvidia_pytriton.libs"
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in (libdir, str(libs), env.get("LD_LIBRARY_PATH", "")) if p)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    pkg_root = str(Path(__file__).resolve().parent.parent)  # the folder holding glad_runtime/, calib/
    env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH", "")) if p)
    return env


#: Flags that keep the CPU-only pytriton binary from reserving CUDA memory pools.
PYTRITON_CPU_FLAGS = ("--pinned-memory-pool-byte-size=0", "--cuda-memory-pool-byte-size=0:0")


def _pdeathsig() -> None:  # runs in the child between fork and exec
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def launch_server(repo: str | os.PathLike, *, binary: str | os.PathLike | None = None, host: str = "127.0.0.1",
                  http_port: int = 0, grpc_port: int = 0, metrics_port: int = 0,
                  backends_dir: str | os.PathLike | None = None, log_path: str | os.PathLike | None = None,
                  ready_timeout: float = 180.0, exit_timeout: int = 5, extra_args: tuple[str, ...] = (),
                  env: dict[str, str] | None = None, die_with_parent: bool = True,
                  model_control: str = "explicit") -> TritonServer:
    """Start ``tritonserver`` on ``repo`` and wait until ``/v2/health/ready`` answers.

    Args:
        repo: the model repository (``glad serve --repo``).
        binary: a ``tritonserver`` executable of a full install; default the one in ``nvidia-pytriton``.
        host: listen address of the HTTP, gRPC and metrics endpoints.
        http_port, grpc_port, metrics_port: 0 picks a free port.
        backends_dir: where the python backend directory is assembled (pytriton binary only; default
            ``<repo parent>/triton_backends``).
        log_path: server log (default ``<repo parent>/tritonserver-<grpc port>.log``; a log left by an earlier
            server of that name is kept as ``.1``, never overwritten).
        ready_timeout: seconds to wait for readiness.
        exit_timeout: ``--exit-timeout-secs`` (in-flight requests finish within it on SIGTERM).
        extra_args: more ``tritonserver`` flags, passed through (e.g. ``--log-verbose=1``); a
            ``--model-control-mode`` or ``--load-model`` among them replaces ``model_control``'s.
        model_control: ``explicit`` (default: every model loaded at start, load / unload / drain through the
            API), ``none`` or ``poll`` (:data:`MODEL_CONTROL_MODES`).
        die_with_parent: Linux: SIGKILL the server when the thread that launched it exits (launch from a thread
            that lives as long as the server, e.g. the main thread).
    Returns:
        a :class:`TritonServer`.
    Raises:
        PortInUseError: a port is taken (checked before anything starts; the message names the port and holder).
        ServerStartError: no binary, start-up failure or not ready in time (the server is stopped; the log tail
            is in the message).
    """
    if model_control not in MODEL_CONTROL_MODES:
        raise UsageError(f"model_control must be one of {MODEL_CONTROL_MODES}, got {model_control!r}")
    check_ports(host, {"http": http_port, "grpc": grpc_port, "metrics": metrics_port})
    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise ServerStartError(f"{repo}: no such model repository")
    root = pytriton_root()
    bundled = binary is None  # the nvidia-pytriton binary: its libraries and backend directory are ours to set
    if bundled:
        if root is None:
            raise ServerStartError("no tritonserver: install the serve extra (`pip install -e .[serve]`, "
                                   "nvidia-pytriton) or pass the binary of a Triton install")
        binary = root / "bin" / "tritonserver"
        bdir = prepare_backend_dir(Path(backends_dir) if backends_dir else repo.parent / "triton_backends", root)
        backend_args = [f"--backend-directory={bdir}"]
    else:
        binary = Path(binary)
        if not binary.is_file():
            raise ServerStartError(f"{binary}: no such tritonserver binary")
        backend_args = [f"--backend-directory={backends_dir}"] if backends_dir else []
    env = pytriton_environment(os.environ if env is None else env, root if bundled else None)
    ports = [p or free_port(host) for p in (http_port, grpc_port, metrics_port)]
    log_path = Path(log_path) if log_path else repo.parent / f"tritonserver-{ports[1]}.log"
    if log_path.exists():
        os.replace(log_path, log_path.with_name(log_path.name + ".1"))
    log = open(log_path, "w")
    user_control = [a for a in extra_args if a.startswith(("--model-control-mode", "--load-model"))]
    if user_control:
        mode = next((a.split("=", 1)[1] for a in extra_args if a.startswith("--model-control-mode=")), "none")
        control_args = []
    else:
        mode = model_control
        control_args = [f"--model-control-mode={mode}"] + (["--load-model=*"] if mode == "explicit" else [])
    cmd = [str(binary), f"--model-repository={repo}", *backend_args, *control_args,
           f"--http-address={host}", f"--http-port={ports[0]}", f"--grpc-address={host}", f"--grpc-port={ports[1]}",
           f"--metrics-address={host}", f"--metrics-port={ports[2]}", "--allow-gpu-metrics=false",
           f"--exit-timeout-secs={int(exit_timeout)}", *extra_args]
    if bundled:
        cmd += list(PYTRITON_CPU_FLAGS)
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                            preexec_fn=_pdeathsig if die_with_parent and sys.platform == "linux" else None)
    server = TritonServer(proc, host, *ports, log_path=log_path, repo=repo, model_control=mode, _log=log)
    _LIVE.add(server)
    deadline = time.monotonic() + ready_timeout
    try:
        while time.monotonic() < deadline:
            if not server.running():
                server.stop(drain=False)
                raise ServerStartError(f"tritonserver exited with code {proc.returncode} during start-up: "
                                       f"{_first_error(server.log_tail(10**6))}\n{server.log_tail()}")
            if server.ready(timeout=1.0):
                return server
            time.sleep(0.25)
    except KeyboardInterrupt:  # Ctrl-C while waiting: never leave the server behind
        server.stop(drain=False)
        raise
    tail = server.log_tail()
    server.stop(drain=False)
    raise ServerStartError(f"tritonserver not ready after {ready_timeout:.0f} s:\n{tail}")


def _first_error(log: str) -> str:
    """The line of a Triton log that says why it stopped (a bind failure, a model that failed to load), so it is
    not buried under the model table; the last ``error``/``failed`` line otherwise."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    for key in ("failed to start", "address already in use", "Failed to bind", "failed to load '",
                "error: creating server"):
        for ln in lines:
            if key.lower() in ln.lower():
                return ln.split("\\n")[0]  # a model's own error, without the Python traceback Triton quotes
    bad = [ln for ln in lines if ln.startswith("E") or "failed" in ln.lower() or "error" in ln.lower()]
    return bad[-1] if bad else "(no error line in the log)"
