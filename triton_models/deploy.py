"""Deploy recipes for a model repository written by ``glad serve`` (issue 16, items 6 and 7).

:func:`write_deploy` turns a Triton model repository (:func:`triton_models.repository.generate_repository`) into a
self-contained folder that builds one container image and runs it on Kubernetes or KServe::

    OUT/
      Dockerfile, .dockerignore   the image: target gpu: NGC tritonserver + this toolkit's runtime; target cpu: a
                                  Debian / Python 3.11 base + this toolkit + nvidia-pytriton's tritonserver; both
                                  with the model repository
      constraints.txt             exact versions of the runtime's Python dependencies (taken from this environment)
      src/                        the toolkit source the image installs (pyproject.toml, glad_runtime, triton_models,
                                  glad_cli; no tests, no build side)
      model_repository/           the models of the chosen prefixes (hard links where possible, else copies)
      k8s/glad-triton.yaml        Deployment, Service, headless Service, HorizontalPodAutoscaler (autoscaling/v2,
                                  on Triton's queue), PodDisruptionBudget
      k8s/prometheus-adapter-rules.yaml  the prometheus-adapter rule that makes the HPA's queue metric exist
      k8s/kserve.yaml             KServe ServingRuntime (this image) + InferenceService (serving.kserve.io/v1beta1)
      grafana/glad-dashboard.json the dashboard of :func:`grafana_dashboard`
      README.md                   build, push, apply

Why an image of our own: the ``<prefix>_glad`` BLS model (and, for ``--target cpu``, every network model) is a
python-backend model that imports ``glad_runtime`` (and ONNX Runtime), so a stock NGC ``tritonserver`` container
cannot load the repository as generated. GPU: the python backend's stub embeds the container's system Python
(``libpython3.12`` in 24.04-based releases), so the runtime is installed for that interpreter (``pip --target``
plus ``PYTHONPATH``, which the stub inherits from ``tritonserver``); the build fails if the stub links another
Python. CPU (issue 34): no NGC image is needed: the ``tritonserver`` of ``nvidia-pytriton`` runs from a virtualenv
on a plain Debian / Python 3.11 base, under :mod:`triton_models.entrypoint`, which drains on SIGTERM.

``tests/unit/test_deploy.py`` lints both Dockerfiles with ``hadolint`` and validates every Kubernetes object
against the Kubernetes JSON schemas (``kubernetes-validate``), the KServe objects against a schema written from
KServe's API types. The CPU image is built and run for real in ``tests/container`` (podman,
:mod:`triton_models.podman`); the GPU image and the manifests are not applied anywhere.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from glad_runtime.errors import PathNotFoundError, UsageError

__all__ = ["write_deploy", "grafana_dashboard", "detect_prefixes", "detect_target", "GLAD_COUNTERS",
           "GLAD_GAUGES", "GLAD_HISTOGRAMS", "TRITON_METRICS", "MODEL_SUFFIXES", "CONTAINER_REPOSITORY"]

#: GLAD metrics the entry models export (``triton_models/python/glad_bls.py``, module docstring): counters ...
GLAD_COUNTERS = ("glad_images_total", "glad_errors_total", "glad_requests_abandoned_total",
                 "glad_ads_decisions_total", "glad_ddim_steps_saved_total", "glad_requests_rejected_total",
                 "glad_requests_malformed_total")
#: ... gauges (the in-flight model's pool) ...
GLAD_GAUGES = ("glad_inflight_images",)
#: ... and histograms (exposed as ``<name>_bucket``, ``<name>_sum``, ``<name>_count``).
GLAD_HISTOGRAMS = ("glad_adaptive_step", "glad_score", "glad_normalized_score")
#: Triton's own per-model metrics the dashboard and the autoscaler use.
TRITON_METRICS = ("nv_inference_request_success", "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                  "nv_inference_compute_infer_duration_us", "nv_inference_pending_request_count")
#: The model-name suffixes :func:`~triton_models.repository.generate_repository` writes under a prefix.
MODEL_SUFFIXES = ("unet", "vae_encoder", "vae_decoder", "dino", "dino_ads", "ads_check", "glad", "glad_inflight")
#: Where the image holds the model repository.
CONTAINER_REPOSITORY = "/models"
#: The site-packages folder the image installs the runtime into (first on the python backend's ``sys.path``).
_SITE = "/opt/glad/site-packages"
#: uid/gid 1000 is ``triton-server`` in NGC tritonserver images (created by Triton's build.py for non-root runs).
_UID = 1000
#: The top-level source entries the image installs from (``.[onnx]`` GPU, ``.[serve]`` CPU; the build side stays out).
_SOURCE_ITEMS = ("pyproject.toml", "README.md", "glad_runtime", "triton_models", "glad_cli")
#: Python of the container the constraints are evaluated for, per target: the GPU image is NGC tritonserver
#: (>= 24.05: Ubuntu 24.04, Python 3.12); the CPU image a Debian 12 / Python 3.11 base (``python:3.11-slim`` or
#: the Debian base made locally, :mod:`triton_models.podman`).
_CONTAINER_PY = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                 "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
                 "implementation_name": "cpython", "platform_python_implementation": "CPython"}
_CONTAINER_PY_CPU = dict(_CONTAINER_PY, python_version="3.11", python_full_version="3.11.2")
#: The CPU image's default base (a build argument: ``--build-arg BASE_IMAGE=...``); any Debian 12 image with
#: ``python3`` 3.11, its ``venv`` module and ``libpython3.11`` works.
CPU_BASE_IMAGE = "python:3.11-slim"
#: The CPU image's virtualenv (the project with the ``serve`` extra: nvidia-pytriton's tritonserver, onnxruntime).
_VENV = "/opt/glad/venv"
#: tritonserver flags :func:`write_deploy` sets itself (from its arguments) and the probes / drain rely on.
_OWN_FLAGS = ("--model-repository", "--http-port", "--grpc-port", "--metrics-port", "--exit-timeout-secs",
              "--allow-http", "--allow-metrics", "--strict-readiness")
_DNS1123 = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")


# --------------------------------------------------------------------------------------------- repository layout

def detect_prefixes(repo: str | os.PathLike) -> list[str]:
    """The model prefixes of a repository: every ``<p>_glad`` folder holding a ``config.pbtxt`` (sorted).

    Raises:
        PathNotFoundError: (a FileNotFoundError) ``repo`` is not a folder.
    """
    repo = Path(repo)
    if not repo.is_dir():
        raise PathNotFoundError(f"{repo}: no model repository (write one with `glad serve BUNDLE --repo {repo}`)")
    return sorted(d.name[:-len("_glad")] for d in repo.iterdir()
                  if d.is_dir() and d.name.endswith("_glad") and len(d.name) > 5 and (d / "config.pbtxt").is_file())


def _models_of(repo: Path, prefix: str) -> list[Path]:
    return [repo / f"{prefix}_{s}" for s in MODEL_SUFFIXES if (repo / f"{prefix}_{s}" / "config.pbtxt").is_file()]


def detect_target(repo: str | os.PathLike, prefixes: list[str]) -> str:
    """``"gpu"`` when any network model of ``prefixes`` runs on a native backend (``platform: "onnxruntime_onnx"``
    or ``"tensorrt_plan"``, what ``glad serve --target gpu`` writes), else ``"cpu"`` (python-backend models)."""
    for p in prefixes:
        for m in _models_of(Path(repo), p):
            text = (m / "config.pbtxt").read_text()
            if re.search(r'platform:\s*"(onnxruntime_onnx|tensorrt_plan)"', text) or "KIND_GPU" in text:
                return "gpu"
    return "cpu"


def _link_tree(src: Path, dst: Path) -> None:
    """Copy ``src`` to ``dst`` with hard links where the file system allows (the graphs can be gigabytes)."""
    for root, dirs, files in os.walk(src):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        rel = Path(root).relative_to(src)
        (dst / rel).mkdir(parents=True, exist_ok=True)
        for f in files:
            if f.endswith(".pyc"):
                continue
            s, d = Path(root) / f, dst / rel / f
            try:
                os.link(s, d)
            except OSError:
                shutil.copy2(s, d)


def _source_root(source: str | os.PathLike | None) -> Path:
    root = Path(source) if source is not None else Path(__file__).resolve().parents[1]
    if not (root / "pyproject.toml").is_file() or not (root / "glad_runtime").is_dir():
        raise PathNotFoundError(
            f"{root}: not the glad-toolkit source tree (no pyproject.toml / glad_runtime); the image installs the "
            "toolkit from source: run from a checkout or pass source=<checkout>")
    return root


# --------------------------------------------------------------------------------------------------- constraints

def _packaging():
    try:
        from packaging.markers import default_environment
        from packaging.requirements import Requirement
    except ImportError:  # pip and setuptools vendor it
        from pip._vendor.packaging.markers import default_environment
        from pip._vendor.packaging.requirements import Requirement
    return Requirement, default_environment


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _pins(source: Path, extras: tuple[str, ...] = ("onnx",),
          python: dict | None = None) -> tuple[dict[str, str], list[str]]:
    """Exact versions, from this environment, of everything ``glad-toolkit[extras]`` of ``source``'s pyproject.toml
    pulls in on the container's Python (markers evaluated for ``python``, default Linux / CPython 3.12), and the
    names left to pip (not installed here, or installed at a version outside the declared range)."""
    import importlib.metadata as md
    import tomllib

    Requirement, default_environment = _packaging()
    env = dict(default_environment(), **(python or _CONTAINER_PY))
    project = tomllib.loads((source / "pyproject.toml").read_text())["project"]
    own = _canon(project["name"])
    optional = project.get("optional-dependencies", {})

    def applies(req, ex) -> bool:
        return req.marker is None or any(req.marker.evaluate(dict(env, extra=e)) for e in set(ex) | {""})

    todo, done_extras = [], set()
    stack = [("", None)] + [(e, None) for e in extras]
    while stack:  # the project's own requirements, its self-references ("glad-toolkit[runtime]") expanded
        extra, _ = stack.pop()
        if extra in done_extras:
            continue
        done_extras.add(extra)
        for line in project.get("dependencies", []) if extra == "" else optional.get(extra, []):
            req = Requirement(line)
            if not applies(req, ()):
                continue
            if _canon(req.name) == own:
                stack += [(e, None) for e in req.extras]
            else:
                todo.append(req)
    pins, loose, seen = {}, [], set()
    while todo:
        req = todo.pop()
        key = (_canon(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = md.distribution(req.name)
        except md.PackageNotFoundError:
            loose.append(_canon(req.name))
            continue
        if req.specifier and not req.specifier.contains(dist.version, prereleases=True):
            loose.append(_canon(req.name))
            continue
        pins[_canon(req.name)] = dist.version
        for line in dist.requires or []:
            sub = Requirement(line)
            if applies(sub, req.extras):
                todo.append(sub)
    for build in ("setuptools",):  # the build backend of pyproject.toml (pip's isolated build environment)
        try:
            pins.setdefault(build, md.version(build))
        except md.PackageNotFoundError:
            loose.append(build)
    return dict(sorted(pins.items())), sorted(set(loose) - set(pins))


# ----------------------------------------------------------------------------------------------------- Dockerfile

def _server_args(repository: str, http: int, grpc: int, metrics: int, exit_timeout_s: int,
                 extra: list[str], target: str = "gpu") -> list[str]:
    """The container's arguments: ``tritonserver`` and its flags for the NGC image (whose entrypoint runs it), the
    flags alone for the CPU image (whose entrypoint, :mod:`triton_models.entrypoint`, runs the server as its child
    and drains it on SIGTERM)."""
    flags = [f"--model-repository={repository}", f"--http-port={http}", f"--grpc-port={grpc}",
             f"--metrics-port={metrics}", "--allow-metrics=true", "--strict-readiness=true",
             f"--exit-timeout-secs={exit_timeout_s}"]
    if not any(a.startswith(("--model-control-mode", "--load-model")) for a in extra):
        # explicit model control (every model loaded at start) so a stop can drain: triton_models.server.drain
        flags += ["--model-control-mode=explicit", "--load-model=*"]
    flags += list(extra)
    return flags if target == "cpu" else ["tritonserver"] + flags


#: The environment both images set: no .pyc writes, unbuffered logs, one OpenMP thread (ONNX Runtime sizes its own
#: pools: glad_runtime.core.cpus), no pip self-check.
_COMMON_ENV = ("PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1", "OMP_NUM_THREADS=1", "PIP_DISABLE_PIP_VERSION_CHECK=1")


def _env(*first: str, last: str | None = None) -> str:
    """One Dockerfile ``ENV`` instruction: ``first``, the common variables, then ``last``, one per line."""
    items = [*first, *_COMMON_ENV, *([last] if last else [])]
    return "ENV " + " \\\n    ".join(items)


def _dockerfile(*, triton_version: str, target: str, prefixes: list[str], args: list[str], http: int, grpc: int,
                metrics: int, glad_version: str) -> str:
    cmd = json.dumps(args)
    health = json.dumps(["python3", "-c", "import urllib.request; urllib.request.urlopen("
                         f"'http://127.0.0.1:{http}/v2/health/ready', timeout=4)"])
    backends = ("network models on Triton's native onnxruntime_onnx / tensorrt_plan backends (GPU),\n# the BLS "
                "loop on the python backend" if target == "gpu" else
                "every model on the python backend\n# (the network models run ONNX Runtime on the CPU inside it)")
    return f"""\
