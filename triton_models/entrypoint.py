"""The CPU container's entrypoint: runs ``tritonserver`` of ``nvidia-pytriton`` and turns a stop signal into a drain.

The CPU image (``glad serve --deploy --target cpu``, :mod:`triton_models.deploy`) runs::

    ENTRYPOINT ["/opt/glad/venv/bin/python", "-m", "triton_models.entrypoint"]
    CMD ["--model-repository=/models", "--http-port=8000", ...]

:func:`main` sets what the bundled server and its python-backend stubs need
(:func:`triton_models.server.pytriton_environment`: ``libpython`` and the wheel's libraries on
``LD_LIBRARY_PATH``, the virtualenv first on ``PATH``), starts ``tritonserver`` as its child and stays PID 1 to
turn the container's stop signal into a drain (:func:`supervise`). SIGTERM alone is not enough for GLAD: on
SIGTERM Triton refuses every new inference request, the BLS requests its entry models send to the network
models included, so the images it had already accepted would fail ("Server not ready"). On SIGTERM or SIGINT
(``docker stop``, ``podman stop``, the kubelet) the entrypoint therefore first drains
(:func:`triton_models.server.drain`: the entry models are unloaded, so new requests are refused at once and
clients fail over, while every accepted request finishes), then passes the signal to ``tritonserver`` and exits
with its exit code. The drain needs ``--model-control-mode=explicit`` (the image's CMD sets it, with
``--load-model=*``); it is bounded by ``--exit-timeout-secs``.

``python -m triton_models.entrypoint --prepare-backends DIR`` assembles the python backend directory
(:func:`triton_models.server.prepare_backend_dir`) at image build time, so a read-only root file system needs
nothing written at start, and checks with ``ldd`` that the server and the stub find every library they link
(:func:`missing_libraries`, under the environment the server will get); the server is then started with
``--backend-directory=DIR`` (:data:`BACKENDS_DIR`, added when no ``--backend-directory`` flag is given).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

# triton_models.server (and what it imports) is imported inside the functions: as PID 1 the entrypoint installs
# its signal handlers first, since the kernel drops a SIGTERM sent to a namespace's PID 1 that has none.

__all__ = ["main", "server_command", "missing_libraries", "supervise", "BACKENDS_DIR"]

#: Where the image assembles the python backend directory at build time.
BACKENDS_DIR = "/opt/glad/backends"


#: The stop signal received (set by the handlers :func:`main` installs before anything else).
_STOP: dict = {"signal": None}


def _on_signal(signum, _frame) -> None:
    _STOP["signal"] = signum


def server_command(args: list[str], backends_dir: str = BACKENDS_DIR) -> list[str]:
    """The ``tritonserver`` command line for ``args`` (tritonserver flags, each ``--flag[=value]``): the bundled
    binary, ``--backend-directory`` (``backends_dir`` unless ``args`` name one), then ``args``, then the flags
    that keep the CPU-only build from reserving CUDA memory pools (unless ``args`` set them).

    Raises:
        ServerStartError: ``nvidia-pytriton`` is not installed.
    """
    from glad_runtime.errors import ServerStartError
    from triton_models.server import PYTRITON_CPU_FLAGS, pytriton_root

    root = pytriton_root()
    if root is None:
        raise ServerStartError("no tritonserver: nvidia-pytriton is not installed in this environment")
    cmd = [str(root / "bin" / "tritonserver")]
    if not any(a.startswith("--backend-directory") for a in args):
        cmd.append(f"--backend-directory={backends_dir}")
    cmd += list(args)
    cmd += [f for f in PYTRITON_CPU_FLAGS if not any(a.startswith(f.split("=")[0]) for a in args)]
    return cmd


def missing_libraries(paths: list[str], env: dict[str, str]) -> list[str]:
    """The ``ldd`` lines ``... => not found`` of the executables / libraries ``paths`` under ``env`` (empty: every
    shared library resolves), each prefixed with the file's name."""
    missing = []
    for path in paths:
        out = subprocess.run(["ldd", str(path)], capture_output=True, text=True, env=env).stdout
        missing += [f"{os.path.basename(path)}: {ln.strip()}" for ln in out.splitlines() if "not found" in ln]
    return missing


