"""FLOP counts per network call, read from the exported ONNX graphs (batch 1).

Counted ops (multiply-add = 2 FLOPs): ``Conv`` ``2 * N * C_out * H_out * W_out * (C_in / groups) * kH * kW``,
``ConvTranspose`` the same over the input grid, ``MatMul`` / ``Gemm`` ``2 * batch * M * N * K``, fused
``Attention``-style ops are not produced by our exporter. Normalisations, activations and element-wise ops are
ignored (memory-bound, < 2 % of the total for these networks). Shapes come from ONNX shape inference with the batch
fixed to 1.

Per pipeline stage, for one image (see :func:`stage_flops`):

* ``encode`` = vae_encoder; ``unet`` per DDIM step = unet (classifier-free guidance is inside the graph);
* one ADS check = 2 x vae_decoder + 2 x dino_ads (the model estimate and the input-anchored estimate);
* ``decode`` = vae_decoder; ``features`` = dino (input or round trip, and the reconstruction: 2 calls).

Reference point (deployment-anchors.md, section 0): at 512 px with CFG, one ADS check costs about 4.8 UNet steps.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["graph_flops", "stage_flops", "PEAK_TFLOPS"]

#: Dense fp16 / bf16 tensor-core peak (TFLOP/s, no sparsity), from NVIDIA's data sheets, for the printout.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0, "T4": 65.0}


def _shapes(model) -> dict[str, tuple[int, ...]]:
    """Every tensor's shape from one batch-1 ONNX Runtime run on zeros (exact where static shape inference of
    exporter-derived symbolic shapes is not)."""
    import onnx

    from export.onnx_tools import intermediate_values

    feeds = {}
    for v in model.graph.input:
        dims = [d.dim_value if d.dim_value > 0 else 1 for d in v.type.tensor_type.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type)
        feeds[v.name] = np.zeros(dims, dtype=dtype)
    shapes = {name: tuple(np.asarray(val).shape) for name, val in intermediate_values(model, feeds).items()}
    shapes.update({k: tuple(v.shape) for k, v in feeds.items()})
    for init in model.graph.initializer:
        shapes[init.name] = tuple(init.dims)
    return shapes


def graph_flops(path: str | Path) -> float:
    """FLOPs of one batch-1 call of an ONNX graph (Conv / ConvTranspose / MatMul / Gemm only).

    Raises:
        ValueError: a counted op whose operand shapes are unknown.
    """
    import onnx

    model = onnx.load(str(path))
    shapes = _shapes(model)
    total = 0.0
    for node in model.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        ins = [shapes.get(i) for i in node.input[:2]]
        out = shapes.get(node.output[0])
        if any(s is None for s in ins + [out]):
            raise ValueError(f"{Path(path).name}: unknown shapes for {node.op_type} {node.name}: {ins} -> {out}")
        if node.op_type == "Conv":
            w = ins[1]  # [C_out, C_in/groups, kH, kW]
            total += 2.0 * np.prod(out) * np.prod(w[1:])
        elif node.op_type == "ConvTranspose":
            w = ins[1]  # [C_in, C_out/groups, kH, kW]
            total += 2.0 * np.prod(ins[0]) * np.prod(w[1:])
        else:
            k = ins[0][-1]
            total += 2.0 * np.prod(out) * k
    return float(total)


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
