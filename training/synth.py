"""Synthetic anomalies for GLAD's Anomaly-oriented Training Paradigm (ATP).

Re-implements the DRAEM/MemSeg-style synthesis that the official GLAD code uses (spec section 4.2,
``dataset/dataset.py`` and ``dataset/perlin_noise.py`` of hyao1/GLAD) with numpy, scipy, scikit-image and
albumentations instead of imgaug and torch:

1. a Perlin-noise mask (scales 2^k, k in 0..5 per axis, rotated in (-90, 90) degrees, binarised at 0.3),
   restricted to the foreground (Otsu modes 1/2/3);
2. an anomaly source: a texture image (probability 0.5) or the image itself cut into an 8x8 grid of permuted
   tiles (structure mode), passed through 3 distinct augmenters drawn from a pool of 10;
3. a blend ``x_aug = x*(1-m) + (1-beta)*src*m + beta*x*m`` with ``beta ~ U(0, 0.8)``, cast to uint8;
4. with probability 0.5 the unmodified image and a zero mask are returned instead.

No torch here: the training loop converts the uint8 arrays itself.

The texture sources used for *training* (:data:`TRAIN_SOURCE_IMAGES`, written by :func:`texture_sources`) are
disjoint from the scikit-image images used to make the *test* defects in :mod:`training.data`
(``training.data.TEST_DEFECT_SOURCE_IMAGES``), so generated test sets are not the training distribution.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image
from scipy import ndimage

from glad_runtime.core.scoring import otsu_foreground as foreground_mask  # spec 4.2 step 5 (one Otsu rule)
from glad_runtime.core.images import IMAGE_EXTENSIONS
from glad_runtime.errors import InvalidInputError, PathNotFoundError, UsageError

# albumentations 2 checks PyPI for a newer version at import time; this project runs offline.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
import albumentations as A  # noqa: E402

__all__ = [
    "IMAGE_EXTENSIONS",
    "TRAIN_SOURCE_IMAGES",
    "AUGMENTER_NAMES",
    "perlin_noise_2d",
    "perlin_mask",
    "foreground_mask",
    "build_augmenter",
    "structure_source",
    "AnomalySynthesizer",
    "texture_sources",
]


#: scikit-image bundled images (all load offline) used as *training* texture anomaly sources.
#: The test-defect generator in ``training.data`` uses a disjoint set (astronaut, rocket, coins, moon, ...).
TRAIN_SOURCE_IMAGES = (
    "brick",
    "grass",
    "gravel",
    "camera",
    "coffee",
    "chelsea",
    "immunohistochemistry",
    "hubble_deep_field",
)


def _fade(t: np.ndarray) -> np.ndarray:
    """Perlin's quintic fade curve 6t^5 - 15t^4 + 10t^3."""
    return t * t * t * (t * (t * 6.0 - 15.0) + 10.0)


def _as_hw(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, (int, np.integer)):
        h = w = int(size)
    else:
        if len(size) != 2:
            raise UsageError(f"size must be an int or (H, W), got {size!r}")
        h, w = int(size[0]), int(size[1])
    if h < 1 or w < 1:
        raise UsageError(f"size must be positive, got {(h, w)}")
    return h, w


