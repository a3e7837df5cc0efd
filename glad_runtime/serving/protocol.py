"""The served contract, defined once: model names, tensor names, dtypes, shapes and the ``[B]`` reshape rule.

Read by the model-repository generator (``triton_models.repository``: the ``config.pbtxt`` of every model), the
BLS model (``triton_models/python/glad_model.py``: the tensors it returns), the Triton engine
(:mod:`glad_runtime.engines.triton`: the client-side loop) and the client SDK (:mod:`glad_runtime.serving.client`).
numpy only, so every one of them can import it.

``<prefix>_glad`` (the BLS model, whole ADS/SAFF loop server-side):

* input ``images`` float32 ``[B, 3, R, R]`` in [-1, 1] (``glad_runtime.core.images.preprocess``);
* outputs, per image: see :data:`GLAD_OUTPUTS`. Per-image scalars are declared ``dims: [1]`` with
  ``reshape: { shape: [ ] }``: the model sees ``[B]``, a client sends and receives ``[B, 1]``
  (:func:`to_wire` / :func:`from_wire`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

__all__ = ["TensorSpec", "GLAD_MODEL", "GLAD_INPUT", "GLAD_OUTPUTS", "GLAD_OUTPUT_NAMES", "NUMPY_DTYPES",
           "model_name", "glad_inputs", "glad_outputs", "to_wire", "from_wire", "glad_output_arrays",
           "detections_from_arrays", "calibration_parameter", "calibration_from_parameter"]

#: The BLS model's name suffix: ``<prefix>_glad``.
GLAD_MODEL = "glad"
#: The BLS model's one input.
GLAD_INPUT = "images"

#: Triton data types -> numpy dtypes (the ones this project's models use).
NUMPY_DTYPES = {"TYPE_FP32": np.float32, "TYPE_FP16": np.float16, "TYPE_FP64": np.float64, "TYPE_INT64": np.int64,
                "TYPE_INT32": np.int32, "TYPE_INT8": np.int8, "TYPE_UINT8": np.uint8, "TYPE_BOOL": np.bool_}


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output as Triton declares it: ``dims`` without the batch dimension (-1 = dynamic);
    ``reshape`` True for per-sample scalars (served as ``[B, 1]``, seen by the model as ``[B]``)."""

    name: str
    data_type: str
    dims: tuple[int, ...]
    reshape: bool = False

    @property
    def dtype(self) -> np.dtype:
        """The numpy dtype of ``data_type``."""
        return np.dtype(NUMPY_DTYPES[self.data_type])

    def pbtxt(self) -> str:
        """The ``config.pbtxt`` entry (``{ name: ... data_type: ... dims: [...] reshape: ... }``)."""
        dims = list(self.dims) if self.dims else [1]
        s = f'{{ name: "{self.name}" data_type: {self.data_type} dims: {dims}'
        if self.reshape or not self.dims:
            s += " reshape: { shape: [ ] }"
        return s + " }"


#: Outputs of ``<prefix>_glad``: ``(name, Triton type, per-image dims, meaning)``; ``"D"`` = ``dino_resolution``.
GLAD_OUTPUTS = (
    ("scores", "TYPE_FP32", (), "raw image score (top-K mean of the map)"),
    ("normalized_scores", "TYPE_FP32", (), "calibrated score in [0, 1], threshold at 0.5; NaN uncalibrated"),
    ("labels", "TYPE_INT8", (), "1 anomalous, 0 normal, -1 uncalibrated"),
    ("anomaly_maps", "TYPE_FP32", ("D", "D"), "anomaly map at the scoring size"),
    ("adaptive_steps", "TYPE_INT64", (), "DDIM timestep where ADS decided; -1 ADS off / never decided"),
    ("ads_scores", "TYPE_FP32", (), "top-10 ADS distance at the decision; NaN never decided"),
    ("saff_triggered", "TYPE_BOOL", (), "SAFF trigger (True) or forced decision (False)"),
)
GLAD_OUTPUT_NAMES = tuple(o[0] for o in GLAD_OUTPUTS)


def model_name(prefix: str, graph: str = GLAD_MODEL) -> str:
    """``<prefix>_<graph>``: the served name of a bundle's model (``glad``, ``unet``, ``vae_encoder``, ...)."""
    return f"{prefix}_{graph}"


def glad_inputs(resolution: int) -> list[TensorSpec]:
    """The BLS model's input specs for a bundle of ``resolution`` R."""
    return [TensorSpec(GLAD_INPUT, "TYPE_FP32", (3, resolution, resolution))]


def glad_outputs(dino_resolution: int) -> list[TensorSpec]:
    """The BLS model's output specs (:data:`GLAD_OUTPUTS` with ``D`` = ``dino_resolution``)."""
    return [TensorSpec(n, t, tuple(dino_resolution for _ in dims), reshape=not dims) for n, t, dims, _ in GLAD_OUTPUTS]