# GLAD on Triton: generated by `glad serve --deploy` (triton_models.deploy, glad-toolkit {glad_version}).
# Build from this folder:  docker build -t IMAGE .
# Models: {", ".join(f"{p}_*" for p in prefixes)}. Target {target}: {backends}.
#
# A stock NGC tritonserver container cannot load this repository: <prefix>_glad is a python-backend BLS model that
# imports glad_runtime (and, on the cpu target, every network model runs ONNX Runtime in the python backend).
# The python backend stub embeds the container's *system* python3 (it links libpython3.12 from
# /lib/x86_64-linux-gnu in 24.04-based images: triton-inference-server/server#8357; the 24.12+ release notes list
# "Ubuntu 24.04 including Python 3.12"), so the runtime is installed for that interpreter: `pip --target` into
# {_SITE} (no clash with Debian's or Triton's own packages, no PEP 668 override) and PYTHONPATH,
# which tritonserver passes on to the stub processes. The first RUN fails the build if the stub links another
# Python than the container's python3.
FROM nvcr.io/nvidia/tritonserver:{triton_version}-py3

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

RUN ldd /opt/tritonserver/backends/python/triton_python_backend_stub \\
    | grep -qF "$(python3 -c 'import sys; print("libpython%d.%d" % sys.version_info[:2])')"

{_env(f"PYTHONPATH={_SITE}")}

