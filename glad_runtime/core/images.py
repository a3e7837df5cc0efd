"""Image I/O as production lines send it: decode, orient, convert, resize; and maps back at the original size.

Conversion rules (documented in the README):

* EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``); "original size" means the upright size.
* 8-bit grayscale ``L`` -> value / 255, replicated to 3 channels (the official ``convert("RGB")``).
* 16-bit grayscale (``I;16*``, or ``I`` with values <= 65535) -> value / 65535, replicated; full precision is kept
  through the resize (no 8-bit round trip).
* ``RGB`` -> / 255. ``RGBA`` / ``LA`` / palette with transparency -> composited onto black (transparent pixels
  are background), then RGB. Palette, ``CMYK``, ``YCbCr``, 1-bit -> Pillow's RGB conversion.
* 32-bit float ``F`` images and anything else are refused with :class:`UnsupportedImageError`.
* Then the one :class:`Preprocessor` (built from the config): resize to ``resolution x resolution`` (bilinear,
  antialiased as Pillow does for torchvision's PIL ``Resize``; the aspect ratio is not kept, as in the official
  code), then ``x * 2 - 1`` -> [-1, 1]. 8-bit sources are resized as the 8-bit RGB image and then divided by 255,
  exactly the official ``Resize`` -> ``ToTensor`` order (the resize rounds to 8-bit levels); 16-bit sources are
  resized as float channels (no 8-bit round trip).
* Multi-class presets (``load_resolution``): the image is first prepared at ``load_resolution`` (256) as above, then
  upsampled bilinearly with ``align_corners=True`` to ``resolution`` (512), as the official ``main_multi.py``. The
  scoring stage works on the load-size image again, recovered exactly from this one
  (:meth:`Preprocessor.scoring_images`, issue 30).
"""

from __future__ import annotations

import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from glad_runtime.errors import (ImageLoadError, ImageTooLargeError, InvalidInputError, PathNotFoundError,
                                 UnsupportedImageError, UsageError)  # noqa: F401 (re-exported)

