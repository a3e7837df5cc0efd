"""Build and run the CPU container image on this host with podman (issue 34): the base, the image, the container.

The recipe is what :func:`triton_models.deploy.write_deploy` writes for ``--target cpu`` (``glad serve BUNDLE
--target cpu --deploy OUT --image NAME:TAG``); this module turns it into a running container, on loopback ports
only, for the checks in ``tests/container`` and for an operator trying the image before pushing it::

    glad container up BUNDLE --image localhost/glad-triton-cpu:1 [--cpus 1] [--read-only]
    glad container base          # the Debian 12 base only (mmdebstrap + podman import)

What this host needs, learnt here (Debian 12, root, cgroups v1):

* ``podman`` with ``runc`` (Debian's packages ``podman runc``); ``crun`` refuses to start containers on a
  hybrid cgroup hierarchy. podman's default ulimits must be dropped (``default_ulimits = []``): the sandbox
  refuses the ``nofile`` limit podman sets. Both go in a ``containers.conf`` of our own (:func:`podman_env`,
  ``CONTAINERS_CONF``), nothing in ``/etc`` is changed.
* No image registry is reachable, so ``python:3.11-slim`` cannot be pulled: :func:`make_base` makes an equivalent
  base from Debian's packages (``mmdebstrap --variant=minbase``: python3 3.11, python3-venv, libpython3.11,
  ca-certificates) and ``podman import`` s it as :data:`DEBIAN_BASE`; the Dockerfile takes it as
  ``--build-arg BASE_IMAGE``.
* pip reaches the package index through a TLS-intercepting proxy here: its CA bundle (pip's ``cert`` setting,
  ``PIP_CERT``) goes to the build as the secret ``pip_ca``, used by the install step only and not stored in
  the image.
* ``podman build --format docker``: the OCI format drops ``HEALTHCHECK``.

Every call runs ``podman`` as a subprocess; failures raise :class:`~glad_runtime.errors.ContainerError` with the
command and the tail of its output.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from glad_runtime.errors import ContainerError

__all__ = ["DEBIAN_BASE", "CONTAINERS_CONF", "podman_env", "runtime_problem", "podman", "image_exists",
           "make_base", "runs_containers", "build_image", "image_size", "run_container", "Container", "pip_ca_bundle"]

#: The locally made stand-in for ``python:3.11-slim`` (Debian 12, Python 3.11).
DEBIAN_BASE = "localhost/glad-debian-base:bookworm"
#: The ``containers.conf`` this module runs podman with.
CONTAINERS_CONF = """\
# Written by triton_models.podman: the settings podman needs on this kind of host.
[containers]
# the sandbox refuses podman's default nofile/nproc ulimits ("setrlimit ... operation not permitted")
default_ulimits = []

[engine]
# crun refuses hybrid cgroup hierarchies; runc works
runtime = "runc"
"""
_BASE_PACKAGES = ("python3", "python3-venv", "libpython3.11", "ca-certificates")


def podman_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default ``os.environ``) with ``CONTAINERS_CONF`` pointing at :data:`CONTAINERS_CONF`, written to
    ``$XDG_CACHE_HOME/glad`` (``~/.cache/glad``) unless the caller already sets ``CONTAINERS_CONF``."""
    env = dict(os.environ if env is None else env)
    if "CONTAINERS_CONF" not in env:
        folder = Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "glad"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "containers.conf"
        if not conf.is_file() or conf.read_text() != CONTAINERS_CONF:
            conf.write_text(CONTAINERS_CONF)
        env["CONTAINERS_CONF"] = str(conf)
    return env


def podman(*args: str, timeout: float = 600.0, check: bool = True, quiet: bool = True) -> subprocess.CompletedProcess:
    """Run ``podman ARGS`` with :func:`podman_env`; returns the completed process (text stdout / stderr when
    ``quiet``, else streamed to this process's).

    Raises:
        ContainerError: podman missing, a non-zero exit (with ``check``) or the timeout, naming the command.
    """
    exe = shutil.which("podman")
    if exe is None:
        raise ContainerError("podman is not installed (Debian: apt-get install podman runc)")
    cmd = [exe, *args]
    try:
        proc = subprocess.run(cmd, env=podman_env(), timeout=timeout, capture_output=quiet, text=quiet)
    except subprocess.TimeoutExpired:
        raise ContainerError(f"{' '.join(cmd[:4])} ...: no answer after {timeout:.0f} s") from None
    if check and proc.returncode != 0:
        tail = ((proc.stderr or "") + (proc.stdout or ""))[-3000:] if quiet else ""
        raise ContainerError(f"podman {' '.join(args[:3])} ... exited with {proc.returncode}: {tail.strip()}")
    return proc