def _flag(args: list[str], name: str, default: str) -> str:
    """The value of ``--name=VALUE`` in ``args``: the last one, as tritonserver reads repeated flags."""
    return next((a.split("=", 1)[1] for a in reversed(args) if a.startswith(f"--{name}=")), default)


def supervise(cmd: list[str], env: dict[str, str], *, http_url: str, grace: float, drains: bool) -> int:
    """Run ``cmd`` (tritonserver) as a child in its own session (a terminal's Ctrl-C reaches only this process);
    on SIGTERM / SIGINT drain it through ``http_url`` (when ``drains``: explicit model control) for at most
    ``grace`` seconds, then send it SIGTERM, wait at most ``grace + 15`` s for it (SIGKILL after) and return its
    exit code (``128 + signal`` when a signal ended it). Handlers are installed here too (idempotent).

    Allow the container runtime's stop timeout for both halves: ``docker stop -t`` / ``podman stop -t`` /
    ``--stop-timeout`` of at least 2 x ``--exit-timeout-secs`` + 5 (their default, 10 s, kills a drain midway).
    """
    from triton_models.server import drain

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _on_signal)
    proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if _STOP["signal"] is not None:
            name = signal.Signals(_STOP["signal"]).name
            print(f"triton_models.entrypoint: {name}: draining the entry models (at most {grace:.0f} s), then "
                  "stopping tritonserver", flush=True)
            drained = drain(http_url, grace) if drains else []
            why = "" if drained else (" (no READY entry model answered at " + http_url + ")" if drains else
                                      " (not in explicit model control: Triton's own SIGTERM handling only)")
            print(f"triton_models.entrypoint: drained {', '.join(drained) or 'nothing'}{why}; SIGTERM to "
                  "tritonserver", flush=True)
            proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=grace + 15)
            except subprocess.TimeoutExpired:
                print("triton_models.entrypoint: tritonserver still running; SIGKILL", flush=True)
                proc.kill()
                code = proc.wait()
            break
    return code if code >= 0 else 128 - code


def main(argv: list[str] | None = None) -> int:
    """Prepare the backend directory (``--prepare-backends DIR``: 0, or 1 when a library is missing) or run
    ``tritonserver`` with ``argv`` under :func:`supervise` (its exit code); 2 for a usage error."""
    for sig in (signal.SIGTERM, signal.SIGINT):  # first: a stop signal before this point would be lost
        signal.signal(sig, _on_signal)
    from triton_models.server import prepare_backend_dir, pytriton_environment, pytriton_root

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--prepare-backends"]:
        if len(args) != 2:
            print("usage: python -m triton_models.entrypoint --prepare-backends DIR", file=sys.stderr)
            return 2
        backends = prepare_backend_dir(args[1])
        env = pytriton_environment(dict(os.environ), pytriton_root())
        missing = missing_libraries([server_command([], str(backends))[0],
                                     str(backends / "python" / "triton_python_backend_stub"),
                                     str(backends / "python" / "libtriton_python.so")], env)
        if missing:
            print("triton_models.entrypoint: unresolved shared libraries:\n  " + "\n  ".join(missing),
                  file=sys.stderr)
            return 1
        print(f"{backends}: python backend ready; tritonserver and the stub resolve every shared library")
        return 0
    bad = [a for a in args if not a.startswith("--")]
    if bad:
        print(f"triton_models.entrypoint: tritonserver flags only (--flag[=value]), got {bad}", file=sys.stderr)
        return 2
    cmd = server_command(args)
    env = pytriton_environment(dict(os.environ), pytriton_root())
    http_url = f"127.0.0.1:{_flag(args, 'http-port', '8000')}"
    grace = float(_flag(args, "exit-timeout-secs", "30"))
    return supervise(cmd, env, http_url=http_url, grace=grace,
                     drains=_flag(args, "model-control-mode", "none") == "explicit")


if __name__ == "__main__":
    sys.exit(main())
