"""Shared fixtures: a tiny random bundle, stub engines, real images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from glad_runtime.core.scoring import IMAGENET_MEAN, IMAGENET_STD
from glad_runtime.core.config import GladConfig


class StubEngines:
    """Deterministic numpy engines with known outputs (for ADS/SAFF tests).

    encode/decode are the identity (latents = images, 3 channels, downsample 1); ``unet`` returns a fixed linear
    function of its input; ``features`` returns per-pixel tokens ``[norm(x), 1]`` (patch size 1), with ImageNet
    normalisation inside like the real feature graphs.
    """

    def __init__(self, gain: float = 0.3):
        self.gain = gain
        self.calls = {"encode": 0, "unet": 0, "decode": 0, "features": 0}
        self.decode_batches: list[int] = []

    def encode(self, images):
        self.calls["encode"] += 1
        return images.astype(np.float32).copy()

    def unet(self, latents, timesteps):
        self.calls["unet"] += 1
        t = timesteps.astype(np.float32)[:, None, None, None] / 1000.0
        return (self.gain * latents * (1.0 + t) + 0.1 * np.tanh(latents)).astype(np.float32)

    def decode(self, latents):
        self.calls["decode"] += 1
        self.decode_batches.append(len(latents))
        return latents.astype(np.float32).copy()

    def features(self, images):
        self.calls["features"] += 1
        x = ((images + 1) / 2 - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]
        tok = np.concatenate([x, np.ones_like(x[:, :1])], axis=1)
        return [np.transpose(tok, (0, 2, 3, 1)).astype(np.float32)]


class HostComposite:
    """The four networks of an engine without its fused ``ads_distance`` (forces the pipeline's host-side check)."""

    def __init__(self, engines):
        self.encode, self.unet, self.decode, self.features = (engines.encode, engines.unet, engines.decode,
                                                              engines.features)


def stub_config(**kw) -> GladConfig:
    base = dict(preset="stub", architecture="tiny", resolution=8, latent_channels=3, latent_downsample=1,
                scaling_factor=1.0, t_max=300, num_inference_steps=6, guidance_scale=1.0, tau=0.05, min_step=150,
                ads_top_k=4, dino_resolution=8, ads_resolution=8, patch_size=1, feature_layers=(0,),
                blur_sigma=1.0, top_k=5, score_reference="input")
    base.update(kw)
    return GladConfig(**base)


@pytest.fixture
def stub_engines():
    return StubEngines()


@pytest.fixture
def stub_backends(monkeypatch):
    """Every row of the backend table (``glad_runtime.engines.BACKENDS``) opening :class:`StubEngines` instead of
    its networks, its accepted values and options unchanged (restored after the test): the CLI and
    ``Detector.open`` run as they do, fast. Returns the list of the ``EngineSpec`` s opened, in order."""
    import dataclasses

    from glad_runtime.engines import BACKENDS

    opened = []

    def factory(bundle, spec):
        opened.append(spec)
        return StubEngines()

    for name, row in list(BACKENDS.items()):
        monkeypatch.setitem(BACKENDS, name, dataclasses.replace(row, factory=factory))
    return opened


@pytest.fixture(scope="session")
def tiny_modules():
    """Random-init tiny modules with a small random ViT (no external weights)."""
    from export.models import build_tiny_modules
    from glad_runtime.core.config import get_preset

    return build_tiny_modules(get_preset("tiny"), seed=0, features="random")


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_modules):
    from export.models import save_bundle_modules
    from glad_runtime.core.bundle import Bundle
    from glad_runtime.core.config import get_preset

    path = tmp_path_factory.mktemp("bundle") / "tiny"
    # ADS on (the tiny preset ships it off, see glad_runtime.core.config), so the full loop is exercised
    b = Bundle.create(path, get_preset("tiny", ads_enabled=True, tau=0.02, min_step=150))
    save_bundle_modules(tiny_modules, b)
    return b