# The runtime only (`.[onnx]`: numpy, Pillow, scipy, scikit-image, onnx, onnxruntime), every version pinned by
# constraints.txt (PIP_CONSTRAINT also pins setuptools in pip's isolated build environment).
COPY constraints.txt /opt/glad/constraints.txt
COPY src/ /opt/glad/src/
RUN PIP_CONSTRAINT=/opt/glad/constraints.txt python3 -m pip install --no-cache-dir --target {_SITE} \\
        "/opt/glad/src[onnx]" \\
    && python3 -c "import glad_runtime, onnxruntime, triton_models.repository; print(glad_runtime.__version__)"

# The model repository, read-only to the server.
COPY model_repository/ {CONTAINER_REPOSITORY}/

LABEL org.opencontainers.image.title="glad-triton" \\
      org.opencontainers.image.version="{glad_version}" \\
      org.opencontainers.image.base.name="nvcr.io/nvidia/tritonserver:{triton_version}-py3"

# uid 1000 = triton-server, the non-root user of NGC tritonserver images.
USER {_UID}:{_UID}

EXPOSE {http} {grpc} {metrics}

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD {health}

CMD {cmd}
"""


def _dockerfile_cpu(*, prefixes: list[str], args: list[str], http: int, grpc: int, metrics: int,
                    glad_version: str, base_image: str) -> str:
    """The CPU image: a Debian 12 / Python 3.11 base, the project with its ``serve`` extra in a virtualenv (the
    ``tritonserver`` of ``nvidia-pytriton``, ONNX Runtime), the model repository at ``/models``, non-root, and
    ``tritonserver`` as the container's main process (:mod:`triton_models.entrypoint`), so SIGTERM drains it."""
    python = f"{_VENV}/bin/python"
    health = json.dumps([python, "-c", "import urllib.request; urllib.request.urlopen("
                         f"'http://127.0.0.1:{http}/v2/health/ready', timeout=4)"])
    return f"""\
# GLAD on Triton, CPU image: generated by `glad serve --deploy --target cpu` (triton_models.deploy,
# glad-toolkit {glad_version}). Models: {", ".join(f"{p}_*" for p in prefixes)}; every model on the python backend
# (the network models run ONNX Runtime on the CPU inside it).
#
# Build from this folder:  docker build -t IMAGE .       (or podman build --format docker, for the HEALTHCHECK)
#   --build-arg BASE_IMAGE=...   any Debian 12 image with python3 3.11, its venv module and libpython3.11
#                                (default {CPU_BASE_IMAGE}; where no registry is reachable, a base made from
#                                Debian's packages: glad container base)
#   --secret id=pip_ca,src=FILE  optional: the CA bundle of a TLS-intercepting proxy between pip and the index;
#                                used for the install only, never stored in the image
#
# The server is the tritonserver binary shipped in nvidia-pytriton (Triton 2.51, python backend); its python
# backend stub embeds this image's libpython3.11, the same interpreter as the virtualenv.
ARG BASE_IMAGE={base_image}
FROM ${{BASE_IMAGE}}

SHELL ["/bin/bash", "-o", "pipefail", "-c"]

{_env(f"VIRTUAL_ENV={_VENV}", f"PATH={_VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
       last="PIP_NO_CACHE_DIR=1")}

# The project with its serve extra, every version pinned by constraints.txt (PIP_CONSTRAINT also pins setuptools
# in pip's isolated build environment); the python backend directory assembled now (the root file system may be
# read-only at run time); the build fails if tritonserver or the stub cannot find a shared library (ldd).
COPY constraints.txt /opt/glad/constraints.txt
COPY src/ /opt/glad/src/
RUN --mount=type=secret,id=pip_ca \\
    if [ -s /run/secrets/pip_ca ]; then export PIP_CERT=/run/secrets/pip_ca; fi \\
    && python3 -m venv {_VENV} \\
    && PIP_CONSTRAINT=/opt/glad/constraints.txt {_VENV}/bin/pip install --no-cache-dir "/opt/glad/src[serve]" \\
    && {python} -m triton_models.entrypoint --prepare-backends /opt/glad/backends \\
    && {python} -c "import glad_runtime, onnxruntime, triton_models.repository; print(glad_runtime.__version__)" \\
    && rm -rf /opt/glad/src

# uid/gid 1000, the same non-root user as the NGC image and the Kubernetes manifests.
RUN useradd --uid {_UID} --user-group --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin glad

# The model repository, owned by root: read-only to the server.
COPY model_repository/ {CONTAINER_REPOSITORY}/

LABEL org.opencontainers.image.title="glad-triton-cpu" \\
      org.opencontainers.image.version="{glad_version}"

USER {_UID}:{_UID}

EXPOSE {http} {grpc} {metrics}

HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 CMD {health}

# The entrypoint (triton_models.entrypoint, PID 1) runs tritonserver and, on SIGTERM / SIGINT, drains first: the
# entry models are unloaded (new requests refused at once, clients fail over), the accepted ones finish, then
# tritonserver gets SIGTERM. (SIGTERM alone fails them: Triton then refuses the BLS calls they still make.)
# Writable at run time: /dev/shm (the python backend's shared memory) and /tmp (its stub environments); the root
# file system can be read-only (docker run --read-only --tmpfs /tmp; Kubernetes: the manifests' emptyDir).
STOPSIGNAL SIGTERM
ENTRYPOINT ["{python}", "-m", "triton_models.entrypoint"]
CMD {json.dumps(args)}
"""


_DOCKERIGNORE = """\
# The build context is this folder; the image needs only these (see Dockerfile).
*
!constraints.txt
!src
!model_repository
**/__pycache__
**/*.pyc
src/build
src/**/*.egg-info
"""


# ------------------------------------------------------------------------------------------------------------ YAML

_PLAIN_KEY = re.compile(r"^[A-Za-z0-9_.\-/]+$")


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return json.dumps(v)
    if v is None:
        return "null"
    return json.dumps(str(v))  # a JSON string is a YAML double-quoted scalar


def _key(k: str) -> str:
    return k if _PLAIN_KEY.match(k) else json.dumps(k)


def _inline(v) -> str:
    if isinstance(v, dict):
        return "{}"
    if isinstance(v, list):
        return "[]"
    return _scalar(v)


def _yaml_lines(obj, indent: int) -> list[str]:
    pad = " " * indent
    lines = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            if isinstance(v, (dict, list)) and v:
                lines.append(f"{pad}{_key(k)}:")
                lines += _yaml_lines(v, indent + 2)
            elif isinstance(v, str) and "\n" in v:  # literal block (the adapter's rule file)
                lines.append(f"{pad}{_key(k)}: |")
                lines += [f"{pad}  {line}".rstrip() for line in v.rstrip("\n").split("\n")]
            else:
                lines.append(f"{pad}{_key(k)}: {_inline(v)}")
    elif isinstance(obj, list):
        for item in obj:
            if isinstance(item, (dict, list)) and item:
                sub = _yaml_lines(item, indent + 2)
                lines.append(f"{pad}- {sub[0].lstrip()}")
                lines += sub[1:]
            else:
                lines.append(f"{pad}- {_inline(item)}")
    else:
        lines.append(pad + _scalar(obj))
    return lines


def _yaml_docs(docs: list[tuple[str, dict]]) -> str:
    """YAML documents, each preceded by its comment block (a small emitter: no PyYAML needed at run time)."""
    out = []
    for comment, obj in docs:
        out.append("---")
        out += [f"# {c}".rstrip() for c in comment.strip("\n").splitlines()]
        out += _yaml_lines(obj, 0)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------ Kubernetes

