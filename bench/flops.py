"""FLOP counts per network call, read from the exported ONNX graphs (batch 1).

Counted ops (multiply-add = 2 FLOPs): ``Conv`` ``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW``,
``ConvTranspose`` the same over the input grid, ``MatMul`` / ``Gemm`` ``2 * batch * M * N * K``, ``Einsum`` 2 x the
product of its index sizes, ONNX ``Attention`` ``2 * 2 * |Q| * S_kv`` (our exporter writes attention as MatMuls).
Normalisations, activations and element-wise ops are ignored (memory-bound, < 2 % of the total for these networks).
Shapes come from shape inference on the graph alone with the batch fixed to 1 (:func:`infer_shapes`; issue 33,
item 3): the graph is loaded without its external data and nothing runs, so the full-size ``sd14-dino-vitb8`` UNet
(3.4 GB) is counted in a few hundred MB (running it, as before, kept every intermediate and needed over 15 GB).

    python -m bench.flops GRAPH.onnx [...]     # FLOPs per graph, by op, and this process's peak memory

Per pipeline stage, for one image (see :func:`stage_flops`):

* ``encode`` = vae_encoder; ``unet`` per DDIM step = unet (classifier-free guidance is inside the graph);
* one ADS check = 2 x vae_decoder + 2 x dino_ads (the model estimate and the input-anchored estimate);
* ``decode`` = vae_decoder; ``features`` = dino (input or round trip, and the reconstruction: 2 calls).

Reference point (deployment-anchors.md, section 0): at 512 px with CFG, one ADS check costs about 4.8 UNet steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from glad_runtime.errors import UsageError

__all__ = ["graph_flops", "stage_flops", "infer_shapes", "count_flops", "PEAK_TFLOPS", "main"]

#: Dense fp16 / bf16 tensor-core peak (TFLOP/s, no sparsity), from NVIDIA's data sheets, for the printout.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


_COUNTED = ("Conv", "ConvTranspose", "MatMul", "Gemm", "Einsum", "Attention")


def _fix_batch(model, batch: int = 1) -> None:
    """Give every symbolic input dimension the value ``batch`` (the exporter's only symbolic dim is the batch)."""
    for v in model.graph.input:
        for d in v.type.tensor_type.shape.dim:
            if not d.HasField("dim_value"):
                d.Clear()
                d.dim_value = batch


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)


def _collect(model) -> dict[str, tuple]:
    shapes: dict[str, tuple] = {}
    for v in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        t = v.type.tensor_type
        if t.HasField("shape"):
            shapes[v.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim)
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    for node in model.graph.node:  # Constant nodes (shape tensors, small weights)
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    shapes[node.output[0]] = tuple(a.t.dims)
    return shapes


def _needed(model) -> set[str]:
    return {n for node in model.graph.node if node.op_type in _COUNTED for n in [*node.input[:3], node.output[0]] if n}


#: ops whose output has their first input's shape (replaced by Identity for inference: ONNX's own rule leaves e.g.
#: GroupNormalization's batch symbolic in onnx 1.23)
_SAME_SHAPE = {"GroupNormalization", "LayerNormalization", "InstanceNormalization", "BatchNormalization", "Sigmoid",
               "Relu", "Gelu", "Erf", "Tanh", "Softmax", "Identity", "Cast", "Sqrt", "Neg", "Exp", "Silu", "HardSigmoid",
               "Clip", "Dropout"}


def _surrogate(model):
    """A copy of ``model`` for shape inference only: each shape-preserving op (:data:`_SAME_SHAPE`) becomes an
    ``Identity`` of its first input (same output shape, an inference rule every ONNX version gets right)."""
    import onnx

    m = onnx.ModelProto()
    m.CopyFrom(model)
    for node in m.graph.node:
        if node.op_type in _SAME_SHAPE and node.domain in ("", "ai.onnx"):
            first = node.input[0]
            del node.input[:]
            node.input.append(first)
            del node.output[1:]
            del node.attribute[:]
            node.op_type = "Identity"
    return m


