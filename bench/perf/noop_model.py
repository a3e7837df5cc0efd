"""Triton python-backend model for ``glad perf``'s overhead check: the GLAD entry models' contract, no work.

Copied as ``model.py`` into a throw-away repository (:func:`bench.perf.run.noop_repository`) as
``glad_perf_noop`` (one response per request) and ``glad_perf_noop_stream`` (decoupled: the response goes out on
the gRPC stream, as ``<prefix>_glad_inflight``'s). It reads the ``image_files`` tensor (so the request is
deserialised as GLAD's is) and answers every GLAD output at once, with zeros of the shapes GLAD returns
(``anomaly_maps`` / ``defect_masks`` ``[B, D, D]``, ``D`` the model parameter ``map_side``), so the response costs
what GLAD's costs on the wire. Latency and throughput measured on it are the client's and the transport's ceiling:
what ``glad perf`` itself can drive at that concurrency on this machine.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value") for k, v in (cfg.get("parameters") or {}).items()}
        self.side = int(params.get("map_side") or 224)
        self.decoupled = bool((cfg.get("model_transaction_policy") or {}).get("decoupled"))
        self.outputs = [(o["name"], o["data_type"], len(o["dims"])) for o in cfg["output"]]

    def _response(self, request):
        files = pb_utils.get_input_tensor_by_name(request, "image_files")
        n = int(files.as_numpy().shape[0]) if files is not None else 1
        tensors = []
        for name, dtype, ndim in self.outputs:
            dt = pb_utils.triton_string_to_numpy(dtype)
            shape = [n, self.side, self.side] if ndim == 3 else [n, 2] if name == "image_sizes" else [n, 1]
            if dt in (np.object_, np.bytes_):
                arr = np.array([b"[]" if name == "regions" else b""] * n, dtype=np.object_).reshape(n, 1)
            else:
                arr = np.zeros(shape, dt)
            tensors.append(pb_utils.Tensor(name, arr))
        return pb_utils.InferenceResponse(tensors)

    def execute(self, requests):
        if not self.decoupled:
            return [self._response(r) for r in requests]
        for r in requests:
            r.get_response_sender().send(self._response(r),
                                         flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        return None