def _probe(path: str, port: int, period: int, failures: int, timeout: int = 3, initial: int = 0) -> dict:
    p = {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "timeoutSeconds": timeout,
         "failureThreshold": failures}
    if initial:
        p["initialDelaySeconds"] = initial
    return p


def _resources(target: str, cpu: str, memory: str, gpus: int) -> dict:
    """Requests and limits. The CPU target also limits ``cpu`` (= the request): the served ONNX Runtime sessions
    size their threads from the cgroup quota (glad_runtime.core.cpus, checked with ``--cpus`` in tests/container);
    without a limit they would size from the node's cores."""
    req = {"cpu": cpu, "memory": memory}
    lim = {"memory": memory} if target == "gpu" else {"cpu": cpu, "memory": memory}
    if target == "gpu":
        req["nvidia.com/gpu"] = str(gpus)
        lim["nvidia.com/gpu"] = str(gpus)
    return {"requests": req, "limits": lim}


def _prestop(target: str, http: int, prestop_s: int, exit_timeout_s: int) -> list[str]:
    """The preStop command: sleep ``prestop_s`` (endpoints drop the pod), then drain the entry models
    (:func:`triton_models.server.drain`, at most ``exit_timeout_s``) so the kubelet's SIGTERM finds nothing in
    flight; Triton refuses the BLS calls of accepted requests once it has SIGTERM (tests/container)."""
    python = f"{_VENV}/bin/python" if target == "cpu" else "python3"
    return [python, "-c", f"import time; time.sleep({int(prestop_s)}); from triton_models.server import drain; "
            f"drain('127.0.0.1:{int(http)}', {int(exit_timeout_s)})"]


def _grace(prestop_s: int, exit_timeout_s: int) -> int:
    """``terminationGracePeriodSeconds``: the preStop sleep, its drain (at most the exit timeout), Triton's own exit
    after SIGTERM (at most the exit timeout again) and 15 s of margin."""
    return prestop_s + 2 * exit_timeout_s + 15


def _container_security(target: str) -> dict:
    """Non-root, no privilege escalation, no capabilities; on the CPU image also a read-only root file system (run
    that way in tests/container: only /dev/shm and /tmp are written, both volumes, :func:`_volumes`)."""
    sec = {"runAsNonRoot": True, "runAsUser": _UID, "runAsGroup": _UID, "allowPrivilegeEscalation": False,
           "privileged": False, "capabilities": {"drop": ["ALL"]}}
    if target == "cpu":
        sec["readOnlyRootFilesystem"] = True
    return sec