_SMALL = 4096  # elements: integer tensors up to this size are shape arithmetic, folded by _fold_shape_math


def _eval_small(node, vals: dict, shapes: dict):
    """The value of one shape-arithmetic node from its inputs' values (or, for ``Shape``, its input's shape);
    None when it cannot be computed here."""
    op, ins = node.op_type, list(node.input)
    attrs = {a.name: a for a in node.attribute}
    iv = lambda name: vals.get(name)  # noqa: E731
    if op == "Shape":
        sh = shapes.get(ins[0])
        if not _known(sh):
            return None
        start = attrs["start"].i if "start" in attrs else 0
        end = attrs["end"].i if "end" in attrs else None
        return np.array(sh[start:end], dtype=np.int64)
    if op == "Size":
        sh = shapes.get(ins[0])
        return np.array(int(np.prod(sh)), dtype=np.int64) if _known(sh) else None
    args = [iv(i) if i else None for i in ins]
    if not args or any(a is None for a, i in zip(args, ins) if i):
        return None
    if op in ("Add", "Sub", "Mul", "Div", "Equal", "Max", "Min", "Mod"):
        a, b = args[:2]
        f = {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Max": np.maximum,
             "Min": np.minimum, "Mod": np.mod,
             "Div": (np.floor_divide if np.issubdtype(np.asarray(a).dtype, np.integer) else np.divide)}[op]
        return np.asarray(f(a, b))
    if op == "Gather":
        return np.take(args[0], args[1], axis=attrs["axis"].i if "axis" in attrs else 0)
    if op == "Concat":
        return np.concatenate([np.atleast_1d(a) for a in args], axis=attrs["axis"].i)
    if op == "Unsqueeze":
        return np.expand_dims(args[0], tuple(int(x) for x in np.atleast_1d(args[1])))
    if op == "Squeeze":
        return np.squeeze(args[0], tuple(int(x) for x in np.atleast_1d(args[1]))) if len(args) > 1 else \
            np.squeeze(args[0])
    if op == "Reshape":
        return np.reshape(args[0], [int(x) for x in args[1]])
    if op == "Cast":
        from onnx import helper

        return np.asarray(args[0]).astype(helper.tensor_dtype_to_np_dtype(attrs["to"].i))
    if op == "Identity":
        return args[0]
    if op == "Range":
        return np.arange(args[0], args[1], args[2])
    if op == "Where":
        return np.where(*args[:3])
    if op == "ConstantOfShape":
        from onnx import numpy_helper

        value = numpy_helper.to_array(attrs["value"].t).reshape(-1)[0] if "value" in attrs else np.float32(0)
        return np.full([int(x) for x in args[0]], value)
    if op == "Expand":
        shape = [int(x) for x in args[1]]
        return np.broadcast_to(args[0], np.broadcast_shapes(np.shape(args[0]), tuple(shape))).copy()
    if op == "Slice":
        data, starts, ends = args[:3]
        axes = args[3] if len(args) > 3 and args[3] is not None else range(len(starts))
        steps = args[4] if len(args) > 4 and args[4] is not None else [1] * len(starts)
        sl = [slice(None)] * np.ndim(data)
        for a, b, e, st in zip(axes, starts, ends, steps):
            sl[int(a)] = slice(int(b), int(e), int(st))
        return np.asarray(data)[tuple(sl)]
    return None


def _fold_shape_math(model, shapes: dict) -> int:
    """Replace every integer node whose value can be computed from known shapes and constants by a ``Constant``
    (in place); returns how many were folded."""
    from onnx import numpy_helper

    vals: dict = {}
    for init in model.graph.initializer:
        if init.data_type in (6, 7) and np.prod(init.dims) <= _SMALL and init.data_location != 1:
            vals[init.name] = numpy_helper.to_array(init)
    folded = 0
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.t.data_type in (6, 7):
                    vals[node.output[0]] = numpy_helper.to_array(a.t)
            continue
        if len(node.output) != 1:
            continue
        try:
            v = _eval_small(node, vals, shapes)
        except Exception:  # noqa: BLE001 (an op this folder does not model: left to shape inference)
            v = None
        if v is None or np.size(v) > _SMALL or not (np.issubdtype(np.asarray(v).dtype, np.integer)
                                                     or np.asarray(v).dtype == np.bool_):
            continue
        v = np.asarray(v)
        vals[node.output[0]] = v
        del node.input[:]
        del node.attribute[:]
        node.op_type, node.domain = "Constant", ""
        node.attribute.append(__import__("onnx").helper.make_attribute("value", numpy_helper.from_array(v)))
        folded += 1
    return folded