def to_wire(array: np.ndarray, dims: Sequence[int] | None = None) -> np.ndarray:
    """A tensor as it crosses the wire: ``[B]`` -> ``[B, 1]`` (per-sample scalars, declared ``dims: [1]``);
    other shapes unchanged. ``dims``: the declared per-sample dims when known (the reshape applies only to
    ``[1]``)."""
    array = np.ascontiguousarray(array)
    if array.ndim == 1 and (dims is None or list(dims) == [1]):
        return array[:, None]
    return array


def from_wire(array: np.ndarray, batch: int, spec: TensorSpec) -> np.ndarray:
    """A received tensor as the model declared it: per-sample scalars ``[B, 1]`` -> ``[B]``, dtype checked.

    Raises:
        ValueError: the array's size does not fit ``batch`` images of ``spec``.
    """
    a = np.asarray(array)
    if not spec.dims:
        if a.size != batch:
            raise ValueError(f"{spec.name}: {a.size} values for {batch} images")
        return a.reshape(batch).astype(spec.dtype, copy=False)
    return a.astype(spec.dtype, copy=False)


def glad_output_arrays(out, start: int, stop: int, calibration=None) -> dict[str, np.ndarray]:
    """The BLS model's output tensors for images ``start:stop`` of a ``PipelineOutput`` (model side, ``[B]``).

    Labels and normalised scores come from :func:`glad_runtime.core.calibration.label` (the one rule);
    uncalibrated: ``normalized_scores`` NaN and ``labels`` -1.
    """
    from glad_runtime.core.calibration import label

    scores = out.scores[start:stop].astype(np.float32)
    verdicts = [label(float(s), calibration) for s in scores]
    arrays = {
        "scores": scores,
        "normalized_scores": np.array([np.nan if v.normalized_score is None else v.normalized_score
                                       for v in verdicts], np.float32),
        "labels": np.array([-1 if v.label is None else int(v.label == "anomalous") for v in verdicts], np.int8),
        "anomaly_maps": out.anomaly_maps[start:stop].astype(np.float32),
        "adaptive_steps": out.adaptive_steps[start:stop].astype(np.int64),
        "ads_scores": out.ads_scores[start:stop].astype(np.float32),
        "saff_triggered": out.saff_triggered[start:stop].astype(bool),
    }
    assert tuple(arrays) == GLAD_OUTPUT_NAMES
    return {k: np.ascontiguousarray(v) for k, v in arrays.items()}


def detections_from_arrays(arrays: Mapping[str, np.ndarray], sources: Sequence[str], sizes: Sequence[Any],
                           dino_resolution: int, calibration=None, threshold: float | None = None,
                           server: str | None = None) -> list:
    """Client side: the received tensors of one ``<prefix>_glad`` response -> one ``Detection`` per image.

    The label and normalised score are recomputed with :func:`glad_runtime.core.calibration.label` from the raw
    score and the served calibration (:func:`calibration_from_parameter`), so a client ``threshold`` override
    behaves exactly as ``glad detect --threshold`` (label and the 0.5 point of ``normalized_score`` move together).
    """
    from glad_runtime.core.calibration import label
    from glad_runtime.core.detection import Detection

    n = len(sources)
    specs = {s.name: s for s in glad_outputs(dino_resolution)}
    o = {name: from_wire(arrays[name], n, specs[name]) for name in GLAD_OUTPUT_NAMES}
    dets = []
    for k, source in enumerate(sources):
        score = float(o["scores"][k])
        v = label(score, calibration, threshold)
        ads = float(o["ads_scores"][k])
        dets.append(Detection(source=source, score=score, normalized_score=v.normalized_score, label=v.label,
                              threshold=v.threshold, threshold_source=v.threshold_source,
                              adaptive_step=int(o["adaptive_steps"][k]), ads_score=ads if np.isfinite(ads) else None,
                              saff_triggered=bool(o["saff_triggered"][k]), anomaly_map=o["anomaly_maps"][k],
                              original_size=sizes[k], server=server))
    return dets


def calibration_parameter(calibration) -> str:
    """The ``calibration`` parameter of ``<prefix>_glad``'s config: the calibration as compact JSON ("" when
    uncalibrated), so a client labels with the same calibration as the server."""
    return "" if calibration is None else json.dumps(calibration.to_dict(), separators=(",", ":"), sort_keys=True)


def calibration_from_parameter(text: str | None):
    """Inverse of :func:`calibration_parameter`: a ``Calibration`` or None."""
    if not text:
        return None
    from glad_runtime.core.calibration import Calibration

    return Calibration.from_dict(json.loads(text))