def _volumes(target: str, shm_size: str) -> tuple[list[dict], list[dict]]:
    """``(volumes, volumeMounts)``: the memory-backed ``/dev/shm`` of the python backend, and on the CPU image
    (read-only root) a small ``/tmp`` for the python backend's stub environments."""
    vols = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": shm_size}}]
    mounts = [{"name": "dshm", "mountPath": "/dev/shm"}]
    if target == "cpu":
        vols.append({"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}})
        mounts.append({"name": "tmp", "mountPath": "/tmp"})
    return vols, mounts


def _k8s_objects(*, name: str, namespace: str | None, image: str, target: str, prefixes: list[str], replicas: int,
                 max_replicas: int, args: list[str], http: int, grpc: int, metrics: int, exit_timeout_s: int,
                 prestop_s: int, startup_timeout_s: int, cpu: str, memory: str, gpus: int, shm_size: str,
                 target_pending: int, glad_version: str) -> list[tuple[str, dict]]:
    labels = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference-server",
              "app.kubernetes.io/part-of": "glad", "app.kubernetes.io/version": glad_version}
    selector = {"app.kubernetes.io/name": name, "app.kubernetes.io/component": "inference-server"}

    def meta(n: str) -> dict:
        m = {"name": n, "labels": dict(labels)}
        if namespace:
            m["namespace"] = namespace
        return m

    # preStop: the sleep lets the Service drop the pod, then the drain (both bounded), then the kubelet's SIGTERM
    grace = _grace(prestop_s, exit_timeout_s)
    volumes, mounts = _volumes(target, shm_size)
    period = 10
    ports = [{"name": "http", "containerPort": http, "protocol": "TCP"},
             {"name": "grpc", "containerPort": grpc, "protocol": "TCP"},
             {"name": "metrics", "containerPort": metrics, "protocol": "TCP"}]
    pod_spec = {
        "terminationGracePeriodSeconds": grace,
        "securityContext": {"runAsNonRoot": True, "runAsUser": _UID, "runAsGroup": _UID, "fsGroup": _UID,
                            "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [{
            "name": "tritonserver",
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "args": args,  # keeps the image's entrypoint (NGC: nvidia_entrypoint.sh; CPU: triton_models.entrypoint)
            "ports": ports,
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "resources": _resources(target, cpu, memory, gpus),
            "startupProbe": _probe("/v2/health/ready", http, period, max(1, -(-startup_timeout_s // period))),
            "readinessProbe": _probe("/v2/health/ready", http, 5, 2),
            "livenessProbe": _probe("/v2/health/live", http, 10, 3),
            "lifecycle": {"preStop": {"exec": {"command": _prestop(target, http, prestop_s, exit_timeout_s)}}},
            "securityContext": _container_security(target),
            "volumeMounts": mounts,
        }],
        "volumes": volumes,
    }
    if target == "gpu":
        pod_spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    deployment = {
        "apiVersion": "apps/v1", "kind": "Deployment", "metadata": meta(name),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}},
            "template": {
                "metadata": {"labels": dict(labels),
                             "annotations": {"prometheus.io/scrape": "true", "prometheus.io/port": str(metrics),
                                             "prometheus.io/path": "/metrics"}},
                "spec": pod_spec,
            },
        },
    }
    svc_ports = [{"name": "grpc", "port": grpc, "targetPort": "grpc", "protocol": "TCP", "appProtocol": "grpc"},
                 {"name": "http", "port": http, "targetPort": "http", "protocol": "TCP", "appProtocol": "http"},
                 {"name": "metrics", "port": metrics, "targetPort": "metrics", "protocol": "TCP"}]
    service = {"apiVersion": "v1", "kind": "Service", "metadata": meta(name),
               "spec": {"type": "ClusterIP", "selector": selector, "ports": svc_ports}}
    headless = {"apiVersion": "v1", "kind": "Service", "metadata": meta(f"{name}-pods"),
                "spec": {"clusterIP": "None", "selector": selector, "publishNotReadyAddresses": False,
                         "ports": svc_ports[:2]}}
    hpa = {
        "apiVersion": "autoscaling/v2", "kind": "HorizontalPodAutoscaler", "metadata": meta(name),
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": name},
            "minReplicas": replicas, "maxReplicas": max_replicas,
            "metrics": [{"type": "Pods", "pods": {
                "metric": {"name": "nv_inference_pending_request_count"},
                "target": {"type": "AverageValue", "averageValue": str(target_pending)}}}],
            "behavior": {
                "scaleUp": {"stabilizationWindowSeconds": 0,
                            "policies": [{"type": "Pods", "value": 2, "periodSeconds": 60}]},
                "scaleDown": {"stabilizationWindowSeconds": 300,
                              "policies": [{"type": "Pods", "value": 1, "periodSeconds": 120}]},
            },
        },
    }
    pdb = {"apiVersion": "policy/v1", "kind": "PodDisruptionBudget", "metadata": meta(name),
           "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector}}}
    models = ", ".join(f"{p}_glad" for p in prefixes)
    return [
        (f"""GLAD on Triton ({models}; target {target}),
generated by `glad serve --deploy` (glad-toolkit {glad_version}).
Probes: the KServe v2 health endpoints on the HTTP port. startupProbe gives a slow model load (TensorRT engines,
python-backend stubs) up to {startup_timeout_s} s before readiness/liveness count; readiness drops a pod out of the
Service as soon as Triton stops being ready (drain, a model unloaded).
Shutdown: preStop sleeps {prestop_s} s so the endpoints controller removes the pod, then drains (at most
{exit_timeout_s} s): the entry models are unloaded, new requests are refused and every accepted one finishes (Triton
alone, on SIGTERM, refuses the BLS calls those still make); then SIGTERM, --exit-timeout-secs={exit_timeout_s};
terminationGracePeriodSeconds={grace} (> {prestop_s} + 2 x {exit_timeout_s}) lets both end before SIGKILL.
Rollout: maxUnavailable 0 / maxSurge 1, so serving capacity never drops during an image or bundle update.
/dev/shm: the python backend exchanges tensors with its stubs through shared memory; the container runtime's
default 64 MiB is too small for batches of 512x512 images, hence the memory-backed emptyDir ({shm_size}).
Metrics: Triton's and GLAD's (glad_*) on port {metrics}, scraped through the prometheus.io annotations.""",
         deployment),
        ("""ClusterIP Service: grpc (clients: GladClient / glad detect --server), http (KServe v2 REST), metrics.
gRPC keeps one HTTP/2 connection per client, which kube-proxy balances per connection, not per request: for
per-request spreading give GladClient the pod addresses of the headless Service below, or use a gRPC-aware mesh.""",
         service),
        ("""Headless Service: one DNS A record per ready pod (<name>-pods.<namespace>.svc), for client-side balancing
and failover over replicas (GladClient takes several URLs).""", headless),
        (f"""Autoscaling on Triton's queue: the average, over pods, of nv_inference_pending_request_count (requests
queued, not yet executing, at the {models} BLS models: the backlog clients wait on).
This is a Pods metric of the custom metrics API (custom.metrics.k8s.io), which Kubernetes does not serve by
itself: install a Prometheus adapter (kubernetes-sigs/prometheus-adapter) with the rule in
prometheus-adapter-rules.yaml, or this HPA reports <unknown> and never scales.
Scale up fast, down slowly (a scale-down drains a pod, see the Deployment).""", hpa),
        ("""At most one replica voluntarily disrupted at a time (node drains, cluster upgrades).""", pdb),
    ]


def _adapter_rules(name: str, namespace: str | None, glad_version: str) -> list[tuple[str, dict]]:
    rule = "\n".join([
        "rules:",
        "  - seriesQuery: 'nv_inference_pending_request_count{namespace!=\"\",pod!=\"\"}'",
        "    resources:",
        "      overrides:",
        "        namespace: {resource: \"namespace\"}",
        "        pod: {resource: \"pod\"}",
        "    name:",
        "      matches: \"^nv_inference_pending_request_count$\"",
        "      as: \"nv_inference_pending_request_count\"",
        "    metricsQuery: 'sum(<<.Series>>{<<.LabelMatchers>>,model=~\".+_glad\"}) by (<<.GroupBy>>)'",
        ""])
    meta = {"name": f"{name}-adapter-rules", "labels": {"app.kubernetes.io/part-of": "glad",
                                                        "app.kubernetes.io/version": glad_version}}
    if namespace:
        meta["namespace"] = namespace
    return [("""The prometheus-adapter rule behind the HorizontalPodAutoscaler of glad-triton.yaml: it publishes,
per pod, the sum over the pod's <prefix>_glad models of Triton's nv_inference_pending_request_count as the Pods metric
nv_inference_pending_request_count. Merge `config.yaml` into the adapter's own configuration (Helm chart
prometheus-community/prometheus-adapter: values `rules.custom`); Prometheus must scrape the pods (the Deployment's
prometheus.io annotations) with `namespace` and `pod` labels.""",
             {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta, "data": {"config.yaml": rule}})]


def _kserve_objects(*, name: str, namespace: str | None, image: str, target: str, prefixes: list[str],
                    replicas: int, max_replicas: int, exit_timeout_s: int, cpu: str, memory: str, gpus: int,
                    shm_size: str, target_pending: int, storage_uri: str | None, extra: list[str],
                    glad_version: str, prestop_s: int) -> list[tuple[str, dict]]:
    runtime = f"{name}-runtime"
    store = "/mnt/models" if storage_uri else CONTAINER_REPOSITORY
    args = _server_args(store, 8080, 9000, 8002, exit_timeout_s, extra, target)
    meta_rt = {"name": runtime, "labels": {"app.kubernetes.io/part-of": "glad",
                                           "app.kubernetes.io/version": glad_version}}
    meta_is = {"name": name, "labels": dict(meta_rt["labels"])}
    if namespace:
        meta_rt["namespace"] = namespace
        meta_is["namespace"] = namespace
    volumes, mounts = _volumes(target, shm_size)
    serving_runtime = {
        "apiVersion": "serving.kserve.io/v1alpha1", "kind": "ServingRuntime", "metadata": meta_rt,
        "spec": {
            "annotations": {"prometheus.kserve.io/port": "8002", "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [{"name": "triton", "version": "2", "autoSelect": False}],
            "protocolVersions": ["v2", "grpc-v2"],
            "multiModel": False,
            "containers": [{
                "name": "kserve-container",
                "image": image,
                "args": args,
                "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
                "resources": _resources(target, cpu, memory, gpus),
                "readinessProbe": _probe("/v2/health/ready", 8080, 5, 2),
                "livenessProbe": _probe("/v2/health/live", 8080, 10, 3, initial=30),
                "lifecycle": {"preStop": {"exec": {"command": _prestop(target, 8080, prestop_s, exit_timeout_s)}}},
                "securityContext": _container_security(target),
                "volumeMounts": mounts,
            }],
            "volumes": volumes,
        },
    }
    model = {"modelFormat": {"name": "triton", "version": "2"}, "runtime": runtime, "protocolVersion": "v2",
             "resources": _resources(target, cpu, memory, gpus)}
    if storage_uri:
        model["storageUri"] = storage_uri
    inference_service = {
        "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "metadata": meta_is,
        "spec": {"predictor": {"minReplicas": replicas, "maxReplicas": max_replicas,
                               "scaleMetric": "concurrency", "scaleTarget": target_pending,
                               "terminationGracePeriodSeconds": _grace(prestop_s, exit_timeout_s),
                               "timeout": 300, "model": model}},
    }
    models = ", ".join(f"{p}_glad" for p in prefixes)
    where = (f"storageUri {storage_uri}: KServe's storage initializer downloads the model repository to /mnt/models"
             if storage_uri else
             f"no storageUri: the model repository baked into the image ({CONTAINER_REPOSITORY}) is served")
    return [
        (f"""KServe ServingRuntime for GLAD ({models}).
KServe's own kserve-tritonserver runtime runs the stock NGC image, which cannot load the <prefix>_glad
python-backend BLS model (it imports glad_runtime), so this runtime runs the image built from ../Dockerfile.
Same shape as kserve/kserve config/runtimes/kserve-tritonserver.yaml: container kserve-container, HTTP 8080 /
gRPC 9000 (KServe's ports for Triton), Prometheus metrics on 8002 via the prometheus.kserve.io annotations,
non-root uid 1000. autoSelect is off: only InferenceServices that name this
runtime use it. Schema: serving.kserve.io/v1alpha1 ServingRuntimeSpec
(kserve/kserve pkg/apis/serving/v1alpha1/servingruntime_types.go).""",
         serving_runtime),
        (f"""KServe InferenceService (serving.kserve.io/v1beta1) for the Triton runtime: predictor.model with
modelFormat triton (version 2) and runtime {runtime}
(ModelSpec, kserve/kserve pkg/apis/serving/v1beta1/predictor_model.go);
{where}.
Replicas and autoscaling (ComponentExtensionSpec, component.go): minReplicas/maxReplicas, scaleMetric
concurrency with scaleTarget {target_pending} in-flight requests per pod (Knative Pod Autoscaler, KServe's default
Serverless mode).
In RawDeployment mode KServe's HPA scales on cpu/memory only: there, prefer k8s/glad-triton.yaml (queue-based HPA).
Serverless mode exposes one port: HTTP (8080) here; for gRPC add ports: [{{name: h2c, containerPort: 9000}}].""",
         inference_service),
    ]


# -------------------------------------------------------------------------------------------------------- Grafana

def _panel(pid: int, title: str, targets: list[tuple[str, str]], x: int, y: int, *, unit: str = "short",
           kind: str = "timeseries", w: int = 12, h: int = 8, description: str = "") -> dict:
    return {
        "id": pid, "type": kind, "title": title, "description": description,
        "datasource": {"type": "prometheus", "uid": "${datasource}"},
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}} if kind == "timeseries" else {},
        "targets": [{"refId": chr(ord("A") + i), "expr": e, "legendFormat": legend,
                     "datasource": {"type": "prometheus", "uid": "${datasource}"}}
                    for i, (e, legend) in enumerate(targets)],
    }