def perlin_noise_2d(shape: Sequence[int], res: Sequence[int], rng: np.random.Generator) -> np.ndarray:
    """2-D Perlin gradient noise (the DRAEM/GLAD ``rand_perlin_2d_np``, spec 4.2 step 4).

    A lattice of ``(res[0]+1) x (res[1]+1)`` random unit gradients (angles ~ U(0, 2*pi)) is interpolated with the
    fade curve 6t^5 - 15t^4 + 10t^3 and scaled by sqrt(2). Unlike the original, ``shape`` need not be a multiple
    of ``res``.

    Args:
        shape: output (H, W).
        res: number of noise periods (lattice cells) along (H, W), each >= 1.
        rng: numpy Generator (the only source of randomness).

    Returns:
        float64 array [H, W], values roughly in [-1, 1] (exactly 0 at lattice points).
    """
    h, w = _as_hw(shape)
    ry, rx = int(res[0]), int(res[1])
    if ry < 1 or rx < 1:
        raise UsageError(f"res must be >= 1 per axis, got {tuple(res)}")
    angles = 2.0 * np.pi * rng.random((ry + 1, rx + 1))
    grad = np.stack((np.cos(angles), np.sin(angles)), axis=-1)  # [ry+1, rx+1, 2]

    y = np.arange(h) * (ry / h)
    x = np.arange(w) * (rx / w)
    iy = np.floor(y).astype(np.int64)
    ix = np.floor(x).astype(np.int64)
    fy = (y - iy)[:, None]  # [H, 1]
    fx = (x - ix)[None, :]  # [1, W]

    def dot(cy: int, cx: int) -> np.ndarray:
        g = grad[iy[:, None] + cy, ix[None, :] + cx]  # [H, W, 2]
        return g[..., 0] * (fy - cy) + g[..., 1] * (fx - cx)

    n00, n10, n01, n11 = dot(0, 0), dot(1, 0), dot(0, 1), dot(1, 1)
    ty, tx = _fade(fy), _fade(fx)
    n0 = n00 + ty * (n10 - n00)
    n1 = n01 + ty * (n11 - n01)
    return np.sqrt(2.0) * (n0 + tx * (n1 - n0))


def perlin_mask(
    size: int | Sequence[int],
    rng: np.random.Generator,
    threshold: float = 0.3,
    rotate: bool = True,
    max_scale_exp: int = 5,
) -> np.ndarray:
    """Binary Perlin-noise anomaly mask (spec 4.2 step 4).

    Per axis the noise scale is 2^k with k ~ randint(0, max_scale_exp) inclusive (official: 0..5, i.e. 1..32
    periods); the noise is rotated by an angle ~ U(-90, 90) degrees about the centre (bilinear, zero fill, as
    imgaug's ``Affine(rotate=(-90, 90))``) and binarised: 1 where noise > ``threshold``.

    Args:
        size: mask size, int or (H, W).
        rng: numpy Generator.
        threshold: binarisation threshold on the noise (official 0.3).
        rotate: apply the random rotation.
        max_scale_exp: largest exponent k (official 5).

    Returns:
        float32 array [H, W] with values in {0, 1}. It can be empty (all zeros) for unlucky draws, as upstream.
    """
    h, w = _as_hw(size)
    ky, kx = rng.integers(0, max_scale_exp + 1, size=2)
    noise = perlin_noise_2d((h, w), (2**int(ky), 2**int(kx)), rng)
    if rotate:
        angle = float(rng.uniform(-90.0, 90.0))
        noise = ndimage.rotate(noise, angle, reshape=False, order=1, mode="constant", cval=0.0)
    return (noise > threshold).astype(np.float32)


def _augmenter_pool() -> list[A.BasicTransform]:
    """The 10 augmenters of spec 4.2 step 2 (imgaug in the original), rebuilt with albumentations.

    Equivalences (approximate where noted):
      0 GammaContrast((0.5, 2.0))            -> RandomGamma(gamma_limit=(50, 200)) (not per channel)
      1 MultiplyAndAddToBrightness(0.8-1.2, +-30) -> MultiplicativeNoise(0.8-1.2) then brightness +-30/255
      2 pillike.EnhanceSharpness()           -> Sharpen(alpha=(0, 1), lightness=1)
      3 AddToHueAndSaturation((-50, 50))     -> HueSaturationValue(hue +-35 OpenCV units ~ +-70 deg, sat +-50)
      4 Solarize(0.5, threshold=(32, 128))   -> Solarize(threshold 32..128 of 255, p=0.5)
      5 Posterize()                          -> Posterize(num_bits=(1, 8))
      6 Invert()                             -> InvertImg()
      7 pillike.Autocontrast()               -> AutoContrast(method="pil", cutoff one of 0, 2, 5, 10, 20 %)
      8 pillike.Equalize()                   -> Equalize(mode="pil")
      9 Affine(rotate=(-45, 45))             -> Affine(rotate=(-45, 45)), zero fill
    """
    return [
        A.RandomGamma(gamma_limit=(50, 200), p=1.0),
        A.Sequential(
            [
                A.MultiplicativeNoise(multiplier=(0.8, 1.2), p=1.0),
                A.RandomBrightnessContrast(
                    brightness_limit=(-30 / 255, 30 / 255), contrast_limit=(0.0, 0.0), p=1.0
                ),
            ],
            p=1.0,
        ),
        A.Sharpen(alpha=(0.0, 1.0), lightness=(1.0, 1.0), p=1.0),
        A.HueSaturationValue(hue_shift_limit=(-35, 35), sat_shift_limit=(-50, 50), val_shift_limit=(0, 0), p=1.0),
        A.Solarize(threshold_range=(32 / 255, 128 / 255), p=0.5),
        A.Posterize(num_bits=(1, 8), p=1.0),
        A.InvertImg(p=1.0),
        A.OneOf([A.AutoContrast(cutoff=c, method="pil", p=1.0) for c in (0, 2, 5, 10, 20)], p=1.0),
        A.Equalize(mode="pil", by_channels=True, p=1.0),
        A.Affine(rotate=(-45, 45), border_mode=0, fill=0, p=1.0),
    ]


