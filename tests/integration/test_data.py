"""Tests of training/data.py: MVTec-format reading and the demo-category writers."""

import json

import numpy as np
import pytest
from PIL import Image

from glad_runtime.errors import UsageError
from training.data import (
    MVTecCategory,
    load_mask,
    make_test_defect,
    prepare_elpv,
    prepare_textures,
)


def _img(path, h=16, w=16, value=100, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.full((h, w, 3) if mode == "RGB" else (h, w), value, np.uint8)
    Image.fromarray(a).save(path)
    return path


def _mask(path, box, h=16, w=16, high=255):
    path.parent.mkdir(parents=True, exist_ok=True)
    a = np.zeros((h, w), np.uint8)
    y0, y1, x0, x1 = box
    a[y0:y1, x0:x1] = high
    Image.fromarray(a).save(path)
    return path


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "widget"
    for k in range(3):
        _img(root / "train/good" / f"{k:03d}.png")
    _img(root / "train/good/.hidden.png")
    (root / "train/good/notes.txt").write_text("not an image")
    _img(root / "test/good/000.png")
    _img(root / "test/good/001.jpg")
    # MVTec/MPDD style: <stem>_mask.png
    _img(root / "test/crack/000.png")
    _img(root / "test/crack/001.png")
    _mask(root / "ground_truth/crack/000_mask.png", (2, 5, 3, 9))
    _mask(root / "ground_truth/crack/001_mask.png", (10, 12, 0, 16))
    # VisA style: <stem>.png, 0/1 values, test image is a JPEG
    _img(root / "test/hole/a7.JPG")
    _mask(root / "ground_truth/hole/a7.png", (0, 4, 0, 4), high=1)
    return root


def test_mvtec_tree_loads(tree):
    cat = MVTecCategory(tree)
    assert cat.name == "widget"
    assert [p.name for p in cat.train_images()] == ["000.png", "001.png", "002.png"]
    assert cat.defect_types() == ["crack", "hole"]
    paths, labels, masks = cat.test_images()
    assert [p.name for p in paths] == ["000.png", "001.jpg", "000.png", "001.png", "a7.JPG"]
    assert labels.tolist() == [0, 0, 1, 1, 1]
    assert masks[:2] == [None, None]
    assert masks[2].name == "000_mask.png" and masks[3].name == "001_mask.png" and masks[4].name == "a7.png"
    samples = cat.test_samples()
    assert [s.defect_type for s in samples] == ["good", "good", "crack", "crack", "hole"]
    assert cat.has_pixel_masks
    gt = cat.test_masks()
    assert gt.shape == (5, 16, 16) and gt.dtype == bool
    assert not gt[:2].any()
    exp = np.zeros((16, 16), bool)
    exp[2:5, 3:9] = True
    assert np.array_equal(gt[2], exp)
    assert gt[4].sum() == 16  # 0/1 VisA-style mask read as positive
    assert cat.test_masks(size=8).shape == (5, 8, 8)


def test_mvtec_without_ground_truth_and_errors(tmp_path):
    root = tmp_path / "cells"
    _img(root / "train/good/0.png", mode="L")
    _img(root / "test/good/0.png", mode="L")
    _img(root / "test/defect/1.png", mode="L")
    cat = MVTecCategory(root)
    _, labels, masks = cat.test_images()
    assert labels.tolist() == [0, 1] and masks == [None, None]
    assert not cat.has_pixel_masks
    assert not cat.test_masks().any()
    with pytest.raises(FileNotFoundError):
        MVTecCategory(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="train/ or test/"):
        MVTecCategory(tmp_path / "empty")


def test_load_mask(tmp_path):
    p = _mask(tmp_path / "m.png", (0, 8, 0, 16), h=16, w=16)
    m = load_mask(p)
    assert m.dtype == bool and m.sum() == 128
    assert load_mask(p, size=(4, 8)).sum() == 16
    assert not load_mask(None, size=5).any()
    with pytest.raises(ValueError):
        load_mask(None)


def test_make_test_defect_mask_is_exactly_the_change():
    rng = np.random.default_rng(0)
    sources = [rng.integers(0, 256, (100, 120), dtype=np.uint8)]
    kinds = set()
    for k in range(40):
        img = rng.integers(0, 256, (48, 48), dtype=np.uint8)
        img[:5] = 0
        img[-5:] = 255  # saturated pixels: offsets and stains must still change them
        out, m, info = make_test_defect(img, rng, sources)
        kinds.add(info["kind"])
        assert m.any()
        assert np.array_equal(out != img, m)
    assert kinds == {"foreign", "scratch", "stain"}


def test_prepare_textures_small(tmp_path):
    import skimage.data

    out = prepare_textures(tmp_path, categories=("brick",), seed=3, size=64, n_train=4, n_test_good=3, n_test_defect=5)
    root = out["brick"]
    cat = MVTecCategory(root)
    paths, labels, mask_paths = cat.test_images()
    assert len(cat.train_images()) == 4
    assert labels.tolist() == [0] * 3 + [1] * 5
    assert all(p is not None for p in mask_paths[3:]) and cat.has_pixel_masks
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["counts"] == {"train/good": 4, "test/good": 3, "test/defect": 5}
    assert meta["crop_size"] == 64

    tex = skimage.data.brick()

    def base(rec):
        a = tex[rec["y0"] : rec["y0"] + 64, rec["x0"] : rec["x0"] + 64]
        if rec["flip_h"]:
            a = a[:, ::-1]
        if rec["flip_v"]:
            a = a[::-1]
        return a

    for rec in meta["files"]["train/good"]:
        assert rec["y0"] + 64 <= 256  # top half only
        assert np.array_equal(np.asarray(Image.open(root / "train/good" / rec["file"])), base(rec))
    for rec in meta["files"]["test/good"]:
        assert rec["y0"] >= 256  # bottom half only
    for rec in meta["files"]["test/defect"]:
        assert rec["y0"] >= 256
        img = np.asarray(Image.open(root / "test/defect" / rec["file"]))
        stem = rec["file"].rsplit(".", 1)[0]
        m = load_mask(root / "ground_truth/defect" / f"{stem}_mask.png")
        assert img.shape == (64, 64) and m.any()
        assert np.array_equal(img != base(rec), m)

    # seeded: a second run gives identical files; existing folders are protected
    with pytest.raises(UsageError, match="not empty"):  # a usage error (exit 2), no longer FileExistsError
        prepare_textures(tmp_path, categories=("brick",), seed=3, size=64, n_train=4, n_test_good=3, n_test_defect=5)
    again = prepare_textures(
        tmp_path / "b", categories=("brick",), seed=3, size=64, n_train=4, n_test_good=3, n_test_defect=5
    )["brick"]
    for rel in ("train/good/000.png", "test/defect/004.png", "ground_truth/defect/004_mask.png"):
        assert np.array_equal(np.asarray(Image.open(root / rel)), np.asarray(Image.open(again / rel)))
    # resize path: an explicit 48 px crop resized to 96 px; a crop larger than half the texture is refused
    r = prepare_textures(
        tmp_path / "c", categories=("grass",), size=96, crop_size=48, n_train=1, n_test_good=1, n_test_defect=1
    )
    assert np.asarray(Image.open(r["grass"] / "test/defect/000.png")).shape == (96, 96)
    with pytest.raises(ValueError, match="crop_size"):
        prepare_textures(tmp_path / "d", categories=("grass",), size=300, crop_size=300, n_train=1)


def test_prepare_elpv_shortage_recorded(tmp_path, monkeypatch):
    utils = pytest.importorskip("elpv_dataset.utils")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (12, 20, 20), dtype=np.uint8)
    probs = np.array([0, 0, 0, 0, 0, 1 / 3, 2 / 3, 1, 1, 0, 1, 1], float)
    types = np.array(["mono"] * 10 + ["poly"] * 2)
    monkeypatch.setattr(utils, "load_dataset", lambda: (images, probs, types))
    with pytest.warns(UserWarning, match="fewer images"):
        meta = prepare_elpv(tmp_path / "e", cell_type="mono", n_train=4, n_test_good=5, n_test_defect=3)
    assert meta["available"] == {"normal": 6, "defect": 2}
    assert meta["counts"] == {"train/good": 4, "test/good": 2, "test/defect": 2}
    assert meta["short"]["test/good"] == {"requested": 5, "taken": 2}
    files = {i["index"] for s in meta["files"].values() for i in s}
    assert files.isdisjoint({5, 6, 10, 11})  # uncertain and wrong-type cells excluded
    with pytest.raises(ValueError, match="cell_type"):
        prepare_elpv(tmp_path / "f", cell_type="cigs")
    with pytest.raises(ValueError, match="test_fold"):
        prepare_elpv(tmp_path / "g", cell_type="mono", test_fold=-1)