def grafana_dashboard() -> dict:
    """The Grafana dashboard (JSON model, schemaVersion 39) of a GLAD Triton deployment.

    Variables: ``datasource`` (any Prometheus data source), ``model`` (the ``<prefix>_glad`` BLS models: GLAD
    panels) and ``triton_model`` (every Triton model: latency panels). Panels: images/s by label, anomaly rate
    (anomalous / all scored), error rate and errors by type, abandoned requests by reason, ADS trigger rate and
    outcomes, adaptive-step, raw and normalised score quantiles (``histogram_quantile`` over the ``_bucket``
    series), DDIM steps saved, and Triton's request rate, average request / queue / compute latency, pending
    requests, the in-flight pool (images queued or in flight, requests refused by reason), and refused input
    (malformed requests by reason, oversized images). Every expression names only :data:`GLAD_COUNTERS`,
    :data:`GLAD_GAUGES`, :data:`GLAD_HISTOGRAMS` and :data:`TRITON_METRICS`.
    """
    m = '{model=~"$model"}'
    tm = '{model=~"$triton_model"}'
    r = "[$__rate_interval]"

    def rate(metric: str, sel: str = m, by: str = "") -> str:
        inner = f"rate({metric}{sel}{r})"
        return f"sum by ({by}) ({inner})" if by else f"sum({inner})"

    def sel_with(extra: str) -> str:
        return '{model=~"$model",' + extra + "}"

    def quantiles(h: str) -> list[tuple[str, str]]:
        return [(f"histogram_quantile({q}, sum by (le) (rate({h}_bucket{m}{r})))", f"p{int(q * 100)}")
                for q in (0.5, 0.9, 0.99)]

    anomalous = rate("glad_images_total", sel_with('label="anomalous"'))
    triggered = rate("glad_ads_decisions_total", sel_with('state="triggered"'))
    ads_on = rate("glad_ads_decisions_total", sel_with('state!="off"'))
    triton_avg = [
        (f"sum by (model) (rate(nv_inference_request_duration_us{tm}{r})) / "
         f"sum by (model) (rate(nv_inference_request_success{tm}{r}))", "request {{model}}"),
        (f"sum by (model) (rate(nv_inference_queue_duration_us{tm}{r})) / "
         f"sum by (model) (rate(nv_inference_request_success{tm}{r}))", "queue {{model}}"),
        (f"sum by (model) (rate(nv_inference_compute_infer_duration_us{tm}{r})) / "
         f"sum by (model) (rate(nv_inference_request_success{tm}{r}))", "compute {{model}}"),
    ]
    panels = [
        _panel(1, "Images scored / s by label", [(rate("glad_images_total", by="label"), "{{label}}")], 0, 0,
               unit="reqps", description="glad_images_total: normal / anomalous / unlabelled (bundle not calibrated)"),
        _panel(2, "Anomaly rate (anomalous / all scored)",
               [(f"{anomalous} / {rate('glad_images_total')}", "anomaly rate")], 12, 0, unit="percentunit",
               description="A jump or drift here is the line's first alarm (process change, camera, lighting)."),
        _panel(3, "Error rate (errors / (scored + errors))",
               [(f'{rate("glad_errors_total")} / ({rate("glad_images_total")} + {rate("glad_errors_total")})',
                 "error rate")], 0, 8, unit="percentunit"),
        _panel(4, "Errors / s by type", [(rate("glad_errors_total", by="type"), "{{type}}")], 12, 8, unit="reqps"),
        _panel(5, "Abandoned requests / s by reason",
               [(rate("glad_requests_abandoned_total", by="reason"), "{{reason}}")], 0, 16, unit="reqps",
               description="Requests stopped because the client cancelled them or their timeout passed."),
        _panel(6, "DDIM steps saved / s (abandoned work not run)",
               [(rate("glad_ddim_steps_saved_total"), "steps saved")], 12, 16, unit="short"),
        _panel(7, "ADS trigger rate (triggered / ADS on)",
               [(f"{triggered} / {ads_on}", "trigger rate")],
               0, 24, unit="percentunit",
               description="Share of images with ADS on where SAFF triggered (vs forced at the last candidate step "
                           "or undecided)."),
        _panel(8, "ADS outcomes / s by state", [(rate("glad_ads_decisions_total", by="state"), "{{state}}")],
               12, 24, unit="reqps"),
        _panel(9, "Adaptive step (DDIM timestep of the ADS decision)", quantiles("glad_adaptive_step"), 0, 32),
        _panel(10, "Raw score quantiles", quantiles("glad_score"), 12, 32),
        _panel(11, "Normalised score quantiles (threshold 0.5)", quantiles("glad_normalized_score"), 0, 40),
        _panel(12, "Triton requests / s by model",
               [(rate("nv_inference_request_success", tm, by="model"), "{{model}}")], 12, 40, unit="reqps"),
        _panel(13, "Triton average latency: request, queue, compute", triton_avg, 0, 48, unit="µs"),
        _panel(14, "Triton pending requests by model",
               [(f"sum by (model) (nv_inference_pending_request_count{tm})", "{{model}}")], 12, 48, unit="short",
               description="The autoscaler's signal (k8s/glad-triton.yaml HorizontalPodAutoscaler)."),
        _panel(15, "In-flight pool: images queued or in flight",
               [(f"sum by (model) (glad_inflight_images{m})", "{{model}}")], 0, 56, unit="short",
               description="<prefix>_glad_inflight: images in its step-level pool (bounded by max_active + "
                           "max_queue)."),
        _panel(16, "In-flight requests refused / s by reason",
               [(rate("glad_requests_rejected_total", by="reason"), "{{reason}}")], 12, 56, unit="reqps",
               description="pool_full: back-pressure (clients retry with backoff or fail over); closing: unload."),
        _panel(17, "Refused input / s: malformed requests by reason, oversized images",
               [(rate("glad_requests_malformed_total", by="reason"), "malformed: {{reason}}"),
                (rate("glad_errors_total", sel_with('type="ImageTooLargeError"')), "image too large")],
               0, 64, unit="reqps",
               description="Client bugs, not server faults (answered INVALID_ARG): a request refused whole "
                           "(glad_requests_malformed_total) or one image over the size limit "
                           "(glad_errors_total{type=\"ImageTooLargeError\"})."),
    ]
    return {
        "title": "GLAD anomaly detection on Triton",
        "uid": "glad-triton",
        "description": "GLAD metrics of the <prefix>_glad BLS models and Triton's latency metrics "
                       "(generated by triton_models.deploy.grafana_dashboard)",
        "tags": ["glad", "triton", "anomaly-detection"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [
            {"name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1},
            {"name": "model", "label": "GLAD model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(glad_images_total, model)", "refId": "model"},
             "definition": "label_values(glad_images_total, model)", "includeAll": True, "multi": True,
             "allValue": ".+", "current": {}, "refresh": 2, "hide": 0},
            {"name": "triton_model", "label": "Triton model", "type": "query",
             "datasource": {"type": "prometheus", "uid": "${datasource}"},
             "query": {"query": "label_values(nv_inference_request_success, model)", "refId": "triton_model"},
             "definition": "label_values(nv_inference_request_success, model)", "includeAll": True, "multi": True,
             "allValue": ".+", "current": {}, "refresh": 2, "hide": 0},
        ]},
        "annotations": {"list": []},
        "panels": panels,
    }