@pytest.fixture(scope="session")
def exported_bundle(tmp_path_factory, tiny_bundle, tiny_modules):
    """``(Bundle, reports)``: a copy of the tiny bundle (ADS on, ADS size != scoring size) exported in fp32 and fp16
    (about 40-70 s on 2 cores; shared by the export and serving tests). Do not modify it: copy it first."""
    import shutil

    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from export.onnx_export import export_bundle
    from glad_runtime.core.bundle import Bundle

    path = tmp_path_factory.mktemp("export") / "tiny"
    shutil.copytree(tiny_bundle.path, path)
    b = Bundle(path)
    reports = export_bundle(b, tiny_modules)
    return b, reports


@pytest.fixture(scope="session")
def elpv_images():
    """A few real ELPV solar-cell images (uint8 [N,300,300]) and labels; skipped when the package is absent."""
    utils = pytest.importorskip("elpv_dataset.utils")
    images, probs, types = utils.load_dataset()
    mono = types == "mono"
    good = np.where(mono & (probs == 0))[0][:4]
    bad = np.where(mono & (probs == 1))[0][:4]
    return images[good], images[bad]


def bundle_copy(bundle, tmp_path_factory, folder: str):
    """A private copy of ``bundle`` (a :class:`~glad_runtime.core.bundle.Bundle`) under a new temporary folder
    ``folder``/<bundle name>, for tests that write into it (model caches, quantised graphs, calibration)."""
    import shutil

    from glad_runtime.core.bundle import Bundle

    path = tmp_path_factory.mktemp(folder) / Path(bundle.path).name
    shutil.copytree(bundle.path, path)
    return Bundle(path)


def png_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8 [H, W] or [H, W, 3]) encoded as a PNG file's bytes (Pillow)."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def detect_without_torch(bundle_path, images_dir, out, engine_args):
    """Run ``glad detect BUNDLE IMAGES --out OUT <engine_args> --quiet`` in a fresh interpreter and assert that
    it exits 0 without importing torch, diffusers or timm; returns the ``results.jsonl`` records."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    code = ("import sys\n"
            "from glad_cli.main import cli\n"
            "try:\n"
            f"    cli(['detect', {str(bundle_path)!r}, {str(images_dir)!r}, '--out', {str(out)!r}, "
            f"*{list(engine_args)!r}, '--quiet'])\n"
            "except SystemExit as e:\n"
            "    assert e.code == 0, e.code\n"
            "bad = [m for m in ('torch', 'diffusers', 'timm') if m in sys.modules]\n"
            "assert not bad, bad\n"
            "print('NO_TORCH_OK')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).resolve().parents[1])
    assert "NO_TORCH_OK" in res.stdout, res.stdout + res.stderr
    return [json.loads(line) for line in (Path(out) / "results.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- tiers
#: Test tiers by directory (issue 29): ``unit`` (pure: no network build, no export, no server; `make test-fast`,
#: under a minute on 2 cores), ``integration`` (torch, export, training), ``serving`` (real tritonservers),
#: ``container`` (the CPU image built and run with podman; `make test-container`, skipped where podman cannot run).
TIERS = ("unit", "integration", "serving", "container")


def pytest_collection_modifyitems(config, items):
    """Mark every test with its tier, from the directory it lives in (``pytest -m unit`` etc.)."""
    for item in items:
        parts = Path(str(item.fspath)).parts
        for tier in TIERS:
            if tier in parts:
                item.add_marker(getattr(pytest.mark, tier))
                break
        else:
            item.add_marker(pytest.mark.integration)


def html_image_sources(page: str) -> list[str]:
    """The ``src`` of every ``<img>`` of an HTML page, in order (the reports' self-containment checks)."""
    from html.parser import HTMLParser

    class Images(HTMLParser):
        def __init__(self):
            super().__init__()
            self.srcs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(page)
    return parser.srcs