def infer_shapes(model) -> tuple[dict[str, tuple], str]:
    """``({tensor: shape}, how)`` for a model loaded without its weights (``load_external_data=False``), batch fixed
    to 1. Nothing runs: ONNX shape inference with data propagation on a copy whose shape-preserving ops are
    Identities (:func:`_surrogate`: onnx leaves e.g. GroupNormalization's batch symbolic), alternating with folding
    the integer shape arithmetic it cannot follow (``Shape -> Gather -> Add -> Concat -> Reshape``:
    :func:`_fold_shape_math`) until the counted ops' shapes are known; ONNX Runtime's symbolic shape inference last."""
    import onnx

    _fix_batch(model)
    work = _surrogate(model)
    how = "onnx.shape_inference (data_prop)"
    folded_total = 0
    for _ in range(12):
        work = onnx.shape_inference.infer_shapes(work, check_type=False, strict_mode=False, data_prop=True)
        shapes = _collect(work)
        if all(_known(shapes.get(n)) for n in _needed(model)):
            return shapes, how + (f" + {folded_total} shape-arithmetic nodes folded" if folded_total else "")
        folded = _fold_shape_math(work, shapes)
        if not folded:
            break
        folded_total += folded
        del work.graph.value_info[:]
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        sym = SymbolicShapeInference.infer_shapes(work, auto_merge=True, guess_output_rank=True)
        for k, v in _collect(sym).items():
            if _known(v) and not _known(shapes.get(k)):
                shapes[k] = v
        how += " + onnxruntime symbolic_shape_infer"
    except Exception:  # noqa: BLE001 (best effort: the caller names the op left unknown)
        pass
    return shapes, how


def _einsum_flops(eq: str, shapes: list[tuple]) -> float:
    """2 x the product of every index's size (the multiply-adds of a contraction)."""
    lhs = eq.replace(" ", "").split("->")[0].split(",")
    size: dict[str, int] = {}
    for term, shape in zip(lhs, shapes):
        letters = [c for c in term if c.isalpha()]
        if "..." in term:
            n_ell = len(shape) - len(letters)
            pre = term.split("...")[0]
            letters = [c for c in pre if c.isalpha()] + [f"_{i}" for i in range(n_ell)] + \
                [c for c in term.split("...")[1] if c.isalpha()]
        for c, d in zip(letters, shape):
            size[c] = max(size.get(c, 1), d)
    return 2.0 * float(np.prod(list(size.values()))) if size else 0.0


def count_flops(model, shapes: dict[str, tuple], name: str = "graph") -> dict[str, float]:
    """FLOPs per counted op type (``{op_type: FLOPs}``) from ``shapes``.

    Raises:
        UsageError: a counted op whose operand shapes are unknown.
    """
    out: dict[str, float] = {}
    for node in model.graph.node:
        if node.op_type not in _COUNTED:
            continue
        ins = [shapes.get(i) for i in node.input[:2]]
        res = shapes.get(node.output[0])
        if not all(_known(s) for s in ins + [res]):
            raise UsageError(f"{name}: unknown shapes for {node.op_type} {node.name}: {ins} -> {res}")
        attrs = {a.name: a for a in node.attribute}
        if node.op_type == "Conv":
            f = 2.0 * np.prod(res) * np.prod(ins[1][1:])  # w [C_out, C_in/groups, kH, kW]
        elif node.op_type == "ConvTranspose":
            f = 2.0 * np.prod(ins[0]) * np.prod(ins[1][1:])  # w [C_in, C_out/groups, kH, kW], over the input grid
        elif node.op_type == "Gemm":
            a = ins[0]
            k = a[0] if ("transA" in attrs and attrs["transA"].i) else a[-1]
            f = 2.0 * np.prod(res) * k
        elif node.op_type == "MatMul":
            f = 2.0 * np.prod(res) * (ins[0][-1] if len(ins[0]) > 1 else ins[0][0])
        elif node.op_type == "Einsum":
            f = _einsum_flops(attrs["equation"].s.decode(), [shapes[i] for i in node.input])
        else:  # ONNX Attention (opset 23): Q [B, H, Sq, D] (or [B, Sq, H*D]), K [.., Skv, ..]: QK^T and AV
            q, k = ins
            f = 2.0 * 2.0 * np.prod(q) * (k[-2] if len(k) == 4 else k[1])
        out[node.op_type] = out.get(node.op_type, 0.0) + float(f)
    return out