# --------------------------------------------------------------------------------------------------------- README

def _readme(*, image: str, name: str, target: str, prefixes: list[str], storage_uri: str | None,
            exit_timeout_s: int) -> str:
    return f"""\
# GLAD deploy recipe ({", ".join(prefixes)}; target {target})

Generated by `glad serve --deploy` (`triton_models.deploy.write_deploy`). Regenerate after re-serving.

```bash
{"docker build -t " + image + " .   # NGC tritonserver + glad runtime + model_repository/" if target == "gpu" else
 "docker build -t " + image + " .   # Debian/Python 3.11 base (--build-arg BASE_IMAGE=...) + glad + pytriton + models"}
{"" if target == "gpu" else "docker run --rm -p 8000-8002:8000-8002 --cpus 4 --read-only --tmpfs /tmp --shm-size 1g --stop-timeout " + str(2 * exit_timeout_s + 5) + " " + image + chr(10)}docker push {image}
kubectl apply -f k8s/glad-triton.yaml   # Deployment, Services, HPA, PodDisruptionBudget
# the HPA scales on Triton's queue: install prometheus-adapter with k8s/prometheus-adapter-rules.yaml
kubectl apply -f k8s/kserve.yaml        # or: KServe ServingRuntime + InferenceService
```

Grafana: import `grafana/glad-dashboard.json` and pick the Prometheus data source.
Clients: `GladClient(["{name}.<namespace>.svc:8001"], "<prefix>")`; for per-request balancing over replicas use
the pod addresses of the headless Service `{name}-pods`.
{"KServe reads the model repository from " + storage_uri + " (upload model_repository/ there)." if storage_uri else
 "KServe serves the repository baked into the image (no storageUri)."}

What the generator's tests check offline (glad-toolkit tests/unit/test_deploy.py): hadolint finds nothing in the
Dockerfile; every Kubernetes object validates against the Kubernetes 1.30+ JSON schemas (kubernetes-validate, strict);
the KServe objects validate against a schema written from KServe's API types; the dashboard names only metrics the
server exports. {"The CPU image is built and run by glad-toolkit's tests/container (podman): probes, --cpus, a read-only "
"root file system, the drain on SIGTERM and failover between two containers. " if target == "cpu" else
"The GPU image has not been built by the toolkit's tests (no NGC registry there). "}Not tested: a cluster, KServe, the
Prometheus adapter.
"""


# ----------------------------------------------------------------------------------------------------------- main