def test_prepare_elpv_test_folds(tmp_path, monkeypatch):
    """Fold k keeps train/good and takes the k-th next block of held-out cells; folds are disjoint."""
    utils = pytest.importorskip("elpv_dataset.utils")
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (30, 8, 8), dtype=np.uint8)
    probs = np.array([0.0] * 20 + [1.0] * 10)
    types = np.array(["mono"] * 30)
    monkeypatch.setattr(utils, "load_dataset", lambda: (images, probs, types))
    metas = [prepare_elpv(tmp_path / f"f{k}", cell_type="mono", n_train=8, n_test_good=5, n_test_defect=4,
                          test_fold=k) for k in (0, 1)]
    idx = [{s: [i["index"] for i in m["files"][s]] for s in m["files"]} for m in metas]
    assert idx[0]["train/good"] == idx[1]["train/good"]
    for s in ("test/good", "test/defect"):
        assert set(idx[0][s]).isdisjoint(idx[1][s]) and len(idx[1][s]) == len(idx[0][s])
    # closed form: the same generator order as prepare_elpv (normals, then defects)
    g = np.random.default_rng(0)
    normals = np.arange(20)[g.permutation(20)]
    defects = np.arange(20, 30)[g.permutation(10)]
    assert idx[1]["test/good"] == normals[13:18].tolist() and idx[1]["test/defect"] == defects[4:8].tolist()
    assert metas[1]["test_fold"] == 1
    with pytest.warns(UserWarning, match="fewer images"):
        short = prepare_elpv(tmp_path / "f2", cell_type="mono", n_train=8, n_test_good=5, n_test_defect=4,
                             test_fold=2)
    assert short["counts"] == {"train/good": 8, "test/good": 2, "test/defect": 2}


def test_prepare_elpv_real_tiny(tmp_path):
    pytest.importorskip("elpv_dataset")
    out = tmp_path / "elpv_mono"
    meta = prepare_elpv(out, cell_type="mono", seed=0, n_train=5, n_test_good=3, n_test_defect=2)
    assert meta["counts"] == {"train/good": 5, "test/good": 3, "test/defect": 2}
    assert meta["available"] == {"normal": 588, "defect": 313}
    assert json.loads((out / "dataset.json").read_text())["seed"] == 0
    cat = MVTecCategory(out)
    paths, labels, masks = cat.test_images()
    assert len(cat.train_images()) == 5 and labels.tolist() == [0, 0, 0, 1, 1]
    assert masks == [None] * 5 and not (out / "ground_truth").exists()
    with Image.open(paths[-1]) as im:
        assert im.mode == "L" and im.size == (300, 300)
    train = {p.name for p in cat.train_images()}
    assert train.isdisjoint({p.name for p in paths})
    assert all(r["probability"] == 0.0 for r in meta["files"]["train/good"] + meta["files"]["test/good"])
    assert all(r["probability"] == 1.0 and r["type"] == "mono" for r in meta["files"]["test/defect"])
