"""Triton python-backend BLS model ``<prefix>_glad``: the whole GLAD loop server-side, one request per batch.

:class:`glad_runtime.pipeline.batch.GladPipeline` runs here with :class:`BlsEngines`, whose network calls are BLS requests
to ``<prefix>_unet``, ``<prefix>_vae_encoder``, ``<prefix>_vae_decoder``, ``<prefix>_dino`` (and ``_dino_ads``; with
ADS on, ``_ads_check`` when served: one request per check returning the distance map), so
those models keep their own instances and dynamic batching (several ``_glad`` instances, or several bundles, share
them). The version directory holds the bundle's ``config.json`` and, when calibrated, ``calibration.json``.

Inputs and outputs are the served contract of :mod:`glad_runtime.serving.protocol` (``images`` FP32 or
``image_files`` BYTES, the ``map_size`` request parameter, ``GLAD_OUTPUTS``). Files are decoded and preprocessed
here by the code ``glad detect`` runs (``core.images.load_image`` + ``prepare``), and every result is made by
:class:`glad_runtime.detector.Detector` (``detect_arrays`` + ``locate``: labels, regions), so a served result equals
the in-process one. The requests of a dynamic batch run as one pipeline call (results do not depend on batch
mates, project decision 2); a request with a corrupt file or a bad tensor gets INVALID_ARG alone (naming the image
index and the cause), and if the joint call fails every image is rerun alone.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from glad_runtime.core.config import GladConfig
from glad_runtime.core.images import load_image, prepare
from glad_runtime.detector import Detector
from glad_runtime.engines import EngineError, GraphEngines, network_graphs
from glad_runtime.errors import GladError, InvalidInputError
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
        calibration = None
        if (vdir / "calibration.json").is_file():
            from glad_runtime.core.calibration import Calibration

            calibration = Calibration.from_json((vdir / "calibration.json").read_text())
        self.detector = Detector(self.engines, config, calibration)
        self.config = config

    def _request_inputs(self, request):
        """``(tensors [n, 3, R, R], LoadedImage-or-None per image, map_size)`` of one request.

        Raises:
            InvalidInputError: neither or both inputs, a corrupt file (naming its index), a bad tensor, or a bad
                ``map_size`` parameter.
        """
        params = json.loads(request.parameters() or "{}") if hasattr(request, "parameters") else {}
        map_size = params.get(protocol.MAP_SIZE_PARAMETER, "original")
        if map_size not in protocol.MAP_SIZES:
            raise InvalidInputError(f"parameter {protocol.MAP_SIZE_PARAMETER} must be one of {protocol.MAP_SIZES}, "
                                    f"got {map_size!r}")
        tensors = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_INPUT)
        files = pb_utils.get_input_tensor_by_name(request, protocol.GLAD_FILE_INPUT)
        if (tensors is None) == (files is None):
            raise InvalidInputError(f"send exactly one of {protocol.GLAD_FILE_INPUT!r} (encoded files) or "
                                    f"{protocol.GLAD_INPUT!r} (float32 [B, 3, R, R] in [-1, 1])")
        if tensors is not None:
            batch = self.detector.pipeline.validate_batch(tensors.as_numpy())
            return list(batch), [None] * len(batch), map_size
        arrays, images = [], []
        for k, element in enumerate(files.as_numpy().reshape(-1)):
            try:
                img = load_image(protocol.file_bytes(element))
            except GladError as e:
                raise InvalidInputError(f"{protocol.GLAD_FILE_INPUT}[{k}]: {e}") from e
            arrays.append(prepare(img, self.config.resolution))
            images.append(img)
        return arrays, images, map_size

    def execute(self, requests):
        responses = [None] * len(requests)
        items, spans = [], {}
        for i, r in enumerate(requests):
            try:
                arrays, images, map_size = self._request_inputs(r)
            except InvalidInputError as e:
                responses[i] = pb_utils.InferenceResponse(error=_error(str(e), "INVALID_ARG"))
                continue
            spans[i] = (len(items), len(arrays), map_size)
            items += list(zip(arrays, images))
        if items:
            sources = [f"#{k}" for k in range(len(items))]
            dets = self.detector.detect_arrays(np.stack([a for a, _ in items]), sources)
            dets = [self.detector.locate(d, img) for d, (_, img) in zip(dets, items)]
            for i, (start, n, map_size) in spans.items():
                responses[i] = self._response(dets[start:start + n], map_size)
        return responses

    def _response(self, dets, map_size):
        failed = [(k, d.error) for k, d in enumerate(dets) if not d.ok]
        if failed:
            k, e = failed[0]
            code = "INVALID_ARG" if isinstance(e, InvalidInputError) else "INTERNAL"
            return pb_utils.InferenceResponse(error=_error(f"image {k}: {type(e).__name__}: {e}", code))
        try:
            tensors = protocol.glad_output_arrays(dets, map_size)
        except Exception as e:  # a bug, not the caller's fault: say what, never a half response
            return pb_utils.InferenceResponse(error=_error(f"{type(e).__name__}: {e}", "INTERNAL"))
        return pb_utils.InferenceResponse([pb_utils.Tensor(k, v) for k, v in tensors.items()])