def write_deploy(repo: str | os.PathLike, out: str | os.PathLike, *, image: str, prefixes: list[str] | None = None,
                 target: str | None = None, name: str = "glad-triton", namespace: str | None = None,
                 replicas: int = 2, max_replicas: int | None = None, triton_version: str = "25.01",
                 grpc_port: int = 8001, http_port: int = 8000, metrics_port: int = 8002, exit_timeout_s: int = 30,
                 prestop_s: int = 5, startup_timeout_s: int = 600, cpu: str = "4", memory: str = "8Gi",
                 gpus: int = 1, shm_size: str = "1Gi", target_pending: int = 4, storage_uri: str | None = None,
                 server_args: list[str] | tuple[str, ...] = (), source: str | os.PathLike | None = None,
                 base_image: str = CPU_BASE_IMAGE) -> list[Path]:
    """Write the container, Kubernetes, KServe and Grafana recipes for a ``glad serve`` model repository.

    ``out`` becomes a Docker build context (``docker build -t IMAGE OUT``): ``Dockerfile`` (target ``gpu``: FROM
    ``nvcr.io/nvidia/tritonserver:<triton_version>-py3``, the runtime installed for the python backend's Python;
    target ``cpu``: FROM ``ARG BASE_IMAGE`` (``base_image``, a Debian 12 / Python 3.11 image), the project and
    ``nvidia-pytriton`` in a virtualenv, ``tritonserver`` run by the drain-aware entrypoint; both: the repository at
    ``/models``, non-root uid 1000, HEALTHCHECK on ``/v2/health/ready``), ``.dockerignore``,
    ``constraints.txt``, ``src/`` (the toolkit source), ``model_repository/`` (the models of ``prefixes``, hard
    links where possible), ``k8s/glad-triton.yaml`` (Deployment, Service, headless Service, HPA on Triton's queue,
    PodDisruptionBudget), ``k8s/prometheus-adapter-rules.yaml``, ``k8s/kserve.yaml`` (ServingRuntime +
    InferenceService), ``grafana/glad-dashboard.json`` and ``README.md``. Files of an earlier run are replaced.

    Args:
        repo: the model repository (``glad serve BUNDLE --repo REPO``).
        out: the output folder (created); must not lie inside ``repo`` (Triton would take it for models).
        image: the image reference the manifests run, with a tag or digest (``registry/glad-triton:1.0``).
        prefixes: the model prefixes to ship (default: every ``<p>_glad`` in ``repo``).
        target: ``"cpu"`` or ``"gpu"``; default from the repository (:func:`detect_target`). ``gpu`` requests
            ``gpus`` ``nvidia.com/gpu`` per pod.
        name: Kubernetes name of the Deployment / Services / HPA / InferenceService (DNS-1123 label).
        namespace: set on every object when given (else ``kubectl``'s current namespace).
        replicas: Deployment replicas and the autoscalers' minimum; max_replicas: their maximum (default 4x).
        triton_version: NGC release (``YY.MM``) of the base image.
        grpc_port, http_port, metrics_port: tritonserver's ports (Deployment, Service, Dockerfile).
        exit_timeout_s: ``--exit-timeout-secs`` and the drain's bound (the entry models are unloaded and the
            accepted requests finish, :func:`triton_models.server.drain`); prestop_s: the preStop sleep before
            that drain; ``terminationGracePeriodSeconds`` = prestop_s + 2 x exit_timeout_s + 15.
        startup_timeout_s: how long the startupProbe lets models load.
        cpu, memory, gpus: container resources; shm_size: the ``/dev/shm`` emptyDir of the python backend.
        target_pending: HPA target, average pending requests per pod (KServe: concurrency per pod).
        storage_uri: KServe ``storageUri`` of the repository (default: serve the copy baked into the image).
        server_args: extra ``tritonserver`` flags (each ``--flag[=value]``), passed in the image's CMD and both
            manifests.
        source: the glad-toolkit source tree to install (default: the checkout this module is imported from).
        base_image: target ``cpu``: the ``BASE_IMAGE`` build argument's default (``python:3.11-slim``).
    Returns:
        the paths written: the recipe files, then the ``src`` and ``model_repository`` folders.
    Raises:
        PathNotFoundError: (a FileNotFoundError) ``repo`` missing, a prefix without ``<p>_glad/config.pbtxt``, no
            prefix at all, or no source tree (installed from a wheel: pass ``source``).
        UsageError: bad argument (image without tag or ``:latest``, target, name, ports, replicas, versions,
            server_args), or ``out`` inside ``repo``.
    """
    repo, out = Path(repo), Path(out)
    found = detect_prefixes(repo)
    prefixes = list(prefixes) if prefixes is not None else found
    if not prefixes:
        raise PathNotFoundError(f"{repo}: no <prefix>_glad model (write one with `glad serve BUNDLE --repo {repo}`)")
    for p in prefixes:
        if p not in found:
            raise PathNotFoundError(f"{repo}: no model {p}_glad (config.pbtxt); prefixes here: {found}")
    target = target or detect_target(repo, prefixes)
    if target not in ("cpu", "gpu"):
        raise UsageError(f"target must be 'cpu' or 'gpu', got {target!r}")
    if not image or re.search(r"\s", image):
        raise UsageError(f"image must be an image reference, got {image!r}")
    last = image.rsplit("/", 1)[-1]
    if "@" not in image and (":" not in last or last.endswith(":latest")):
        raise UsageError(f"image {image!r}: give a pinned tag or digest (not latest), so rollouts are reproducible")
    if not _DNS1123.match(name) or len(name) > 58:
        raise UsageError(f"name {name!r} must be a DNS-1123 label (lower case, digits, '-'; at most 58 characters)")
    if namespace is not None and not _DNS1123.match(namespace):
        raise UsageError(f"namespace {namespace!r} must be a DNS-1123 label")
    if not re.fullmatch(r"\d{2}\.\d{2}", triton_version):
        raise UsageError(f"triton_version must be an NGC release YY.MM (e.g. 25.01), got {triton_version!r}")
    ports = (http_port, grpc_port, metrics_port)
    if len(set(ports)) != 3 or not all(1 <= p <= 65535 for p in ports):
        raise UsageError(f"http, grpc and metrics ports must be distinct TCP ports, got {ports}")
    if replicas < 1:
        raise UsageError("replicas must be >= 1")
    max_replicas = max_replicas if max_replicas is not None else 4 * replicas
    if max_replicas < replicas:
        raise UsageError(f"max_replicas ({max_replicas}) < replicas ({replicas})")
    for v, what in ((exit_timeout_s, "exit_timeout_s"), (prestop_s, "prestop_s"),
                    (startup_timeout_s, "startup_timeout_s"), (target_pending, "target_pending"), (gpus, "gpus")):
        if int(v) < (0 if what == "prestop_s" else 1):
            raise UsageError(f"{what} must be positive, got {v}")
    extra = list(server_args)
    bad = [a for a in extra if not a.startswith("--") or re.search(r"\s", a)]
    if bad:
        raise UsageError(f"server_args must be single tritonserver flags '--flag[=value]', got {bad}")
    owned = [a for a in extra if a.split("=", 1)[0] in _OWN_FLAGS]
    if owned:  # tritonserver reads the last of a repeated flag; the probes, drain and grace period the first
        raise UsageError(f"server_args {owned}: set by the generator (use the ports / exit_timeout_s arguments); "
                         "HTTP must stay on: the probes and the drain use it")
    out_r, repo_r = out.resolve(), repo.resolve()
    if out_r == repo_r or repo_r in out_r.parents:
        raise UsageError(f"out ({out}) must not lie inside the model repository ({repo})")
    src_root = _source_root(source).resolve()
    if out_r == src_root or any(out_r == src_root / i or (src_root / i) in out_r.parents for i in _SOURCE_ITEMS):
        raise UsageError(f"out ({out}) must not be the source tree or lie inside its packages")

    from glad_runtime import __version__ as glad_version

    out.mkdir(parents=True, exist_ok=True)
    written = []

    def put(rel: str, text: str) -> None:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)

    # the build context: source tree and models
    for sub in ("src", "model_repository"):
        shutil.rmtree(out / sub, ignore_errors=True)
    for item in _SOURCE_ITEMS:
        s = src_root / item
        if s.is_dir():
            _link_tree(s, out / "src" / item)
        elif s.is_file():
            (out / "src").mkdir(parents=True, exist_ok=True)
            shutil.copy2(s, out / "src" / item)
    for p in prefixes:
        for model in _models_of(repo, p):
            _link_tree(model, out / "model_repository" / model.name)

    extras, py = (("serve",), _CONTAINER_PY_CPU) if target == "cpu" else (("onnx",), _CONTAINER_PY)
    pins, unpinned = _pins(src_root, extras, py)
    put("constraints.txt", f"# Exact versions of glad-toolkit[{','.join(extras)}]'s dependencies, from the "
        "environment that ran `glad serve --deploy`\n"
        f"# (markers evaluated for the container's Linux CPython {py['python_version']}).\n"
        + (f"# Left to pip (not installed there, or outside pyproject's range): {', '.join(unpinned)}\n"
           if unpinned else "")
        + "".join(f"{k}=={v}\n" for k, v in pins.items()))
    args = _server_args(CONTAINER_REPOSITORY, http_port, grpc_port, metrics_port, exit_timeout_s, extra, target)
    if target == "cpu":
        put("Dockerfile", _dockerfile_cpu(prefixes=prefixes, args=args, http=http_port, grpc=grpc_port,
                                          metrics=metrics_port, glad_version=glad_version, base_image=base_image))
    else:
        put("Dockerfile", _dockerfile(triton_version=triton_version, target=target, prefixes=prefixes, args=args,
                                      http=http_port, grpc=grpc_port, metrics=metrics_port,
                                      glad_version=glad_version))
    put(".dockerignore", _DOCKERIGNORE)
    common = dict(name=name, namespace=namespace, image=image, target=target, prefixes=prefixes, replicas=replicas,
                  max_replicas=max_replicas, cpu=cpu, memory=memory, gpus=gpus, shm_size=shm_size,
                  target_pending=target_pending, exit_timeout_s=exit_timeout_s, glad_version=glad_version)
    put("k8s/glad-triton.yaml", _yaml_docs(_k8s_objects(
        args=args, http=http_port, grpc=grpc_port, metrics=metrics_port, prestop_s=prestop_s,
        startup_timeout_s=startup_timeout_s, **common)))
    put("k8s/prometheus-adapter-rules.yaml", _yaml_docs(_adapter_rules(name, namespace, glad_version)))
    put("k8s/kserve.yaml", _yaml_docs(_kserve_objects(storage_uri=storage_uri, extra=extra, prestop_s=prestop_s,
                                                      **common)))
    put("grafana/glad-dashboard.json", json.dumps(grafana_dashboard(), indent=2, ensure_ascii=False) + "\n")
    put("README.md", _readme(image=image, name=name, target=target, prefixes=prefixes, storage_uri=storage_uri,
                             exit_timeout_s=exit_timeout_s))
    return written + [out / "src", out / "model_repository"]