#: Names of the pool entries, in pool order (for logging and tests).
AUGMENTER_NAMES = (
    "gamma",
    "brightness",
    "sharpness",
    "hue_saturation",
    "solarize",
    "posterize",
    "invert",
    "autocontrast",
    "equalize",
    "rotate",
)


def build_augmenter(rng: np.random.Generator, n: int = 3) -> tuple[Callable[[np.ndarray], np.ndarray], tuple[str, ...]]:
    """Draw ``n`` distinct augmenters from the pool of 10 and compose them (spec 4.2 step 2).

    The albumentations ``Compose`` is seeded from ``rng``, so the result is a deterministic function of the
    generator state.

    Args:
        rng: numpy Generator.
        n: number of distinct augmenters (official 3).

    Returns:
        (augment, names): ``augment(uint8 [H, W, 3]) -> uint8 [H, W, 3]`` and the names of the chosen augmenters
        in application order.
    """
    pool = _augmenter_pool()
    idx = rng.choice(len(pool), size=n, replace=False)
    compose = A.Compose([pool[int(i)] for i in idx], seed=int(rng.integers(0, 2**31 - 1)))

    def augment(img: np.ndarray) -> np.ndarray:
        out = compose(image=np.ascontiguousarray(img))["image"]
        return np.asarray(out, dtype=np.uint8)

    return augment, tuple(AUGMENTER_NAMES[int(i)] for i in idx)


def structure_source(img: np.ndarray, rng: np.random.Generator, grid: int = 8) -> np.ndarray:
    """MemSeg-style structure anomaly source: ``grid x grid`` tiles of ``img``, randomly permuted (spec 4.2 step 3).

    Tiles are ``H//grid x W//grid``. When H or W is not a multiple of ``grid`` the leftover bottom/right strips
    are kept in place.

    Args:
        img: uint8 [H, W, C] (or [H, W]).
        rng: numpy Generator.
        grid: tiles per axis (official 8).

    Returns:
        Array of the same shape and dtype as ``img``.
    """
    h, w = img.shape[:2]
    th, tw = h // grid, w // grid
    if th == 0 or tw == 0:
        raise InvalidInputError(f"image {h}x{w} is too small for a {grid}x{grid} tile grid")
    out = img.copy()
    core = img[: th * grid, : tw * grid]
    tiles = core.reshape(grid, th, grid, tw, *img.shape[2:]).swapaxes(1, 2).reshape(grid * grid, th, tw, *img.shape[2:])
    tiles = tiles[rng.permutation(grid * grid)]
    out[: th * grid, : tw * grid] = (
        tiles.reshape(grid, grid, th, tw, *img.shape[2:]).swapaxes(1, 2).reshape(th * grid, tw * grid, *img.shape[2:])
    )
    return out


def _to_rgb_uint8(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img)
    if a.dtype == bool:
        a = a.astype(np.uint8) * 255
    if a.dtype != np.uint8:
        if np.issubdtype(a.dtype, np.floating) and a.size and float(np.nanmax(a)) <= 1.0:
            a = a * 255.0
        a = np.clip(a, 0, 255).astype(np.uint8)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    elif a.ndim == 3 and a.shape[-1] == 4:
        a = a[..., :3]
    if a.ndim != 3 or a.shape[-1] != 3:
        raise InvalidInputError(f"expected an image [H, W], [H, W, 1], [H, W, 3] or [H, W, 4], got shape {a.shape}")
    return np.ascontiguousarray(a)