__all__ = ["ImageLoadError", "UnsupportedImageError", "ImageTooLargeError", "LoadedImage", "load_image",
           "check_pixels", "to_pixels", "to_unit_rgb", "to_rgb_pixels", "Preprocessor", "RESAMPLE_FILTERS", "preprocess",
           "IMAGE_EXTENSIONS"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


#: Pillow's own decompression-bomb check is replaced by the toolkit's pixel limit (``max_image_pixels``, checked
#: from the header in :func:`load_image`, with a typed error); Pillow's would raise an untyped error at 179 MP and
#: warn from 89 MP whatever the bundle allows.
Image.MAX_IMAGE_PIXELS = None


@dataclass
class LoadedImage:
    """An image decoded at its upright original size, in its most compact exact form.

    Attributes:
        pixels: uint8 ``[H, W, 3]`` for 8-bit colour sources (``RGB``, palette, alpha composited onto black ...),
            uint8 ``[H, W]`` for 8-bit grayscale (``L``), float32 ``[H, W]`` in [0, 1] for 16-bit grayscale; a
            grayscale image is one channel replicated to RGB wherever RGB is needed (:attr:`rgb`, :class:`Preprocessor`
            gives the same result as for its 3-channel form), so an 81 MP grey file holds 81 MB, not 243 MB.
            None once released (the served models keep only the size and mode after preprocessing).
        original_size: ``(H, W)`` after EXIF orientation.
        mode: the Pillow mode of the file (``L``, ``I;16``, ``RGBA``, ``P`` ...).
        source: the path or a label.
    """

    pixels: np.ndarray | None
    original_size: tuple[int, int]
    mode: str
    source: str

    @property
    def rgb(self) -> np.ndarray:
        """float32 ``[H, W, 3]`` in [0, 1] at the original size (8-bit pixels / 255; 12 bytes per pixel: for
        pictures of large images use :meth:`display_rgb`)."""
        return _expand_rgb(self.pixels.astype(np.float32) / np.float32(255.0) if self.pixels.dtype == np.uint8
                           else self.pixels)

    def display_rgb(self, max_side: int) -> tuple[np.ndarray, float]:
        """``(float32 [h, w, 3] in [0, 1], factor)``: the image for a picture, shrunk (Pillow bilinear) so its
        longer side is at most ``max_side``; ``factor`` = h / H (1.0 when no shrink was needed)."""
        h, w = self.original_size
        f = min(1.0, float(max_side) / max(h, w))
        if f >= 1.0:
            return self.rgb, 1.0
        size = (max(1, round(w * f)), max(1, round(h * f)))
        px = self.pixels
        if px.dtype == np.uint8:
            small = np.asarray(Image.fromarray(px).resize(size, Image.BILINEAR), np.float32) / np.float32(255.0)
        else:
            small = np.asarray(Image.fromarray(np.ascontiguousarray(px, np.float32)).resize(size, Image.BILINEAR))
        return _expand_rgb(small), size[1] / h

    def released(self) -> "LoadedImage":
        """The same record without its pixels (size, mode and source kept)."""
        return LoadedImage(None, self.original_size, self.mode, self.source)


def _expand_rgb(px: np.ndarray) -> np.ndarray:
    return np.repeat(px[..., None], 3, axis=2) if px.ndim == 2 else px


def to_pixels(img: Image.Image) -> np.ndarray:
    """A decoded, upright Pillow image in its compact exact form (rules in the module doc): uint8 ``[H, W, 3]``
    for 8-bit colour, uint8 ``[H, W]`` for 8-bit grayscale, float32 ``[H, W]`` in [0, 1] for 16-bit grayscale.
    At most one full-size copy beyond Pillow's buffer is made (16-bit: the float conversion, divided in place).

    Raises:
        UnsupportedImageError: unsupported mode or out-of-range 32-bit integer data.
    """
    mode = img.mode
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(img).astype(np.float32)
        if mode == "I" and (arr.min() < 0 or arr.max() > 65535):
            raise UnsupportedImageError(f"32-bit integer image with values outside [0, 65535] (mode {mode})")
        return np.divide(arr, np.float32(65535.0), out=arr)
    if mode == "L":
        return np.asarray(img, dtype=np.uint8)
    if mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
        mode = img.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        img = Image.alpha_composite(black, rgba).convert("RGB")
    elif mode in ("CMYK", "YCbCr", "1", "HSV", "LAB"):
        img = img.convert("RGB")
    elif mode != "RGB":
        raise UnsupportedImageError(f"unsupported image mode {mode!r} (supported: L, I;16, RGB, RGBA, LA, P, "
                                    "CMYK, YCbCr, 1)")
    return np.asarray(img, dtype=np.uint8)


def to_rgb_pixels(img: Image.Image) -> np.ndarray:
    """:func:`to_pixels` with grayscale replicated to 3 channels: uint8 ``[H, W, 3]`` for 8-bit sources, float32
    ``[H, W, 3]`` in [0, 1] for 16-bit grayscale.

    Raises:
        UnsupportedImageError: unsupported mode or out-of-range 32-bit integer data.
    """
    return _expand_rgb(to_pixels(img))


def to_unit_rgb(img: Image.Image) -> np.ndarray:
    """float32 ``[H, W, 3]`` in [0, 1] of a decoded, upright Pillow image (:func:`to_rgb_pixels` scaled)."""
    px = to_rgb_pixels(img)
    return px.astype(np.float32) / 255.0 if px.dtype == np.uint8 else px


def check_pixels(size: tuple[int, int], max_pixels: int | None, label: str) -> None:
    """Refuse an image whose declared ``size`` ``(W, H)`` exceeds ``max_pixels`` (None: no limit).

    Raises:
        ImageTooLargeError: naming the size, the megapixels and the limit (never a server path: ``label`` is what
            the caller named the image).
    """
    w, h = int(size[0]), int(size[1])
    if max_pixels is not None and w * h > int(max_pixels):
        raise ImageTooLargeError(f"{label}: {w}x{h} = {w * h:,} pixels exceeds the limit of {int(max_pixels):,} "
                                 "pixels per image (max_image_pixels); refused before decoding", pixels=w * h,
                                 limit=int(max_pixels))


def load_image(source: str | os.PathLike | bytes, max_pixels: int | None = None,
               label: str | None = None) -> LoadedImage:
    """Read and convert one image file (or encoded bytes).

    The header is read first: an image declaring more than ``max_pixels`` (width x height) is refused before
    anything is decoded, so a decompression bomb (a small file declaring a huge image) costs nothing.

    Args:
        source: a path, or the encoded bytes of a file.
        max_pixels: the pixel limit (``GladConfig.max_image_pixels``); None: no limit.
        label: how errors name the image (default: the path, or ``<bytes>``).
    Returns:
        :class:`LoadedImage` at its upright original size (:func:`to_pixels`).
    Raises:
        ImageTooLargeError: over ``max_pixels``.
        ImageLoadError: missing, unreadable, truncated or non-image data (the message names the file).
        UnsupportedImageError: an unsupported pixel format.
    """
    if label is None:
        label = "<bytes>" if isinstance(source, (bytes, bytearray, memoryview)) else str(source)
    try:
        fp = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else open(source, "rb")
    except OSError as e:
        raise ImageLoadError(f"{label}: cannot open ({e.strerror or e})") from e
    try:
        with fp, Image.open(fp) as img:
            check_pixels(img.size, max_pixels, label)
            img.load()  # force full decode: truncated files fail here, not later
            upright = ImageOps.exif_transpose(img, in_place=True) or img
            mode = img.mode
            pixels = to_pixels(upright)
    except ImageTooLargeError:
        raise
    except UnsupportedImageError as e:
        raise UnsupportedImageError(f"{label}: {e}") from e
    except UnidentifiedImageError as e:
        raise ImageLoadError(f"{label}: not a readable image (unknown or corrupt image format)") from e
    except Exception as e:  # any decoder failure on these bytes (hostile input raises all kinds) is this image's
        raise ImageLoadError(f"{label}: not a readable image ({type(e).__name__}: {e})") from e
    return LoadedImage(pixels=pixels, original_size=(pixels.shape[0], pixels.shape[1]), mode=mode, source=label)


#: The Pillow filters a :class:`Preprocessor` may resize with, by name.
RESAMPLE_FILTERS = {"nearest": Image.NEAREST, "box": Image.BOX, "bilinear": Image.BILINEAR,
                    "hamming": Image.HAMMING, "bicubic": Image.BICUBIC, "lanczos": Image.LANCZOS}


@dataclass(frozen=True)
class Preprocessor:
    """The one preprocessing of images, and its inverses: built from the config (:meth:`from_config`) by the
    runtime (``Detector``, the served models through ``glad_bls``, ``GladPipeline``), training, evaluation,
    calibration, export and the benchmarks alike, so a resize rule lives here and in the config only.

    Forward (spec section 6; ``main_multi.py`` L207-211 for ``load_resolution``), :meth:`__call__` =
    :meth:`to_tensor` of :meth:`resize`:

    1. :meth:`resize`: the decoded pixels to ``load_size x load_size`` with Pillow's ``resample`` filter
       (bilinear: antialiased when shrinking, what torchvision's ``Resize`` does to a PIL image; the aspect ratio is
       not kept, as in the official code). 8-bit pixels are resized as the 8-bit image (the result stays on 8-bit
       levels, the official ``Resize`` -> ``ToTensor`` order); float pixels in [0, 1] (16-bit sources) per channel
       as 32-bit float images, then clipped to [0, 1]; grayscale ``[H, W]`` once, not three times (Pillow filters
       each band alike, so the result equals that of the 3-channel form).
    2. :meth:`to_tensor`: ``x / 255 * 2 - 1`` (8-bit; bit-identical to ``ToTensor`` + ``Normalize(0.5, 0.5)``
       and to ``x / 127.5 - 1``) or ``x * 2 - 1`` (float), channels first, then, when ``load_size`` differs from
       ``resolution`` (multi-class presets), the bilinear ``align_corners=True`` upsample to ``resolution``
       (:func:`glad_runtime.core.scoring.resize_bilinear`, torch's ``F.interpolate`` to float rounding).

    Inverses: :meth:`scoring_images` (the load-size image recovered exactly from the upsampled one, what the
    multi-class scoring stage compares with, issue 30) and :meth:`map_to_original` (an anomaly map at the working
    size back to the image's original size).

    Attributes:
        resolution: side of the square tensor the networks take (``GladConfig.resolution``).
        load_resolution: side the image is resized to before the upsample (``GladConfig.load_resolution``,
            multi-class presets: 256); None, or equal to ``resolution``: no upsample.
        resample: the Pillow filter of step 1, a key of :data:`RESAMPLE_FILTERS` (the official code: bilinear).
    Raises:
        UsageError: a non-positive side, ``load_resolution`` above ``resolution``, or an unknown filter (a
            programming error: configs are checked by ``GladConfig``).
    """

    resolution: int
    load_resolution: int | None = None
    resample: str = "bilinear"

    def __post_init__(self):
        if int(self.resolution) <= 0 or not (self.load_resolution is None
                                             or 0 < int(self.load_resolution) <= int(self.resolution)):
            raise UsageError(f"need resolution > 0 and load_resolution None or in (0, resolution], got "
                             f"{self.resolution}, {self.load_resolution}")
        if self.resample not in RESAMPLE_FILTERS:
            raise UsageError(f"unknown resample filter {self.resample!r} (one of {sorted(RESAMPLE_FILTERS)})")

    @classmethod
    def from_config(cls, config) -> "Preprocessor":
        """The preprocessing of a :class:`~glad_runtime.core.config.GladConfig` (``resolution``,
        ``load_resolution``)."""
        return cls(config.resolution, config.load_resolution)

    def with_resolution(self, resolution: int) -> "Preprocessor":
        """The same rule straight to another square side (no load size): e.g. the kNN baseline reading images at
        its feature resolution."""
        return dataclasses.replace(self, resolution=int(resolution), load_resolution=None)

    @property
    def load_size(self) -> int:
        """The side of step 1: ``load_resolution`` or ``resolution``."""
        return int(self.load_resolution or self.resolution)

    def resize(self, pixels: np.ndarray) -> np.ndarray:
        """Step 1: decoded pixels to ``load_size`` squared, in the same compact form.

        Args:
            pixels: uint8 ``[H, W, 3]`` or ``[H, W]``, or float ``[H, W, 3]`` or ``[H, W]`` in [0, 1]
                (:attr:`LoadedImage.pixels`, or any such array).
        Returns:
            uint8 ``[L, L, 3]`` / ``[L, L]`` for uint8 input, else float32 ``[L, L, 3]`` / ``[L, L]`` in [0, 1]
            (L = :attr:`load_size`).
        Raises:
            InvalidInputError: not an ``[H, W, 3]`` or ``[H, W]`` array.
        """
        if not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
            raise InvalidInputError(f"expected [H, W, 3] RGB or [H, W] grayscale, got {pixels.shape}")
        size, f = (self.load_size, self.load_size), RESAMPLE_FILTERS[self.resample]
        if pixels.dtype == np.uint8:
            img = Image.fromarray(np.ascontiguousarray(pixels), "RGB" if pixels.ndim == 3 else "L")
            return np.asarray(img.resize(size, f), dtype=np.uint8)
        channels = [pixels] if pixels.ndim == 2 else [pixels[..., k] for k in range(3)]
        out = [np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32)).resize(size, f))
               for c in channels]
        return (out[0] if pixels.ndim == 2 else np.stack(out, axis=-1)).clip(0.0, 1.0)

    def resize_rgb8(self, pixels: np.ndarray) -> np.ndarray:
        """Step 1 as uint8 ``[L, L, 3]`` (grayscale replicated, float sources rounded to 8-bit levels): the
        images training synthesises anomalies on (spec 4.2), :meth:`to_tensor` giving its tensors.

        Raises:
            InvalidInputError: as :meth:`resize`.
        """
        x = self.resize(pixels)
        return _expand_rgb(x if x.dtype == np.uint8 else np.round(x * 255.0).astype(np.uint8))

    def to_tensor(self, resized: np.ndarray) -> np.ndarray:
        """Step 2: resized pixels (:meth:`resize`, :meth:`resize_rgb8`) to the network input.

        Args:
            resized: uint8 ``[h, w, 3]`` / ``[h, w]``, or float in [0, 1] (clipped), normally at :attr:`load_size`.
        Returns:
            float32 ``[3, resolution, resolution]`` in [-1, 1].
        """
        x = np.asarray(resized, np.float32) / np.float32(255.0) if resized.dtype == np.uint8 \
            else np.clip(resized, 0.0, 1.0)
        x = x.transpose(2, 0, 1) if x.ndim == 3 else np.broadcast_to(x, (3,) + x.shape)
        x = (x * 2.0 - 1.0).astype(np.float32)
        if x.shape[1:] != (self.resolution, self.resolution):
            from glad_runtime.core.scoring import resize_bilinear

            x = resize_bilinear(x, (self.resolution, self.resolution))
        return x

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """:meth:`to_tensor` of :meth:`resize`: float32 ``[3, resolution, resolution]`` in [-1, 1].

        Raises:
            InvalidInputError: not an ``[H, W, 3]`` or ``[H, W]`` array.
        """
        return self.to_tensor(self.resize(pixels))

    def image(self, img: LoadedImage) -> np.ndarray:
        """The tensor of a decoded image (:func:`load_image`): ``glad detect``, the served models (files sent
        encoded), evaluation, calibration and training, so a result does not depend on who sent the image."""
        return self(img.pixels)

    def batches(self, paths: Sequence[str | os.PathLike], batch_size: int, max_pixels: int | None = None):
        """Yield float32 ``[B, 3, R, R]`` batches in [-1, 1] of image files (:func:`load_image` + :meth:`image`).

        Raises:
            ImageLoadError, ImageTooLargeError, UnsupportedImageError: a file that cannot be used.
        """
        paths = list(paths)
        for s in range(0, len(paths), batch_size):
            yield np.stack([self.image(load_image(p, max_pixels)) for p in paths[s:s + batch_size]])

    def scoring_images(self, images: np.ndarray) -> np.ndarray:
        """The input images the scoring stage compares with the reconstructions: the one place that decides.

        Multi-class presets score the **load-size** image: the official ``main_multi.test`` passes the 256-px
        dataset tensor itself to DINO, to the pixel term and to the foreground mask, and only the diffusion part
        sees the 512-px upsampled image (spec Appendix A, "Scoring input (multi-class)"; issue 30). The pipeline
        receives the upsampled image (what every client sends), so the load-size image is recovered from it exactly
        (:func:`glad_runtime.core.scoring.invert_upsample`, to 5e-8). Other presets score the images as they are.

        Args:
            images: float32 ``[B, 3, R, R]`` in [-1, 1] (R = :attr:`resolution`).
        Returns:
            float32 ``[B, 3, L, L]`` (L = :attr:`load_size`), or ``images`` itself when there is no upsample.
        """
        if not self.load_resolution or self.load_resolution == images.shape[-1]:
            return images
        from glad_runtime.core.scoring import invert_upsample

        return invert_upsample(images, self.load_size)

    @staticmethod
    def map_to_original(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        """An anomaly map ``[h, w]`` at the working size resized to the original ``(H, W)`` (Pillow bilinear on
        float32; the preprocessing keeps no crop or pad, so the inverse is a plain resize): what ``glad detect``
        writes and :meth:`Detection.map_at_original_size` returns. Returns float32 ``[H, W]``."""
        h, w = size
        if amap.shape == (h, w):
            return amap.astype(np.float32)
        return np.asarray(Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))
                          .resize((w, h), Image.BILINEAR), dtype=np.float32)


def preprocess(rgb: np.ndarray, resolution: int, load_resolution: int | None = None) -> np.ndarray:
    """``Preprocessor(resolution, load_resolution)(rgb)``: float32 ``[3, resolution, resolution]`` in [-1, 1] of
    pixels (the :class:`Preprocessor` rules), for arrays in tests and notebooks; the project's code builds its
    preprocessor from the config (:meth:`Preprocessor.from_config`).

    Raises:
        InvalidInputError: not an ``[H, W, 3]`` or ``[H, W]`` array.
    """
    return Preprocessor(resolution, load_resolution)(rgb)


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, by image extension, sorted) into a list of paths.

    Raises:
        PathNotFoundError: (a UsageError and a FileNotFoundError) an input that does not exist.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise PathNotFoundError(f"no such file or folder: {p}")
    return out


def even_subset(items: Sequence, count: int) -> list[int]:
    """Indices of ``count`` items taken evenly from ``items`` (first and last included; all when ``count`` is 0
    or not smaller than ``len(items)``): the one subset rule of ``--max-test`` / ``--eval-max`` / benchmarks."""
    n = len(items)
    if not count or count >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, count).round().astype(int)]
