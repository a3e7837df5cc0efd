"""Triton python-backend BLS model ``<prefix>_glad``: the whole GLAD loop server-side, one request per batch.

:class:`glad_runtime.pipeline.batch.GladPipeline` runs here with :class:`BlsEngines`, whose network calls are BLS requests
to ``<prefix>_unet``, ``<prefix>_vae_encoder``, ``<prefix>_vae_decoder``, ``<prefix>_dino`` (and ``_dino_ads``; with
ADS on, ``_ads_check`` when served: one request per check returning the distance map), so
those models keep their own instances and dynamic batching (several ``_glad`` instances, or several bundles, share
them). The version directory holds the bundle's ``config.json`` and, when calibrated, ``calibration.json``.

Inputs and outputs are the served contract of :mod:`glad_runtime.serving.protocol` (``GLAD_INPUT``,
``GLAD_OUTPUTS``; tensors built by ``protocol.glad_output_arrays``, ``[B]`` sent as ``[B,1]`` by ``protocol.to_wire``). The requests of a dynamic batch run as one pipeline call (results do not depend on batch mates,
project decision 2); a request with a bad shape or NaN/Inf values gets INVALID_ARG alone, and if the joint call
fails every request is rerun alone.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from glad_runtime.core.config import GladConfig
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.pipeline.batch import GladPipeline, InvalidInputError
from glad_runtime.serving import protocol


def _error(message, code="INTERNAL"):
    err = pb_utils.TritonError
    return err(message, getattr(err, code)) if hasattr(err, code) else err(message)


class BlsEngines(GraphEngines):
    """The Engines interface as BLS requests to the network models of one prefix (the shared
    :class:`~glad_runtime.engines.GraphEngines` calls, checks and fused ADS check over ``_run_graph``).

    Args:
        prefix: model prefix. config: the bundle's GladConfig. max_batch: the network models' max_batch_size.
        served: the network models served for this prefix (the ``served_graphs`` parameter; ``ads_check`` among
            them makes each ADS check one request returning only the distance map). None: repositories written
            before that parameter: the feature graphs, no fused check.
    Raises (calls): EngineError with the network model's error message.
    """

    _kind = "served feature model"

    def __init__(self, prefix, config, max_batch, served=None):
        self.prefix, self.config, self.max_batch = prefix, config, max(1, int(max_batch))
        self._init_feature_graphs(network_graphs(config) if served is None else served)

    def _run_graph(self, graph, feeds, outputs):
        n = len(next(iter(feeds.values())))
        parts = []
        for s in range(0, n, self.max_batch):
            inputs = []
            for name, arr in feeds.items():
                inputs.append(pb_utils.Tensor(name, protocol.to_wire(arr[s:s + self.max_batch])))
            request = pb_utils.InferenceRequest(model_name=protocol.model_name(self.prefix, graph), inputs=inputs,
                                                requested_output_names=outputs)
            response = request.exec()
            if response.has_error():
                raise EngineError(f"{self.prefix}_{graph}: {response.error().message()}")
            parts.append([pb_utils.get_output_tensor_by_name(response, o).as_numpy() for o in outputs])
        return [np.concatenate([p[k] for p in parts]) for k in range(len(outputs))]


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in cfg.get("parameters", {}).items()}
        vdir = Path(args["model_repository"]) / args["model_version"]
        config = GladConfig.from_dict(json.loads((vdir / "config.json").read_text()))
        served = params.get("served_graphs")
        self.engines = BlsEngines(params["model_prefix"], config, int(params["network_max_batch"]),
                                  served.split(",") if served else None)
        self.pipeline = GladPipeline(self.engines, config)
        self.calibration = None
        if (vdir / "calibration.json").is_file():
            from glad_runtime.core.calibration import Calibration

            self.calibration = Calibration.from_json((vdir / "calibration.json").read_text())

    def _outputs(self, out, start, stop):
        tensors = protocol.glad_output_arrays(out, start, stop, self.calibration)
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])

    def _run_one(self, images):
        try:
            return self._outputs(self.pipeline(images), 0, len(images))
        except InvalidInputError as e:
            return pb_utils.InferenceResponse(error=_error(str(e), "INVALID_ARG"))
        except Exception as e:  # EngineError from a network model, or anything unexpected
            return pb_utils.InferenceResponse(error=_error(f"{type(e).__name__}: {e}", "INTERNAL"))

    def execute(self, requests):
        responses = [None] * len(requests)
        valid = []
        for i, r in enumerate(requests):
            try:
                valid.append((i, self.pipeline.validate_batch(pb_utils.get_input_tensor_by_name(r, protocol.GLAD_INPUT)
                                                              .as_numpy())))
            except InvalidInputError as e:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(e), "INVALID_ARG"))
        if len(valid) == 1:
            responses[valid[0][0]] = self._run_one(valid[0][1])
        elif valid:
            try:
                out = self.pipeline(np.concatenate([v for _, v in valid]))
                start = 0
                for i, v in valid:
                    responses[i] = self._outputs(out, start, start + len(v))
                    start += len(v)
            except Exception:
                for i, v in valid:
                    responses[i] = self._run_one(v)
        return responses