def runtime_problem(need_base_tools: bool = True) -> str | None:
    """Why containers cannot be built and run here (podman or runc missing, mmdebstrap missing when
    ``need_base_tools`` (to make :data:`DEBIAN_BASE`), or podman unusable), or None when they can. Cheap: runs
    ``podman info`` only."""
    tools = (("podman", "podman"), ("runc", "runc")) + ((("mmdebstrap", "mmdebstrap"),) if need_base_tools else ())
    for tool, package in tools:
        if shutil.which(tool) is None:
            return f"{tool} is not installed (Debian: apt-get install {package})"
    try:
        podman("info", "--format", "{{.Host.OCIRuntime.Name}}", timeout=60)
    except ContainerError as e:
        return f"podman does not work here: {e}"
    return None


def runs_containers(image: str = DEBIAN_BASE) -> str | None:
    """Why a container of ``image`` cannot be started here (``podman run --rm IMAGE true`` fails), or None."""
    proc = podman("run", "--rm", "--network", "none", image, "true", check=False, timeout=120)
    return None if proc.returncode == 0 else f"podman run failed ({proc.returncode}): {proc.stderr.strip()[-500:]}"


def image_exists(tag: str) -> bool:
    """True when the local image store holds ``tag``."""
    return podman("image", "exists", tag, check=False).returncode == 0


def image_size(tag: str) -> int:
    """The size of image ``tag`` in bytes (``podman image inspect``)."""
    return int(json.loads(podman("image", "inspect", tag).stdout)[0]["Size"])


def make_base(tag: str = DEBIAN_BASE, *, suite: str = "bookworm", mirror: str = "http://deb.debian.org/debian",
              force: bool = False) -> float:
    """Make the Debian base image ``tag`` from Debian's packages (``mmdebstrap --variant=minbase`` with
    python3, python3-venv, libpython3.11 and ca-certificates; apt lists, docs and man pages left out) and
    ``podman import`` it; kept when it exists unless ``force``. Returns the seconds it took (0 when kept).

    Raises:
        ContainerError: mmdebstrap or the import failed.
    """
    if not force and image_exists(tag):
        return 0.0
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="glad-base-") as tmp:
        tar = Path(tmp) / "base.tar"
        cmd = ["mmdebstrap", "--variant=minbase", "--include=" + ",".join(_BASE_PACKAGES),
               "--dpkgopt=path-exclude=/usr/share/doc/*", "--dpkgopt=path-exclude=/usr/share/man/*",
               "--dpkgopt=path-exclude=/usr/share/locale/*",
               "--customize-hook=rm -rf \"$1\"/var/lib/apt/lists/* \"$1\"/var/cache/apt/*",
               suite, str(tar), mirror]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise ContainerError(f"mmdebstrap failed ({proc.returncode}): {proc.stderr[-2000:]}")
        podman("import", "--change", 'CMD ["/bin/bash"]', "--change", "ENV LANG=C.UTF-8", str(tar), tag)
    return time.monotonic() - t0


def pip_ca_bundle() -> Path | None:
    """The CA bundle pip is told to trust here (``PIP_CERT``, else pip's ``cert`` setting), or None."""
    cert = os.environ.get("PIP_CERT")
    if not cert:
        proc = subprocess.run([sys.executable, "-m", "pip", "config", "get", "global.cert"],
                              capture_output=True, text=True)
        cert = proc.stdout.strip() if proc.returncode == 0 else ""
    return Path(cert) if cert and Path(cert).is_file() else None


def build_image(context: str | os.PathLike, tag: str, *, base: str | None = DEBIAN_BASE,
                ca_bundle: str | os.PathLike | None = None, quiet: bool = True, timeout: float = 1800.0) -> float:
    """``podman build --format docker`` the recipe folder ``context`` (``glad serve --deploy``) as ``tag``, with
    ``--build-arg BASE_IMAGE=base`` (None: the Dockerfile's default) and ``ca_bundle`` (default
    :func:`pip_ca_bundle`) as the ``pip_ca`` secret. Returns the seconds it took.

    Raises:
        ContainerError: the build failed (the tail of its output in the message).
    """
    args = ["build", "--format", "docker", "--tag", tag]
    if base:
        args += ["--build-arg", f"BASE_IMAGE={base}"]
    ca = Path(ca_bundle) if ca_bundle else pip_ca_bundle()
    if ca is not None:
        args += ["--secret", f"id=pip_ca,src={ca}"]
    t0 = time.monotonic()
    podman(*args, str(context), timeout=timeout, quiet=quiet)
    return time.monotonic() - t0