def _resize_rgb(img: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    if img.shape[:2] == hw:
        return img
    return np.asarray(Image.fromarray(img).resize((hw[1], hw[0]), Image.BILINEAR))


class AnomalySynthesizer:
    """GLAD/DRAEM synthetic-anomaly generator (spec 4.2), numpy/albumentations only.

    Args:
        size: expected image size, int or (H, W). Masks are generated at this size, texture sources are resized
            (bilinear) to it, and input images must have it.
        source_dir: folder searched recursively for texture anomaly sources (any of :data:`IMAGE_EXTENSIONS`,
            e.g. the DTD ``images/`` folder or the output of :func:`texture_sources`). Images are read on demand.
        source_images: texture sources given as arrays ([H, W], [H, W, 3] or [H, W, 4], uint8); combined with
            ``source_dir``.
        foreground_mode: 1, 2 or 3, see :func:`foreground_mask` (spec 4.2 step 5 lists the mode per class).
        seed: seed of the internal generator used when ``__call__`` gets no ``rng``.
        anomaly_prob: probability of returning an anomalous sample (official 0.5).
        texture_prob: probability of texture mode versus structure mode (official 0.5). If there are no texture
            sources, texture mode falls back to structure mode, i.e. every anomaly is a structure anomaly.
        beta_max: blend factor beta ~ U(0, beta_max) (official 0.8).
        threshold: Perlin binarisation threshold (official 0.3).

    Calling it with ``(image_uint8 [H, W, 3], rng)`` returns ``(aug_uint8 [H, W, 3], mask_float32 [H, W])``, mask
    values in {0, 1}. With probability ``1 - anomaly_prob`` the output is an unmodified copy and a zero mask. An
    anomalous draw can still have an empty mask when the Perlin mask misses the foreground (as upstream). The
    last draw's details (mode, augmenters, beta) are in ``self.last_info``.

    Determinism: every random choice comes from the numpy generator (albumentations is seeded from it), so the
    same generator state gives the same output.
    """

    def __init__(
        self,
        size: int | Sequence[int],
        source_dir: str | os.PathLike | None = None,
        source_images: Sequence[np.ndarray] | None = None,
        foreground_mode: int = 3,
        seed: int = 0,
        anomaly_prob: float = 0.5,
        texture_prob: float = 0.5,
        beta_max: float = 0.8,
        threshold: float = 0.3,
    ) -> None:
        self.size = _as_hw(size)
        if foreground_mode not in (1, 2, 3):
            raise UsageError(f"foreground_mode must be 1, 2 or 3, got {foreground_mode!r}")
        self.foreground_mode = foreground_mode
        self.anomaly_prob = float(anomaly_prob)
        self.texture_prob = float(texture_prob)
        self.beta_max = float(beta_max)
        self.threshold = float(threshold)
        self.rng = np.random.default_rng(seed)
        self.source_paths: list[Path] = []
        if source_dir is not None:
            d = Path(source_dir)
            if not d.is_dir():
                raise PathNotFoundError(f"anomaly source folder not found: {d}")
            self.source_paths = sorted(p for p in d.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            if not self.source_paths:
                raise PathNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under anomaly source folder {d}")
        self.source_arrays: list[np.ndarray] = [_resize_rgb(_to_rgb_uint8(a), self.size) for a in (source_images or [])]
        self.last_info: dict = {}

    @property
    def num_sources(self) -> int:
        """Number of texture anomaly sources available (0 means structure mode only)."""
        return len(self.source_paths) + len(self.source_arrays)

    def _texture(self, rng: np.random.Generator) -> tuple[np.ndarray, str]:
        k = int(rng.integers(0, self.num_sources))
        if k < len(self.source_arrays):
            return self.source_arrays[k], f"array[{k}]"
        path = self.source_paths[k - len(self.source_arrays)]
        with Image.open(path) as im:
            src = np.asarray(im.convert("RGB"))
        return _resize_rgb(src, self.size), str(path)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Synthesise one training pair.

        Args:
            image: normal image, uint8 [H, W, 3] ([H, W] grayscale is replicated to RGB, as ``convert("RGB")``),
                with (H, W) == ``self.size``.
            rng: numpy Generator; defaults to the synthesizer's own generator (seeded by ``seed``).

        Returns:
            (aug, mask): uint8 [H, W, 3] and float32 [H, W] in {0, 1}.
        """
        rng = self.rng if rng is None else rng
        x = _to_rgb_uint8(image)
        if x.shape[:2] != self.size:
            raise InvalidInputError(f"image is {x.shape[:2]}, synthesizer was built for size {self.size}")
        h, w = self.size
        if not rng.random() < self.anomaly_prob:
            self.last_info = {"anomaly": False}
            return x.copy(), np.zeros((h, w), np.float32)

        augment, names = build_augmenter(rng)
        use_texture = self.num_sources > 0 and rng.random() < self.texture_prob
        if use_texture:
            src, src_name = self._texture(rng)
            src = augment(src)
        else:
            src_name = "structure"
            src = structure_source(augment(x), rng)

        m = perlin_mask((h, w), rng, threshold=self.threshold)
        if self.foreground_mode != 3:
            gray = np.asarray(Image.fromarray(x).convert("L"))
            m = m * foreground_mask(gray, self.foreground_mode)
        beta = float(rng.uniform(0.0, self.beta_max))
        xf = x.astype(np.float32)
        m3 = m[..., None]
        aug = xf * (1.0 - m3) + (1.0 - beta) * src.astype(np.float32) * m3 + beta * xf * m3
        aug = np.clip(aug, 0, 255).astype(np.uint8)  # cast truncates, as upstream
        self.last_info = {
            "anomaly": True,
            "mode": "texture" if use_texture else "structure",
            "source": src_name,
            "augmenters": names,
            "beta": beta,
            "mask_fraction": float(m.mean()),
        }
        return aug, m.astype(np.float32)


def skimage_image(name: str) -> np.ndarray:
    """A scikit-image bundled image as uint8: ``[H, W]`` gray or ``[H, W, 3]`` RGB (alpha dropped, bool -> 0/255).

    Raises:
        UsageError: ``skimage.data`` has no such image. An image that needs a download raises scikit-image's error.
    """
    import skimage.data as skdata

    fn = getattr(skdata, name, None)
    if fn is None or not callable(fn):
        raise UsageError(f"skimage.data has no image {name!r}")
    img = np.asarray(fn())
    if img.dtype == bool:
        img = img.astype(np.uint8) * 255
    if img.ndim == 3 and img.shape[-1] == 4:
        img = img[..., :3]
    return img.astype(np.uint8)


def texture_sources(
    out_dir: str | os.PathLike,
    names: Sequence[str] = TRAIN_SOURCE_IMAGES,
    quadrants: bool = True,
) -> list[Path]:
    """Write texture anomaly source images for training from scikit-image's bundled images.

    Default images (all bundled with scikit-image, no download): brick, grass, gravel, camera, coffee, chelsea,
    immunohistochemistry, hubble_deep_field. They are disjoint from the sources of the test defects made by
    ``training.data.prepare_textures`` (astronaut, rocket, coins, moon, retina, clock, cell), so a model is never
    trained on the anomaly sources it is tested on. Note that brick/grass/gravel are also the normal images of
    the demo texture categories: pasting them (augmented) onto another category plays the role of DTD.

    Args:
        out_dir: output folder (created).
        names: ``skimage.data`` function names.
        quadrants: also write the four quadrant crops of each image (more texture-like sources).

    Returns:
        Sorted list of written PNG paths (``<name>.png`` and ``<name>_q<k>.png``); 5 per image by default.

    Raises:
        UsageError: unknown image name. An image that would need a download raises the scikit-image error.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for name in names:
        img = skimage_image(name)
        crops = {name: img}
        if quadrants:
            h2, w2 = img.shape[0] // 2, img.shape[1] // 2
            for k, (r, c) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
                crops[f"{name}_q{k}"] = img[r * h2 : (r + 1) * h2, c * w2 : (c + 1) * w2]
        for stem, arr in crops.items():
            p = out / f"{stem}.png"
            Image.fromarray(np.ascontiguousarray(arr)).save(p)
            written.append(p)
    return sorted(written)
