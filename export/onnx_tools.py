"""ONNX graph tooling without torch: clean-up and folding, saving (external data over 2 GB), fp16 conversion with
an activation-range guard, running graphs with every intermediate exposed, I/O and op summaries.

Used by ``export.onnx_export`` (after tracing), ``calib`` (quantisation) and ``bench`` (FLOP counts); it needs
``onnx``, ``onnxruntime``, and for clean-up / folding ``onnx-graphsurgeon`` and ``polygraphy`` (the ``export``
extra).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["optimize_graph", "save_model", "convert_fp16", "overflowing_nodes", "intermediate_values",
           "tensor_max_abs", "ort_run",
           "io_shapes", "op_counts", "FP16_BLOCK_OPS", "FP16_MAX", "TWO_GB"]

#: Ops kept in fp32 by the fp16 conversion (numerically fragile: reductions over many values, exponentials).
FP16_BLOCK_OPS = ("LayerNormalization", "GroupNormalization", "InstanceNormalization", "Softmax", "ReduceMean",
                  "Pow", "Sqrt", "Erf")
TWO_GB = 2**31 - 2**20  # protobuf limit with a margin


def optimize_graph(model):
    """onnx-graphsurgeon clean-up and topological sort, then polygraphy constant folding (ORT-based), then shape
    inference; the order TensorRT's demoDiffusion ``Optimizer`` uses. Graphs over 2 GB skip the folding (it needs
    to serialise the model) and are still cleaned up."""
    import onnx
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    model = gs.export_onnx(graph)
    if model.ByteSize() < TWO_GB:
        from polygraphy.backend.onnx import fold_constants
        from polygraphy.logger import G_LOGGER

        with G_LOGGER.verbosity(G_LOGGER.ERROR):
            model = fold_constants(model, error_ok=True, allow_onnxruntime_shape_inference=True)
        graph = gs.import_onnx(model)
        graph.cleanup().toposort()
        model = gs.export_onnx(graph)
        model = onnx.shape_inference.infer_shapes(model)
    return model


def save_model(model, path: Path) -> None:
    """Save a single ``.onnx`` below 2 GB, else with all weights in ``<name>.onnx.data`` next to it."""
    import onnx

    path = Path(path)
    data = path.with_name(path.name + ".data")
    if data.exists():
        data.unlink()
    if model.ByteSize() < TWO_GB:
        onnx.save(model, str(path))
    else:
        onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=data.name,
                  size_threshold=1024)


FP16_MAX = 65504.0


def intermediate_values(model, feeds: dict[str, np.ndarray], names: Sequence[str] | None = None
                        ) -> dict[str, np.ndarray]:
    """Run a graph once in ONNX Runtime (CPU, graph optimisations off) with typed intermediate tensors exposed as
    outputs; returns ``{tensor name: value}`` for the graph outputs and the intermediates (all, or ``names``).

    Memory: the exposed activations of one forward pass are all kept; use small batches or ``names``
    (ranges only: :func:`tensor_max_abs`)."""
    import onnx
    import onnxruntime as ort

    m = onnx.ModelProto()
    m.CopyFrom(model)
    outputs = {o.name for o in m.graph.output}
    wanted = None if names is None else set(names)
    for v in m.graph.value_info:
        if v.name not in outputs and v.type.tensor_type.elem_type and (wanted is None or v.name in wanted):
            m.graph.output.append(onnx.helper.make_tensor_value_info(v.name, v.type.tensor_type.elem_type, None))
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every node's output
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    out_names = [o.name for o in sess.get_outputs()]
    return dict(zip(out_names, sess.run(out_names, feeds)))


def tensor_max_abs(model, feeds: dict[str, np.ndarray]) -> dict[str, float]:
    """``max |value|`` of every float32 tensor of a graph (intermediates and outputs) on ``feeds``, in one ONNX
    Runtime pass with normal memory use: an ``Abs -> ReduceMax`` pair is appended per tensor and only the scalars
    are returned (full-size graphs have hundreds of 512 px activations; keeping them all would need tens of GB)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    wanted = {v.name for v in list(m.graph.value_info) + list(m.graph.output)
              if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT}
    del m.graph.output[:]
    outs: dict[str, str] = {}
    nodes = []
    for node in m.graph.node:  # each reduction right after its producer, so activations are freed as usual
        nodes.append(node)
        for name in node.output:
            if name in wanted:
                k = len(outs)
                a, r = f"__glad_abs_{k}", f"__glad_absmax_{k}"
                nodes.append(helper.make_node("Abs", [name], [a], name=a))
                nodes.append(helper.make_node("ReduceMax", [a], [r], name=r, keepdims=0))
                m.graph.output.append(helper.make_tensor_value_info(r, onnx.TensorProto.FLOAT, []))
                outs[r] = name
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    order = list(outs)
    return {outs[r]: float(v) for r, v in zip(order, sess.run(order, feeds))}