@dataclass
class Container:
    """A container started by :func:`run_container`: its name, the host ports (on 127.0.0.1) of tritonserver's
    HTTP, gRPC and metrics endpoints, and the operations the checks need."""

    name: str
    image: str
    http_port: int
    grpc_port: int
    metrics_port: int
    started: float = field(default_factory=time.monotonic)

    @property
    def http_url(self) -> str:
        return f"127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def ready(self, timeout: float = 2.0) -> bool:
        """True when ``/v2/health/ready`` answers 200."""
        try:
            with urllib.request.urlopen(f"http://{self.http_url}/v2/health/ready", timeout=timeout) as r:
                return r.status == 200
        except OSError:
            return False

    def state(self) -> dict:
        """``podman inspect``'s ``State`` (``Status``, ``Running``, ``ExitCode``, ``Health`` ...)."""
        proc = podman("inspect", "--type", "container", self.name, check=False)
        return json.loads(proc.stdout)[0]["State"] if proc.returncode == 0 and proc.stdout.strip() else {}

    def wait_ready(self, timeout: float = 120.0) -> float:
        """Wait until ready; returns the seconds since the container was started.

        Raises:
            ContainerError: the container stopped, or not ready within ``timeout`` (with its log tail).
        """
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return time.monotonic() - self.started
            if not self.state().get("Running", False):
                raise ContainerError(f"container {self.name} exited before it was ready:\n{self.logs()[-3000:]}")
            time.sleep(0.5)
        raise ContainerError(f"container {self.name} not ready after {timeout:.0f} s:\n{self.logs()[-3000:]}")

    def logs(self) -> str:
        """Everything the container printed (tritonserver's log), stdout and stderr together."""
        proc = podman("logs", self.name, check=False)
        return (proc.stdout or "") + (proc.stderr or "")

    def exec(self, *cmd: str) -> str:
        """Run ``cmd`` in the container; returns its stdout."""
        return podman("exec", self.name, *cmd).stdout

    def stop(self, timeout: int = 60) -> int:
        """``podman stop`` (SIGTERM, SIGKILL after ``timeout`` s); returns the container's exit code."""
        podman("stop", "--time", str(int(timeout)), self.name, timeout=timeout + 60)
        return int(self.state().get("ExitCode", -1))

    def kill(self) -> None:
        """``podman kill`` (SIGKILL): the container dies at once, in-flight requests with it."""
        podman("kill", self.name, check=False)

    def remove(self) -> None:
        """Remove the container (killed first if it still runs)."""
        podman("rm", "--force", "--time", "0", self.name, check=False)


def run_container(image: str, name: str, *, http_port: int, grpc_port: int, metrics_port: int,
                  container_ports: tuple[int, int, int] = (8000, 8001, 8002), cpus: float | None = None,
                  memory: str | None = None, read_only: bool = False, shm_size: str = "256m",
                  env: dict[str, str] | None = None, replace: bool = True) -> Container:
    """Start ``image`` detached as ``name``, its ports published on 127.0.0.1 only (``http_port``, ``grpc_port``,
    ``metrics_port`` on the host for the container's ``container_ports``).

    Args:
        cpus: ``--cpus`` (a CFS quota: the served ONNX Runtime sessions size their threads from it).
        memory: ``--memory`` (e.g. ``"4g"``).
        read_only: ``--read-only`` root file system, writable only ``/dev/shm`` and a 64 MiB ``/tmp`` tmpfs (what the
            python backend needs; podman's other default tmpfs mounts are turned off).
        shm_size: ``/dev/shm`` size (the python backend's shared memory between server and stubs).
        env: extra environment variables.
        replace: remove a container of that name first.
    Raises:
        ContainerError: podman refused to start it.
    """
    if replace:
        podman("rm", "--force", "--time", "0", name, check=False)
    args = ["run", "--detach", "--name", name, "--shm-size", shm_size]
    for host, inner in zip((http_port, grpc_port, metrics_port), container_ports):
        args += ["--publish", f"127.0.0.1:{host}:{inner}"]
    if cpus is not None:
        args += ["--cpus", str(cpus)]
    if memory:
        args += ["--memory", memory]
    if read_only:
        # only what the server writes: /dev/shm (always) and /tmp (the python backend's stub environments:
        # "Failed to create temporary directory for Python environments" without it); not podman's other tmpfs
        args += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,size=64m,mode=1777"]
    for k, v in (env or {}).items():
        args += ["--env", f"{k}={v}"]
    started = time.monotonic()
    podman(*args, image)
    return Container(name, image, http_port, grpc_port, metrics_port, started=started)
