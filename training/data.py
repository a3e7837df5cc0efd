"""MVTec-format datasets: reading any MVTec-AD/MPDD/VisA-style category, and writing the project's offline
demo categories (ELPV solar cells, scikit-image textures with synthetic test defects).

Layout (spec section 6)::

    <category>/train/good/*.<img>
    <category>/test/good/*.<img>
    <category>/test/<defect type>/*.<img>
    <category>/ground_truth/<defect type>/<stem>_mask.<img>   (MVTec-AD, MPDD)
    <category>/ground_truth/<defect type>/<stem>.<img>        (VisA, PCB-Bank after conversion)

Only paths and masks are handled here; images are decoded by the runtime's loader (``convert("RGB")``, resize).
Test labels: folder ``good`` = 0, any other folder = 1 (spec section 6).

Nothing here downloads anything: ELPV comes from the installed PyPI package ``elpv-dataset`` and the textures
from images bundled with scikit-image (see ``/work/shared/reference/data.md``).
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from glad_runtime.core.images import IMAGE_EXTENSIONS
from glad_runtime.errors import InvalidInputError, MissingExtraError, PathNotFoundError, UsageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "TEST_DEFECT_SOURCE_IMAGES",
    "TestSample",
    "MVTecCategory",
    "labelled_samples",
    "load_mask",
    "prepare_elpv",
    "prepare_textures",
    "make_test_defect",
]


#: scikit-image bundled images (offline) used as foreign material in *test* defects. Disjoint from
#: ``training.synth.TRAIN_SOURCE_IMAGES`` so that test defects are not drawn from the training anomaly sources.
TEST_DEFECT_SOURCE_IMAGES = ("astronaut", "rocket", "coins", "moon", "retina", "clock", "cell")

ELPV_INSTALL_HINT = "pip install elpv-dataset==1.0.0.post1"


def _is_image(p: Path) -> bool:
    return p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS


def _list_images(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if _is_image(p)) if d.is_dir() else []


@dataclass(frozen=True)
class TestSample:
    """One test image of an MVTec-format category.

    Attributes:
        path: image file.
        label: 0 for ``test/good``, 1 for any other folder.
        defect_type: name of the test sub-folder (``"good"`` for normals).
        mask_path: ground-truth mask file, or None (normal image, or no pixel ground truth for this image).
    """

    __test__ = False  # not a pytest test class

    path: Path
    label: int
    defect_type: str
    mask_path: Path | None


class MVTecCategory:
    """One MVTec-format category folder (MVTec-AD, MPDD, VisA/PCB-Bank after conversion, or our own outputs).

    Args:
        root: the category folder, containing ``train/`` and/or ``test/``.
        test_dir: the folder holding ``good/`` and the defect folders (default ``root/test``); ``root`` itself
            for a bare labelled folder (see :func:`labelled_samples`), where a ``ground_truth`` folder is not a
            defect type.

    Raises:
        PathNotFoundError: ``root`` does not exist or has neither ``train/`` nor ``test/`` (nor ``test_dir``).

    Mask lookup for ``test/<defect>/<stem>.<ext>``: ``ground_truth/<defect>/<stem>_mask.<any image ext>``
    (MVTec/MPDD), else ``ground_truth/<defect>/<stem>.<any image ext>`` (VisA). When there is no ground_truth
    folder (e.g. ELPV, image labels only) the mask path is None.
    """

    def __init__(self, root: str | os.PathLike, test_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(root)
        self.test_dir = self.root / "test" if test_dir is None else Path(test_dir)
        if not self.root.is_dir():
            raise PathNotFoundError(f"category folder not found: {self.root}")
        if not (self.root / "train").is_dir() and not self.test_dir.is_dir():
            raise PathNotFoundError(f"{self.root} is not an MVTec-format category: no train/ or test/ folder")
        self._test: list[TestSample] | None = None

    @property
    def name(self) -> str:
        """Folder name of the category."""
        return self.root.name

    def __repr__(self) -> str:
        return f"MVTecCategory({str(self.root)!r})"

    def train_images(self) -> list[Path]:
        """Sorted image paths under ``train/good``.

        Raises:
            PathNotFoundError: no ``train/good`` folder or no images in it.
        """
        d = self.root / "train" / "good"
        imgs = _list_images(d)
        if not imgs:
            raise PathNotFoundError(f"no training images in {d}")
        return imgs

    def defect_types(self) -> list[str]:
        """Sorted names of the test sub-folders other than ``good``."""
        d = self.test_dir
        if not d.is_dir():
            return []
        skip = {"good", "ground_truth", "train"} if d.resolve() == self.root.resolve() else {"good"}
        return sorted(p.name for p in d.iterdir() if p.is_dir() and p.name not in skip and not p.name.startswith("."))

    @staticmethod
    def _mask_index(gt_dir: Path) -> dict[str, Path]:
        index: dict[str, Path] = {}
        for p in _list_images(gt_dir):
            index.setdefault(p.stem, p)
        return index

    def test_samples(self) -> list[TestSample]:
        """All test images: ``good`` first, then defect types in sorted order, files sorted within a folder.

        Returns:
            list of :class:`TestSample` (label 0/1, mask path or None).

        Raises:
            PathNotFoundError: no ``test/`` folder or no test images.
        """
        if self._test is not None:
            return list(self._test)
        test_dir = self.test_dir
        if not test_dir.is_dir():
            raise PathNotFoundError(f"no test folder in {self.root}")
        samples: list[TestSample] = []
        for kind in ["good"] + self.defect_types():
            imgs = _list_images(test_dir / kind)
            if kind == "good":
                samples += [TestSample(p, 0, "good", None) for p in imgs]
                continue
            index = self._mask_index(self.root / "ground_truth" / kind)
            for p in imgs:
                mask = index.get(f"{p.stem}_mask") or index.get(p.stem)
                samples.append(TestSample(p, 1, kind, mask))
        if not samples:
            raise PathNotFoundError(f"no test images under {test_dir}")
        self._test = samples
        return list(samples)

    def test_images(self) -> tuple[list[Path], np.ndarray, list[Path | None]]:
        """Test images as parallel lists.

        Returns:
            (paths, labels int64 [N] in {0, 1}, mask_paths with None where there is no mask).
        """
        s = self.test_samples()
        return [t.path for t in s], np.array([t.label for t in s], dtype=np.int64), [t.mask_path for t in s]

    @property
    def has_pixel_masks(self) -> bool:
        """True when every anomalous test image has a ground-truth mask (pixel metrics are possible)."""
        defects = [t for t in self.test_samples() if t.label == 1]
        return bool(defects) and all(t.mask_path is not None for t in defects)

    def test_masks(self, size: int | Sequence[int] | None = None) -> np.ndarray:
        """Ground-truth masks of all test images, stacked, in :meth:`test_samples` order.

        Args:
            size: output (H, W) or int; None = native size (all masks/images must then share one size).

        Returns:
            bool [N, H, W]; all-False for normal images and for defects without a mask file.
        """
        out = []
        hw = _hw(size)
        for t in self.test_samples():
            if t.mask_path is None:
                if hw is None:
                    with Image.open(t.path) as im:
                        w, h = im.size
                    out.append(np.zeros((h, w), bool))
                else:
                    out.append(np.zeros(hw, bool))
            else:
                out.append(load_mask(t.mask_path, hw))
        shapes = {o.shape for o in out}
        if len(shapes) != 1:
            raise InvalidInputError(f"masks of {self.root} have different sizes {sorted(shapes)}; pass size=")
        return np.stack(out)


def labelled_samples(folder: str | os.PathLike) -> list[TestSample]:
    """Labelled images of a folder (for ``glad calibrate --labelled``): label 0 for ``good``, 1 for other folders.

    Accepted layouts:

    * an MVTec-format category: ``folder/test/good``, ``folder/test/<defect>`` (masks from
      ``folder/ground_truth``), i.e. :meth:`MVTecCategory.test_samples`;
    * a category's ``test`` folder itself (``folder/good``, ``folder/<defect>``, with ``folder.name == "test"`` and
      masks from ``folder/../ground_truth``);
    * a bare folder: ``folder/good`` and one sub-folder per defect type, masks (optional) from
      ``folder/ground_truth/<defect>/``.

    Raises:
        PathNotFoundError: (a FileNotFoundError) no ``test/`` or ``good/`` sub-folder, or no images.
    """
    root = Path(folder)
    if (root / "test").is_dir():
        return MVTecCategory(root).test_samples()
    if not (root / "good").is_dir():
        raise PathNotFoundError(f"{root} has neither test/ (an MVTec-format category) nor good/ (a labelled folder)")
    if root.name == "test":
        return MVTecCategory(root.parent).test_samples()
    return MVTecCategory(root, test_dir=root).test_samples()


def _hw(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    if isinstance(size, (int, np.integer)):
        return int(size), int(size)
    return int(size[0]), int(size[1])


def load_mask(path: str | os.PathLike | None, size: int | Sequence[int] | None = None) -> np.ndarray:
    """Read a ground-truth mask as a bool array.

    Args:
        path: mask image (any PIL-readable format, any mode); None gives an all-False mask (``size`` required).
        size: optional output (H, W) or int; resized bilinearly and re-thresholded at half range.

    Returns:
        bool [H, W]. A mask whose maximum is <= 1 (0/1 PNGs) is positive where > 0, otherwise where >= 128
        (0/255 PNGs as MVTec-AD/VisA ship them).
    """
    hw = _hw(size)
    if path is None:
        if hw is None:
            raise UsageError("load_mask(None) needs size=")
        return np.zeros(hw, bool)
    with Image.open(path) as im:
        a = np.asarray(im.convert("L") if im.mode not in ("L", "1", "I", "I;16") else im)
    a = a.astype(np.float32)
    if a.max() <= 1.0:
        a = a * 255.0
    m = a >= 128.0
    if hw is not None and m.shape != hw:
        r = Image.fromarray((m * 255).astype(np.uint8)).resize((hw[1], hw[0]), Image.BILINEAR)
        m = np.asarray(r) >= 128
    return m


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and any(out_dir.iterdir()):
        if not overwrite:
            raise UsageError(f"{out_dir} exists and is not empty; pass overwrite=True to replace it")
        for sub in ("train", "test", "ground_truth", "dataset.json"):
            p = out_dir / sub
            if p.is_dir():
                shutil.rmtree(p)
            elif p.exists():
                p.unlink()
    out_dir.mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------- ELPV


def prepare_elpv(
    out_dir: str | os.PathLike,
    cell_type: str = "mono",
    seed: int = 0,
    n_train: int = 300,
    n_test_good: int = 100,
    n_test_defect: int = 100,
    overwrite: bool = False,
    test_fold: int = 0,
) -> dict:
    """Write the ELPV solar-cell images as an MVTec-format category (image-level labels only).

    Source: PyPI ``elpv-dataset==1.0.0.post1`` (2,624 electroluminescence cells, 300x300 uint8 grayscale, defect
    probability in {0, 1/3, 2/3, 1}, type mono/poly; images CC-BY-NC-SA-4.0, never commit them). Labels used:
    normal = probability 0, defective = probability 1; the uncertain 1/3 and 2/3 cells are excluded. Counts
    available: mono 588 normal / 313 defective, poly 920 / 402.

    The normals are permuted with ``numpy.random.default_rng(seed)`` and split into ``train/good`` (first
    ``n_train``) and the held-out ``test/good`` (next ``n_test_good``); ``n_test_defect`` defective cells, drawn
    from the same generator, go to ``test/defect``. ``test_fold`` k > 0 keeps the same training cells and takes the
    k-th next block of held-out cells instead (normals ``n_train + k * n_test_good ...``, defects
    ``k * n_test_defect ...``): a second, disjoint test set for the same trained detector. With the defaults mono
    has folds 0-1 (588 normals), poly 0-5. On ELPV mono the split matters: the kNN baseline scores 0.953 on fold 0
    and 0.972 on fold 1 (see the README), so compare methods on the same fold. There is no ``ground_truth`` folder
    (no pixel masks exist).
    If fewer images exist than requested, the split takes what there is (train first), warns, and records it.
    Files are 8-bit grayscale PNGs named ``<dataset index:04d>.png``; ``dataset.json`` records the seed, the
    requested and actual counts, the source, the label rule and the dataset index / original file of every image.

    Args:
        out_dir: the category folder to create (e.g. ``data/elpv_mono``).
        cell_type: "mono", "poly" or "all".
        seed: split seed.
        n_train, n_test_good, n_test_defect: requested counts (>= 0).
        overwrite: replace an existing non-empty ``out_dir``.
        test_fold: which block of held-out cells forms the test split (>= 0; 0 = the first).

    Returns:
        The ``dataset.json`` content as a dict.

    Raises:
        MissingExtraError: ``elpv-dataset`` is not installed (the message says how to install it).
        UsageError: bad ``cell_type``, negative counts or ``test_fold``; ``out_dir`` is not empty and
            ``overwrite`` is False.
    """
    try:
        from elpv_dataset import utils as elpv_utils
    except ImportError as e:  # pragma: no cover - exercised only without the package
        raise MissingExtraError(
            f"prepare_elpv needs the ELPV images from PyPI: `{ELPV_INSTALL_HINT}` (nothing is downloaded here)",
            module="elpv_dataset", extra="data") from e
    if cell_type not in ("mono", "poly", "all"):
        raise UsageError(f"cell_type must be 'mono', 'poly' or 'all', got {cell_type!r}")
    for k, v in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect),
                 ("test_fold", test_fold)):
        if int(v) < 0:
            raise UsageError(f"{k} must be >= 0, got {v}")

    images, probs, types = elpv_utils.load_dataset()
    names = _elpv_file_names(elpv_utils, len(probs))
    sel = np.ones(len(probs), bool) if cell_type == "all" else (np.asarray(types) == cell_type)
    normal_idx = np.flatnonzero(sel & np.isclose(probs, 0.0))
    defect_idx = np.flatnonzero(sel & np.isclose(probs, 1.0))

    rng = np.random.default_rng(seed)
    normal_idx = normal_idx[rng.permutation(normal_idx.size)]
    defect_idx = defect_idx[rng.permutation(defect_idx.size)]
    n_tr = min(int(n_train), normal_idx.size)
    g0 = min(n_tr + int(test_fold) * int(n_test_good), normal_idx.size)
    d0 = min(int(test_fold) * int(n_test_defect), defect_idx.size)
    n_tg = min(int(n_test_good), normal_idx.size - g0)
    n_td = min(int(n_test_defect), defect_idx.size - d0)
    splits = {
        "train/good": normal_idx[:n_tr],
        "test/good": normal_idx[g0 : g0 + n_tg],
        "test/defect": defect_idx[d0 : d0 + n_td],
    }
    requested = {"train/good": int(n_train), "test/good": int(n_test_good), "test/defect": int(n_test_defect)}
    counts = {k: int(v.size) for k, v in splits.items()}
    short = {k: (requested[k], counts[k]) for k in counts if counts[k] < requested[k]}
    if short:
        warnings.warn(f"ELPV {cell_type}: fewer images than requested (requested, taken): {short}", stacklevel=2)

    out = Path(out_dir)
    _prepare_out(out, overwrite)
    files: dict[str, list[dict]] = {}
    for split, idx in splits.items():
        d = out / split
        d.mkdir(parents=True, exist_ok=True)
        files[split] = []
        for i in idx:
            i = int(i)
            Image.fromarray(np.ascontiguousarray(images[i]).astype(np.uint8)).save(d / f"{i:04d}.png")
            files[split].append(
                {
                    "file": f"{i:04d}.png",
                    "index": i,
                    "elpv_file": names[i],
                    "probability": float(probs[i]),
                    "type": str(types[i]),
                }
            )

    meta = {
        "name": out.name,
        "source": "PyPI elpv-dataset==1.0.0.post1, elpv_dataset.utils.load_dataset()",
        "license": "CC-BY-NC-SA-4.0 (images); do not commit",
        "label_rule": "normal: defect probability 0; defective: probability 1; 1/3 and 2/3 excluded",
        "cell_type": cell_type,
        "seed": int(seed),
        "test_fold": int(test_fold),
        "image_size": [int(images.shape[1]), int(images.shape[2])],
        "pixel_masks": False,
        "available": {"normal": int(normal_idx.size), "defect": int(defect_idx.size)},
        "requested": requested,
        "counts": counts,
        "short": {k: {"requested": r, "taken": t} for k, (r, t) in short.items()},
        "files": files,
    }
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return meta


def _elpv_file_names(elpv_utils, n: int) -> list[str]:
    """Original ELPV file names (``images/cellXXXX.png``) in load_dataset() order, or '' if unreadable."""
    try:
        fname = os.path.join(os.path.dirname(elpv_utils.__file__), "data", "labels.csv")
        data = np.genfromtxt(fname, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
        names = [str(s) for s in np.char.decode(data["path"])]
        if len(names) == n:
            return names
    except Exception:  # noqa: BLE001 - names are informative only
        pass
    return [""] * n


# ------------------------------------------------------------------------------------------------ textures


def _skimage_gray(name: str) -> np.ndarray:
    from .synth import skimage_image

    a = skimage_image(name)
    return np.asarray(Image.fromarray(a).convert("L")) if a.ndim == 3 else a


def _load_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def _disk(r: int) -> np.ndarray:
    y, x = np.mgrid[-r : r + 1, -r : r + 1]
    return x * x + y * y <= r * r + 0.5


def _ellipse_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    m = np.zeros((h, w), bool)
    for _ in range(int(rng.integers(1, 4))):
        cy, cx = rng.uniform(0.15, 0.85) * h, rng.uniform(0.15, 0.85) * w
        a, b = rng.uniform(0.03, 0.14) * h, rng.uniform(0.03, 0.14) * w
        th = rng.uniform(0, np.pi)
        dy, dx = yy - cy, xx - cx
        u = dx * np.cos(th) + dy * np.sin(th)
        v = -dx * np.sin(th) + dy * np.cos(th)
        m |= (u / a) ** 2 + (v / b) ** 2 <= 1.0
    return m


def _scratch_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    m = np.zeros((h, w), bool)
    p = np.array([rng.uniform(0.1, 0.9) * h, rng.uniform(0.1, 0.9) * w])
    ang = rng.uniform(0, 2 * np.pi)
    for _ in range(int(rng.integers(1, 4))):
        ang += rng.normal(0, 0.5)
        length = rng.uniform(0.15, 0.45) * min(h, w)
        n = int(length * 2) + 2
        t = np.linspace(0, length, n)
        ys = p[0] + t * np.sin(ang)
        xs = p[1] + t * np.cos(ang)
        keep = (ys >= 0) & (ys <= h - 1) & (xs >= 0) & (xs <= w - 1)
        m[np.rint(ys[keep]).astype(int), np.rint(xs[keep]).astype(int)] = True
        p = np.array([ys[-1], xs[-1]])
    r = int(rng.integers(1, 4))
    return ndimage.binary_dilation(m, structure=_disk(r))


def _blob_mask(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    sigma = rng.uniform(0.02, 0.05) * min(h, w)
    noise = ndimage.gaussian_filter(rng.normal(size=(h, w)), sigma)
    noise = (noise - noise.mean()) / (noise.std() + 1e-12)
    cy, cx = rng.uniform(0.2, 0.8) * h, rng.uniform(0.2, 0.8) * w
    rad = rng.uniform(0.08, 0.2) * min(h, w)
    yy, xx = np.mgrid[0:h, 0:w]
    window = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad * rad
    return (noise > rng.uniform(-0.3, 0.5)) & window


_MASK_MAKERS = {"ellipse": _ellipse_mask, "scratch": _scratch_mask, "blob": _blob_mask}


def make_test_defect(
    img: np.ndarray,
    rng: np.random.Generator,
    sources: Sequence[np.ndarray],
    min_fraction: float = 0.002,
    max_fraction: float = 0.25,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Put one synthetic *test* defect on a grayscale image, with an exact mask.

    Deliberately different from the training synthesizer (``training.synth``, Perlin masks + DTD-like sources):
    masks are random ellipses, scratches (dilated random polylines) or blobs (thresholded smooth noise inside a
    disc), and the content is one of

    * ``foreign``: a random crop of a test-only source image (:data:`TEST_DEFECT_SOURCE_IMAGES` by default),
      alpha-blended with alpha ~ U(0.7, 1) (ellipse or blob mask);
    * ``scratch``: an intensity offset of +-U(60, 120) grey levels along a scratch mask;
    * ``stain``: a multiplicative darkening (x0.35-0.65) or brightening (x1.4-1.8) on a blob or ellipse mask.

    Every masked pixel is guaranteed to change (pixels the blend left equal are moved by 40 grey levels), and no
    pixel outside the mask changes, so ``mask == (out != img)`` exactly.

    Args:
        img: uint8 [H, W] grayscale image.
        rng: numpy Generator.
        sources: grayscale uint8 images for the ``foreign`` content (any sizes).
        min_fraction, max_fraction: accepted mask area range (fraction of pixels); masks are redrawn up to 50
            times to fall in it.

    Returns:
        (out uint8 [H, W], mask bool [H, W], info dict with ``kind``, ``mask_shape``, ``fraction``).
    """
    x = np.asarray(img)
    if x.ndim != 2 or x.dtype != np.uint8:
        raise InvalidInputError(f"make_test_defect expects a uint8 [H, W] image, got {x.dtype} {x.shape}")
    h, w = x.shape
    kind = str(rng.choice(["foreign", "scratch", "stain"]))
    if kind == "foreign" and not sources:
        kind = "stain"
    if kind == "scratch":
        shape_name = "scratch"
    else:
        shape_name = str(rng.choice(["ellipse", "blob"]))
    for _ in range(50):
        m = _MASK_MAKERS[shape_name](h, w, rng)
        if min_fraction <= m.mean() <= max_fraction:
            break
    if not m.any():
        m[h // 2 - 2 : h // 2 + 2, w // 2 - 2 : w // 2 + 2] = True
    xf = x.astype(np.float32)
    if kind == "foreign":
        src = np.asarray(sources[int(rng.integers(0, len(sources)))], dtype=np.uint8)
        sh, sw = src.shape[:2]
        c = int(rng.integers(min(sh, sw) // 4, min(sh, sw) + 1))
        y0, x0 = int(rng.integers(0, sh - c + 1)), int(rng.integers(0, sw - c + 1))
        patch = Image.fromarray(np.ascontiguousarray(src[y0 : y0 + c, x0 : x0 + c])).resize((w, h), Image.BILINEAR)
        patch = np.asarray(patch, dtype=np.float32)
        alpha = rng.uniform(0.7, 1.0)
        val = (1 - alpha) * xf + alpha * patch
    elif kind == "scratch":
        val = xf + rng.choice([-1.0, 1.0]) * rng.uniform(60, 120)
    else:
        f = rng.uniform(0.35, 0.65) if rng.random() < 0.5 else rng.uniform(1.4, 1.8)
        val = xf * f
    out = x.copy()
    out[m] = np.clip(np.rint(val[m]), 0, 255).astype(np.uint8)
    same = m & (out == x)
    out[same] = np.where(x[same] < 128, x[same] + 40, x[same] - 40).astype(np.uint8)
    return out, m, {"kind": kind, "mask_shape": shape_name, "fraction": float(m.mean())}


def prepare_textures(
    out_dir: str | os.PathLike,
    categories: Sequence[str] = ("brick", "grass", "gravel"),
    seed: int = 0,
    size: int = 256,
    n_train: int = 60,
    n_test_good: int = 30,
    n_test_defect: int = 30,
    crop_size: int | None = None,
    defect_source_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> dict[str, Path]:
    """Write MVTec-format texture categories from scikit-image's bundled 512x512 textures, with exact test masks.

    Per category ``c`` (a ``skimage.data`` image: brick, grass, gravel are 512x512 CC0 gray textures):

    * normal images are random ``crop_size`` crops with random horizontal/vertical flips (no rotation, so the
      texture keeps its orientation, like an MVTec category), resized bilinearly to ``size`` x ``size``;
    * ``train/good`` crops come only from the **top half** of the texture (rows 0 .. H/2-1), ``test/good`` and the
      base images of ``test/defect`` only from the **bottom half** (rows H/2 .. H-1), so no test pixel was seen in
      training;
    * ``test/defect/<k>.png`` carries one defect from :func:`make_test_defect` (ellipses/scratches/blobs; foreign
      material from :data:`TEST_DEFECT_SOURCE_IMAGES` or from ``defect_source_dir``, never the training sources
      of ``training.synth``) and ``ground_truth/defect/<k>_mask.png`` (0/255) is exactly where the image changed.

    Images are 8-bit grayscale PNGs. Randomness: ``numpy.random.default_rng([seed, crc32(c)])`` per category, so a
    category's content does not depend on the other categories listed. ``<out_dir>/<c>/dataset.json`` records
    counts, seed, sizes, regions, sources and the defect kind of each test image.

    Args:
        out_dir: parent folder; categories go to ``out_dir/<c>``.
        categories: ``skimage.data`` names (any bundled image works; RGB ones are converted to gray).
        seed: base seed.
        size: output image size (square).
        n_train, n_test_good, n_test_defect: image counts per category (defaults sized for a 2-core CPU demo).
        crop_size: crop side in texture pixels before resizing; default ``min(size, 192)``; at most H/2 and W.
        defect_source_dir: optional folder of images (e.g. Debian krita-data patterns) to use as foreign material
            instead of the bundled test sources.
        overwrite: replace existing non-empty category folders.

    Returns:
        ``{category: category folder}``.

    Raises:
        UsageError: unknown image, bad sizes or counts, or a category folder is not empty and ``overwrite`` is
        False. PathNotFoundError: ``defect_source_dir`` has no images.
    """
    if int(size) < 8:
        raise UsageError(f"size must be >= 8, got {size}")
    for k, v in (("n_train", n_train), ("n_test_good", n_test_good), ("n_test_defect", n_test_defect)):
        if int(v) < 0:
            raise UsageError(f"{k} must be >= 0, got {v}")
    size = int(size)
    crop = int(crop_size) if crop_size is not None else min(size, 192)

    if defect_source_dir is not None:
        paths = _list_images_recursive(Path(defect_source_dir))
        if not paths:
            raise PathNotFoundError(f"no images in defect_source_dir {defect_source_dir}")
        sources = [_load_gray(p) for p in paths]
        source_desc = f"images under {defect_source_dir} ({len(paths)})"
    else:
        sources = [_skimage_gray(n) for n in TEST_DEFECT_SOURCE_IMAGES]
        source_desc = "skimage.data: " + ", ".join(TEST_DEFECT_SOURCE_IMAGES)

    result: dict[str, Path] = {}
    for cat in categories:
        tex = _skimage_gray(cat)
        th, tw = tex.shape
        half = th // 2
        if crop > half or crop > tw or crop < 1:
            raise UsageError(f"crop_size {crop} does not fit the {th}x{tw} texture {cat!r} (max {min(half, tw)})")
        regions = {"train": (0, half), "test": (half, th)}
        rng = np.random.default_rng([int(seed), zlib.crc32(cat.encode())])

        def sample(region: str) -> tuple[np.ndarray, dict]:
            r0, r1 = regions[region]
            y0 = int(rng.integers(r0, r1 - crop + 1))
            x0 = int(rng.integers(0, tw - crop + 1))
            a = tex[y0 : y0 + crop, x0 : x0 + crop]
            fh, fv = bool(rng.random() < 0.5), bool(rng.random() < 0.5)
            if fh:
                a = a[:, ::-1]
            if fv:
                a = a[::-1, :]
            a = np.ascontiguousarray(a)
            if crop != size:
                a = np.asarray(Image.fromarray(a).resize((size, size), Image.BILINEAR))
            return a, {"y0": y0, "x0": x0, "flip_h": fh, "flip_v": fv}

        out = Path(out_dir) / cat
        _prepare_out(out, overwrite)
        for sub in ("train/good", "test/good", "test/defect", "ground_truth/defect"):
            (out / sub).mkdir(parents=True, exist_ok=True)
        records: dict[str, list[dict]] = {"train/good": [], "test/good": [], "test/defect": []}
        for k in range(int(n_train)):
            a, info = sample("train")
            Image.fromarray(a).save(out / "train/good" / f"{k:03d}.png")
            records["train/good"].append({"file": f"{k:03d}.png", **info})
        for k in range(int(n_test_good)):
            a, info = sample("test")
            Image.fromarray(a).save(out / "test/good" / f"{k:03d}.png")
            records["test/good"].append({"file": f"{k:03d}.png", **info})
        for k in range(int(n_test_defect)):
            a, info = sample("test")
            d, m, dinfo = make_test_defect(a, rng, sources)
            Image.fromarray(d).save(out / "test/defect" / f"{k:03d}.png")
            Image.fromarray((m * 255).astype(np.uint8)).save(out / "ground_truth/defect" / f"{k:03d}_mask.png")
            records["test/defect"].append({"file": f"{k:03d}.png", **info, **dinfo})
        meta = {
            "name": cat,
            "source": f"skimage.data.{cat}() ({th}x{tw}, bundled with scikit-image, no download)",
            "seed": int(seed),
            "size": size,
            "crop_size": crop,
            "regions": {k: f"rows {r0}..{r1 - 1}" for k, (r0, r1) in regions.items()},
            "augmentation": "random crop, random horizontal/vertical flips, bilinear resize",
            "defect_generator": "training.data.make_test_defect "
            "(ellipse/scratch/blob masks; foreign/scratch/stain content)",
            "defect_sources": source_desc,
            "pixel_masks": True,
            "counts": {k: len(v) for k, v in records.items()},
            "files": records,
        }
        (out / "dataset.json").write_text(json.dumps(meta, indent=1))
        result[cat] = out
    return result


def _list_images_recursive(d: Path) -> list[Path]:
    if not d.is_dir():
        return []
    return sorted(p for p in d.rglob("*") if _is_image(p))
