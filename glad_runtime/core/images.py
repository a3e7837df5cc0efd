"""Image I/O as production lines send it: decode, orient, convert, resize; and maps back at the original size.

Conversion rules (documented in the README):

* EXIF orientation is applied first (``PIL.ImageOps.exif_transpose``); "original size" means the upright size.
* 8-bit grayscale ``L`` -> value / 255, replicated to 3 channels (the official ``convert("RGB")``).
* 16-bit grayscale (``I;16*``, or ``I`` with values <= 65535) -> value / 65535, replicated; full precision is kept
  through the resize (no 8-bit round trip).
* ``RGB`` -> / 255. ``RGBA`` / ``LA`` / palette with transparency -> composited onto black (transparent pixels
  are background), then RGB. Palette, ``CMYK``, ``YCbCr``, 1-bit -> Pillow's RGB conversion.
* 32-bit float ``F`` images and anything else are refused with :class:`UnsupportedImageError`.
* Resize to ``resolution x resolution`` (bilinear, antialiased as Pillow does for torchvision's PIL ``Resize``;
  the aspect ratio is not kept, as in the official code), then ``x * 2 - 1`` -> [-1, 1]. 8-bit sources are resized
  as the 8-bit RGB image and then divided by 255, exactly the official ``Resize`` -> ``ToTensor`` order (the
  resize rounds to 8-bit levels); 16-bit sources are resized as float channels (no 8-bit round trip).
* Multi-class presets (``load_resolution``): the image is first prepared at ``load_resolution`` (256) as above, then
  upsampled bilinearly with ``align_corners=True`` to ``resolution`` (512), as the official ``main_multi.py``. The
  scoring stage works on the load-size image again, recovered exactly from this one
  (:func:`glad_runtime.core.scoring.scoring_images`, issue 30).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from glad_runtime.errors import ImageLoadError, ImageTooLargeError, UnsupportedImageError  # noqa: F401 (re-exported)

__all__ = ["ImageLoadError", "UnsupportedImageError", "ImageTooLargeError", "LoadedImage", "load_image",
           "check_pixels", "to_pixels", "to_unit_rgb", "to_rgb_pixels", "preprocess", "prepare", "upsample_align_corners", "resize_map", "IMAGE_EXTENSIONS"]

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
            grayscale image is one channel replicated to RGB wherever RGB is needed (:attr:`rgb`, :func:`preprocess`
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


def preprocess(rgb: np.ndarray, resolution: int, load_resolution: int | None = None) -> np.ndarray:
    """Resize RGB pixels to ``resolution`` squared and map to [-1, 1] (spec section 6 / 4.2 step 8).

    * uint8 ``[H, W, 3]`` (8-bit sources): the 8-bit RGB image is resized with Pillow's bilinear filter
      (antialiased when shrinking: what torchvision's ``Resize`` does to a PIL image), then divided by 255, so the
      result sits on 8-bit levels exactly as the official ``Resize`` -> ``ToTensor`` -> ``Normalize(0.5, 0.5)``.
    * float ``[H, W, 3]`` in [0, 1] (16-bit sources, arrays): each channel is resized as a 32-bit float Pillow
      image with the same filter; values are clipped to [0, 1].
    * ``load_resolution`` (multi-class presets, ``main_multi.py``): resize to ``load_resolution`` as above, then
      upsample bilinearly with ``align_corners=True`` to ``resolution``.

    * grayscale ``[H, W]`` (:class:`LoadedImage` keeps grey sources as one channel): resized once and replicated;
      the same result as resizing its 3-channel form (Pillow filters each band alike), a third of the memory.

    Args:
        rgb: uint8 ``[H, W, 3]`` or ``[H, W]``, or float ``[H, W, 3]`` or ``[H, W]`` in [0, 1].
        resolution: output side in pixels.
        load_resolution: optional intermediate side (see above); None or equal to ``resolution`` skips it.
    Returns:
        float32 ``[3, resolution, resolution]`` in [-1, 1].
    Raises:
        ValueError: not an ``[H, W, 3]`` or ``[H, W]`` array.
    """
    if not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[2] == 3)):
        raise ValueError(f"expected [H, W, 3] RGB or [H, W] grayscale, got {rgb.shape}")
    size = load_resolution or resolution
    if rgb.dtype == np.uint8:
        x = np.asarray(Image.fromarray(np.ascontiguousarray(rgb), "RGB" if rgb.ndim == 3 else "L")
                       .resize((size, size), Image.BILINEAR), dtype=np.float32) / np.float32(255.0)
        x = x.transpose(2, 0, 1) if x.ndim == 3 else np.broadcast_to(x, (3, size, size))
    else:
        channels = [rgb] if rgb.ndim == 2 else [rgb[..., k] for k in range(3)]
        x = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(c, dtype=np.float32))
                                 .resize((size, size), Image.BILINEAR)) for c in channels]).clip(0.0, 1.0)
        x = np.broadcast_to(x, (3, size, size))
    x = (x * 2.0 - 1.0).astype(np.float32)
    if size != resolution:
        x = upsample_align_corners(x, resolution)
    return x


def upsample_align_corners(x: np.ndarray, size: int) -> np.ndarray:
    """Bilinear resize of ``[C, h, w]`` float32 to ``[C, size, size]`` with ``align_corners=True`` (torch's
    ``F.interpolate(..., mode="bilinear", align_corners=True)``; ``glad_runtime.core.scoring.resize_bilinear``)."""
    from glad_runtime.core.scoring import resize_bilinear

    return resize_bilinear(x, (size, size))


def prepare(img: LoadedImage, resolution: int, load_resolution: int | None = None) -> np.ndarray:
    """The one preprocessing of a decoded image, shared by ``glad detect``, the BLS model (images sent as encoded
    files), evaluation, calibration and training: float32 ``[3, resolution, resolution]`` in [-1, 1]
    (:func:`preprocess` of the image's pixels; pass ``config.load_resolution`` for multi-class presets).

    A result therefore does not depend on who sent the image: a file scored in process and the same file's bytes
    sent to the server go through :func:`load_image` and this function.
    """
    return preprocess(img.pixels, resolution, load_resolution)


def resize_map(amap: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize an anomaly map ``[h, w]`` to the original ``(H, W)`` (bilinear, Pillow float), float32."""
    h, w = size
    if amap.shape == (h, w):
        return amap.astype(np.float32)
    return np.asarray(Image.fromarray(np.ascontiguousarray(amap, dtype=np.float32))
                      .resize((w, h), Image.BILINEAR), dtype=np.float32)


def list_images(inputs: list[str | os.PathLike]) -> list[Path]:
    """Expand files and folders (recursively, by image extension, sorted) into a list of paths.

    Raises:
        FileNotFoundError: an input that does not exist.
    """
    out: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_EXTENSIONS and q.is_file()))
        elif p.exists():
            out.append(p)
        else:
            raise FileNotFoundError(f"no such file or folder: {p}")
    return out


def even_subset(items: Sequence, count: int) -> list[int]:
    """Indices of ``count`` items taken evenly from ``items`` (first and last included; all when ``count`` is 0
    or not smaller than ``len(items)``): the one subset rule of ``--max-test`` / ``--eval-max`` / benchmarks."""
    n = len(items)
    if not count or count >= n:
        return list(range(n))
    return [int(i) for i in np.linspace(0, n - 1, count).round().astype(int)]


def load_batches(paths: Sequence[str | os.PathLike], resolution: int, batch_size: int,
                 load_resolution: int | None = None):
    """Yield preprocessed float32 ``[B, 3, R, R]`` batches in [-1, 1] of image files (:func:`load_image` +
    :func:`prepare`). Raises ImageLoadError for a file that cannot be read."""
    paths = list(paths)
    for s in range(0, len(paths), batch_size):
        yield np.stack([prepare(load_image(p), resolution, load_resolution) for p in paths[s:s + batch_size]])
