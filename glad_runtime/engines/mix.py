"""A per-graph mix of CPU engines (issue 19, item 2): each network on the configuration measured fastest for it.

No single CPU engine wins every graph (ONNX Runtime fp32, OpenVINO f32, OpenVINO bf16 differ per graph and per CPU),
so ``bench/cpu_mix.py`` times every configuration of every graph on this machine with the loop's own inputs, keeps
those within the graph's accuracy gate against ONNX Runtime fp32, and writes the fastest per graph into the bundle
as ``engines/cpu_mix.json`` (not in the manifest: it belongs to a machine, like OpenVINO's compiled-model cache).
:class:`MixedEngines` loads that plan: the graphs of one backend share one engine (ONNX Runtime sessions, or one
OpenVINO core with a per-graph precision map) and every call is routed to its graph's engine.

``cpu_mix.json``: ``{"cpu": <CPU key>, "openvino": <version or null>, "graphs": {graph: {"choice": "ort-fp32" |
"openvino-f32" | "openvino-bf16", ...measured figures}}}``. A plan measured on another CPU is refused (re-select).
"""

from __future__ import annotations

import json
import os
from typing import Mapping

import numpy as np

from glad_runtime.core.bundle import Bundle, BundleError
from glad_runtime.engines.base import GraphEngines, network_graphs
from glad_runtime.errors import EngineSpecError

__all__ = ["MixedEngines", "CHOICES", "PLAN_FILE", "cpu_key", "read_plan", "write_plan"]

#: the configurations a graph may run on
CHOICES = ("ort-fp32", "openvino-f32", "openvino-bf16")
#: where a bundle keeps its plan (relative to the bundle folder)
PLAN_FILE = "engines/cpu_mix.json"


def cpu_key() -> str:
    """This CPU's model name and ISA flags that change the fastest choice (AVX-512, AVX-512 BF16, AMX), from
    ``/proc/cpuinfo`` (``"unknown"`` elsewhere)."""
    try:
        text = open("/proc/cpuinfo").read()
    except OSError:
        return "unknown"
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                 "unknown")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")),
                 set())
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} [{' '.join(isa)}]"


def read_plan(bundle: Bundle) -> dict:
    """The bundle's plan (``engines/cpu_mix.json``).

    Raises:
        BundleError: no plan (run ``python -m bench.cpu_mix BUNDLE``), a plan of another CPU, or an unknown choice.
    """
    path = bundle.file(PLAN_FILE)
    if not path.is_file():
        raise BundleError(f"{bundle.path}: no per-graph CPU plan ({PLAN_FILE}); measure one on this machine with "
                          f"`python -m bench.cpu_mix {bundle.path}`")
    plan = json.loads(path.read_text())
    if plan.get("cpu") != cpu_key():
        raise BundleError(f"{path}: measured on {plan.get('cpu')!r}, this CPU is {cpu_key()!r}; measure again with "
                          f"`python -m bench.cpu_mix {bundle.path}`")
    bad = {g: v.get("choice") for g, v in plan.get("graphs", {}).items() if v.get("choice") not in CHOICES}
    if bad:
        raise BundleError(f"{path}: unknown choices {bad} (known: {CHOICES})")
    return plan


def write_plan(bundle: Bundle, graphs: Mapping[str, dict], **extra) -> str:
    """Write ``engines/cpu_mix.json`` for this CPU (``graphs``: ``{graph: {"choice": ..., ...}}``); returns the
    path."""
    path = bundle.file(PLAN_FILE)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"cpu": cpu_key(), **extra, "graphs": dict(graphs)}, indent=2) + "\n")
    return str(path)


class MixedEngines(GraphEngines):
    """GLAD's networks, each on its own CPU engine configuration (module docstring).

    Args:
        bundle: an exported bundle (``glad export``).
        plan: ``{graph: choice}`` (:data:`CHOICES`); None: the bundle's measured plan (:func:`read_plan`). Graphs
            the plan does not name run on ONNX Runtime fp32.
        threads: threads per engine (0 = the cores this process may use, :mod:`glad_runtime.core.cpus`).
        max_batch: images per network call.
    Attributes:
        choices: ``{graph: choice}`` of every graph loaded.
    Raises:
        BundleError: no plan, a plan of another CPU, missing graphs. EngineSpecError: an unknown choice.
        EngineError (calls): the routed engine's error.
    """

    _kind = "mixed CPU feature graph"

    @classmethod
    def from_spec(cls, bundle: Bundle, spec) -> "MixedEngines":
        """The ``mix`` row's factory (:mod:`glad_runtime.engines.registry`): the bundle's measured plan,
        ``spec.threads`` per engine, ``spec.max_batch`` per call."""
        return cls(bundle, threads=spec.threads, max_batch=spec.max_batch)

    def __init__(self, bundle: Bundle | str | os.PathLike, plan: Mapping[str, str] | None = None, *,
                 threads: int = 0, max_batch: int = 16):
        self.bundle = bundle if isinstance(bundle, Bundle) else Bundle(bundle)
        self.config = self.bundle.config
        if plan is None:
            plan = {g: v["choice"] for g, v in read_plan(self.bundle)["graphs"].items()}
        bad = {g: c for g, c in plan.items() if c not in CHOICES}
        if bad:
            raise EngineSpecError(f"choices must be among {CHOICES}, got {bad}")
        graphs = network_graphs(self.config, dino_ads_present=self.bundle.file("onnx/dino_ads.onnx").is_file())
        self.choices = {g: plan.get(g, "ort-fp32") for g in graphs}
        self.engines: dict[str, GraphEngines] = {}
        ort = [g for g, c in self.choices.items() if c == "ort-fp32"]
        if ort:  # each engine loads only its own graphs
            from glad_runtime.engines.ort import OrtEngines

            self.engines["ort"] = OrtEngines(self.bundle, intra_op_threads=threads, max_batch=max_batch, graphs=ort)
        ov = {g: c.split("-")[1] for g, c in self.choices.items() if c.startswith("openvino")}
        if ov:
            from glad_runtime.engines.openvino import OpenVinoEngines

            self.engines["openvino"] = OpenVinoEngines(self.bundle, precision=ov, num_threads=threads,
                                                       max_batch=max_batch, graphs=list(ov))
        self._route = {g: self.engines[c.split("-")[0]] for g, c in self.choices.items()}
        self._init_feature_graphs(self._route)

    def _run_graph(self, graph: str, feeds: dict[str, np.ndarray], outputs: list[str]) -> list[np.ndarray]:
        return self._route[graph]._run_graph(graph, feeds, outputs)