def overflowing_nodes(model, feeds: dict[str, np.ndarray], limit: float = FP16_MAX / 4) -> list[str]:
    """Nodes of an fp32 graph that must stay fp32 for an fp16 copy to be right on real inputs.

    A tensor is "hot" when its magnitude exceeds ``limit`` on the first sample of ``feeds`` (:func:`tensor_max_abs`)
    or when it is
    an initializer beyond the fp16 range (the converter would clamp it to 65504). The producer and every consumer
    of a hot tensor are returned, so the value never passes through fp16 (blocking only the producer would cast its
    output back).

    Returns:
        sorted node names, for the converter's ``node_block_list``.
    """
    import onnx
    from onnx import numpy_helper

    producers: dict[str, str] = {}
    consumers: dict[str, list[str]] = {}
    for node in model.graph.node:
        for out in node.output:
            producers[out] = node.name
        for inp in node.input:
            consumers.setdefault(inp, []).append(node.name)
    feeds = {k: v[:1] for k, v in feeds.items()}  # one sample: ranges, not statistics; bounded memory
    hot = [name for name, peak in tensor_max_abs(model, feeds).items() if peak > limit]
    for init in model.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            arr = numpy_helper.to_array(init)
            if arr.size and float(np.abs(arr).max()) > FP16_MAX:
                hot.append(init.name)
    blocked = set()
    for name in hot:
        if name in producers:
            blocked.add(producers[name])
        blocked.update(consumers.get(name, ()))
    return sorted(blocked)


def convert_fp16(src: Path, dst: Path, block_ops: Sequence[str] = FP16_BLOCK_OPS,
                 feeds: dict[str, np.ndarray] | None = None) -> Path:
    """fp16 copy of a graph with ONNX Runtime's ``float16`` converter; fp32 inputs/outputs (cast inside), the ops in
    ``block_ops`` kept in fp32.

    With ``feeds`` (real inputs), nodes whose fp32 activations exceed a quarter of the fp16 range on them are kept
    in fp32 too (:func:`overflowing_nodes`); without, a constant beyond +-65504 is clamped by the converter and the
    export-time parity gate refuses the graph. Graphs over 2 GB skip the activation scan."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = onnx.load(str(src), load_external_data=True)
    nodes = overflowing_nodes(model, feeds) if feeds is not None and model.ByteSize() < TWO_GB else []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model16 = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=model.ByteSize() >= TWO_GB,
                                           op_block_list=list(DEFAULT_OP_BLOCK_LIST) + list(block_ops),
                                           node_block_list=nodes)
    if nodes:
        model16 = _drop_cast_roundtrips(model16)
    meta = {p.key: p.value for p in model16.metadata_props} | {"glad.precision": "fp16"}
    del model16.metadata_props[:]
    for k, v in meta.items():
        model16.metadata_props.add(key=k, value=v)
    save_model(model16, dst)
    return dst


def _drop_cast_roundtrips(model):
    """Rewire ``Cast(to fp16) -> Cast(to fp32)`` pairs so a value between two fp32-kept nodes never passes through
    fp16 (ORT's converter casts every blocked node's output back to fp16, which overflows for hot tensors)."""
    import onnx
    import onnx_graphsurgeon as gs

    def cast_to(node):
        return next((a.i for a in node.attribute if a.name == "to"), None)

    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    outputs = {o.name for o in model.graph.output}
    for a in model.graph.node:
        if a.op_type != "Cast" or cast_to(a) != onnx.TensorProto.FLOAT16 or a.output[0] in outputs:
            continue
        cons = consumers.get(a.output[0], [])
        if cons and all(c.op_type == "Cast" and cast_to(c) == onnx.TensorProto.FLOAT for c in cons):
            for c in cons:
                c.input[0] = a.input[0]
    graph = gs.import_onnx(model)
    graph.cleanup().toposort()
    return gs.export_onnx(graph)


def ort_run(path: Path, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def io_shapes(path: Path) -> tuple[dict[str, list], dict[str, list]]:
    import onnx

    m = onnx.load(str(path), load_external_data=False)

    def dims(v):
        return [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]

    return ({v.name: dims(v) for v in m.graph.input}, {v.name: dims(v) for v in m.graph.output})


def op_counts(path: Path) -> dict[str, int]:
    import collections

    import onnx

    m = onnx.load(str(path), load_external_data=False)
    return dict(collections.Counter(n.op_type for n in m.graph.node).most_common())
