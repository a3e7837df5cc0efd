"""Triton python-backend model: bilinear resize of images ``[B,3,H,W]`` to ``size x size`` (parameter ``size``).

The step between the decoder and the feature extractor in the ``<prefix>_recon_features`` ensemble; it uses the
pipeline's own :func:`glad_runtime.core.scoring.resize_bilinear`, so the served result equals the in-process one.
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from glad_runtime.core.scoring import resize_bilinear


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        self.size = int(cfg["parameters"]["size"]["string_value"])

    def execute(self, requests):
        arrays = [pb_utils.get_input_tensor_by_name(r, "images").as_numpy() for r in requests]
        out = resize_bilinear(np.concatenate(arrays), (self.size, self.size)).astype(np.float32)
        responses, start = [], 0
        for a in arrays:
            responses.append(pb_utils.InferenceResponse([pb_utils.Tensor("resized", out[start:start + len(a)])]))
            start += len(a)
        return responses