def graph_flops(path: str | Path, detail: bool = False):
    """FLOPs of one batch-1 call of an ONNX graph (Conv / ConvTranspose / MatMul / Gemm / Einsum / Attention),
    from shape inference on the graph alone: the weights (external data) are not loaded and nothing runs, so a
    3.4 GB UNet is counted in well under 1 GB of memory.

    Returns:
        the FLOPs, or with ``detail`` ``{"flops", "by_op": {op: FLOPs}, "shapes_from", "nodes"}``.
    Raises:
        UsageError: a counted op whose operand shapes are unknown.
    """
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    shapes, how = infer_shapes(model)
    by_op = count_flops(model, shapes, Path(path).name)
    total = float(sum(by_op.values()))
    if detail:
        return {"flops": total, "by_op": by_op, "shapes_from": how, "nodes": len(model.graph.node)}
    return total


def stage_flops(onnx_dir: str | Path, num_inference_steps: int, ads_checks: float = 0.0) -> dict[str, float]:
    """FLOPs per image for each stage and the whole pipeline.

    Args:
        onnx_dir: ``BUNDLE/onnx`` (fp32 graphs).
        num_inference_steps: DDIM steps per seed.
        ads_checks: mean number of ADS checks per image (0 with ADS off).
    Returns:
        ``{"encode", "unet_step", "ads_check", "decode", "features", "total", "ads_check_in_unet_steps"}``.
    """
    d = Path(onnx_dir)
    g = {name: graph_flops(d / f"{name}.onnx") for name in ("unet", "vae_encoder", "vae_decoder", "dino")}
    dino_ads = graph_flops(d / "dino_ads.onnx") if (d / "dino_ads.onnx").is_file() else g["dino"]
    ads = 2 * g["vae_decoder"] + 2 * dino_ads
    out = {"encode": g["vae_encoder"], "unet_step": g["unet"], "ads_check": ads, "decode": g["vae_decoder"],
           "features": g["dino"]}
    out["total"] = (g["vae_encoder"] + num_inference_steps * g["unet"] + ads_checks * ads + 2 * g["vae_decoder"]
                    + 2 * g["dino"])
    out["ads_check_in_unet_steps"] = ads / g["unet"]
    return out


def main(argv=None) -> None:
    import argparse
    import json
    import resource

    ap = argparse.ArgumentParser(description="FLOPs of ONNX graphs from shape inference (nothing runs)")
    ap.add_argument("graphs", nargs="+", type=Path)
    a = ap.parse_args(argv)
    for g in a.graphs:
        d = graph_flops(g, detail=True)
        size = g.stat().st_size + sum(p.stat().st_size for p in g.parent.glob(g.name + "*.data"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB -> GiB
        print(json.dumps({"graph": str(g), "gflop": d["flops"] / 1e9, "by_op_gflop":
                          {k: v / 1e9 for k, v in d["by_op"].items()}, "shapes_from": d["shapes_from"],
                          "nodes": d["nodes"], "files_gb": size / 1e9, "peak_rss_gib": round(peak, 3)}), flush=True)


if __name__ == "__main__":
    main()
