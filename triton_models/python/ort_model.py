"""Triton python-backend model: one exported GLAD graph run with ONNX Runtime (``glad serve --target cpu``).

Copied by ``triton_models.repository`` as ``<prefix>_<graph>/<version>/model.py`` beside ``model.onnx`` (a hard link
to the bundle's ``onnx/<graph>.onnx`` when the file system allows, else a copy). Parameters (config.pbtxt):
``intra_op_threads`` (ONNX Runtime threads per instance; 0: the cores this process may use divided among the
model's instances, :func:`glad_runtime.core.cpus.threads_for`; threads never spin, so the models sharing the
cores leave them to each other when idle), ``sha256`` / ``sha256_data`` (the graph's and its external data's
digests: checked at load, a mismatch refuses to load, naming the file). The requests of one dynamic batch are concatenated into
one ``InferenceSession.run`` and split back; if the joint run fails, each request runs alone so only the failing
one gets an error.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from glad_runtime.core.bundle import sha256_file
from glad_runtime.core.cpus import threads_for, usable_cores
from glad_runtime.engines.ort import session_options
from glad_runtime.errors import BundleError


def _error(message, code="INTERNAL"):
    err = pb_utils.TritonError
    return err(message, getattr(err, code)) if hasattr(err, code) else err(message)


def verify_file(path, expected):
    """Refuse to load a served graph whose bytes are not the exported ones (issue 27): ``expected`` is the sha256
    the repository generator wrote into the config (the bundle's manifest checked it then); None or "" skips.

    Raises:
        BundleError: naming the file and both digests (the model fails to load; nothing is served from it).
    """
    if not expected:
        return
    got = sha256_file(path)
    if got != expected:
        raise BundleError(f"{path}: sha256 {got} does not match the {expected} the model configuration carries "
                          "(the file was modified or replaced after `glad serve` wrote the repository); "
                          "regenerate the repository from the bundle")


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        verify_file(path, params.get("sha256"))
        verify_file(path + ".data", params.get("sha256_data"))
        instances = sum(int(g.get("count", 1)) for g in cfg.get("instance_group", [])) or 1
        threads = threads_for(instances, int(params.get("intra_op_threads", "1")))
        self.session = ort.InferenceSession(path, session_options(threads, 1), providers=["CPUExecutionProvider"])
        self.inputs = [i["name"] for i in cfg["input"]]
        self.outputs = [o["name"] for o in cfg["output"]]
        self.name = cfg["name"]
        # One line per instance in the server log: how the thread rule (core/cpus) sized this session, the check a
        # container with a CPU quota (--cpus, resources.limits.cpu) is read by.
        pb_utils.Logger.log_info(f"{self.name}: ONNX Runtime intra-op threads {threads} "
                                 f"(usable cores {usable_cores()}, instances {instances})")

    def _run(self, feeds):
        return self.session.run(self.outputs, feeds)

    def _respond(self, outs, start, stop):
        return pb_utils.InferenceResponse(
            [pb_utils.Tensor(n, np.ascontiguousarray(o[start:stop])) for n, o in zip(self.outputs, outs)])

    def execute(self, requests):
        arrays = [{n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n in self.inputs} for r in requests]
        sizes = [len(a[self.inputs[0]]) for a in arrays]
        try:
            feeds = {n: np.concatenate([a[n] for a in arrays]) for n in self.inputs}
            outs = self._run(feeds)
        except Exception:
            responses = []
            for a in arrays:
                try:
                    responses.append(self._respond(self._run(a), 0, None))
                except Exception as e:  # onnxruntime raises its own classes (InvalidArgument, Fail, ...)
                    code = "INVALID_ARG" if "INVALID_ARGUMENT" in str(e) or "Invalid" in type(e).__name__ \
                        else "INTERNAL"
                    responses.append(pb_utils.InferenceResponse(
                        error=_error(f"{self.name}: {type(e).__name__}: {e}", code)))
            return responses
        responses, start = [], 0
        for s in sizes:
            responses.append(self._respond(outs, start, start + s))
            start += s
        return responses
