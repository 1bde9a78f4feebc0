"""Reference-image preprocessing and result grids.

References come as paths, PIL images or arrays, in any format Pillow opens: RGB, RGBA (composited
on white), L, P, 16-bit grey; EXIF orientation is applied; then a center crop to a square and a
resize to the model resolution. An optional subject mask blanks the background to white.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, UnidentifiedImageError


class ImageInputError(ValueError):
    """A user-given image cannot be used (missing, unreadable, not an image)."""


def open_image(source) -> Image.Image:
    """Path / PIL image / array (H, W[, C], uint8 or float in [0, 1]) -> PIL image, EXIF-oriented."""
    if isinstance(source, Image.Image):
        image = source
    elif isinstance(source, np.ndarray):
        array = source
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]  # (H, W, 1) -> grey (H, W)
        if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
            raise ImageInputError(f"an image array must be (H, W), (H, W, 1), (H, W, 3) or (H, W, 4); got {array.shape}")
        if np.issubdtype(array.dtype, np.integer) and array.dtype != np.uint8:
            # an int64 0..255 array read as floats in [0, 1] would come out white
            raise ImageInputError(f"integer image arrays must be uint8, got {array.dtype}: use "
                                  ".astype(np.uint8) for 0..255 values, or floats in [0, 1]")
        if array.dtype != np.uint8:
            array = (np.clip(array.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        image = Image.fromarray(array)
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.exists():
            raise ImageInputError(f"reference image {path} does not exist")
        if not path.is_file():
            raise ImageInputError(f"reference image {path} is not a file")
        try:
            image = Image.open(path)
            image.load()
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
            raise ImageInputError(f"reference image {path} is not a readable image ({type(e).__name__})") from e
    else:
        raise ImageInputError(f"cannot use {type(source).__name__} as an image (give a path, PIL image or array)")
    return ImageOps.exif_transpose(image)


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency is composited on white, 16/32-bit grey rescaled to 8 bit."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") else max(float(array.max()), 1.0)
        image = Image.fromarray((np.clip(array / top, 0, 1) * 255 + 0.5).astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def center_crop_resize(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def load_reference(source, size: int, mask=None) -> np.ndarray:
    """One reference -> uint8 (size, size, 3). `mask` (same sources) keeps the subject, whitens the rest."""
    opened = open_image(source)
    image = center_crop_resize(to_rgb(opened), size)
    array = np.asarray(image, dtype=np.uint8)
    if mask is not None:
        m = open_image(mask)
        (w, h), (mw, mh) = opened.size, m.size
        if abs(mw * h - w * mh) > 0.01 * w * mh:  # each is centre-cropped on its own: the frames must agree
            raise ImageInputError(f"mask is {mw}x{mh} but its reference is {w}x{h}: give a mask of the "
                                  "reference's shape")
        m = center_crop_resize(to_rgb(m), size)
        keep = np.asarray(m.convert("L"), dtype=np.float32)[..., None] / 255.0  # (size, size, 1)
        array = (array * keep + 255.0 * (1.0 - keep) + 0.5).astype(np.uint8)
    return array


def to_model_range(images: np.ndarray) -> np.ndarray:
    """uint8 (..., H, W, 3) -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


def from_model_range(images) -> np.ndarray:
    """float in [-1, 1] (..., H, W, 3) -> uint8."""
    return (np.clip((np.asarray(images, np.float32) + 1.0) * 127.5, 0, 255) + 0.5).astype(np.uint8)


def _wrap(text: str, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for w in words:
        if line and len(line) + 1 + len(w) > width:
            lines.append(line)
            line = w
        else:
            line = f"{line} {w}".strip()
    return lines + ([line] if line else [])


def labeled_grid(rows: Sequence[Sequence[np.ndarray]], labels: Sequence[Sequence[str]] | None = None,
                 *, cell: int | None = None, pad: int = 4) -> Image.Image:
    """Rows of uint8 images -> one PIL grid; each image may carry a label (wrapped) below it.

    Used for "references on top, results below, prompts as labels".
    """
    font = ImageFont.load_default()
    cell = cell or max(int(img.shape[0]) for row in rows for img in row)
    chars = max(8, cell // 6)
    wrapped = [[_wrap(lbl, chars) for lbl in row] for row in (labels or [[""] * len(r) for r in rows])]
    label_h = [12 * max([len(w) for w in row] + [0]) for row in wrapped]
    cols = max(len(r) for r in rows)
    width = cols * (cell + pad) + pad
    height = sum(cell + pad + h for h in label_h) + pad
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    y = pad
    for r, row in enumerate(rows):
        for c, img in enumerate(row):
            x = pad + c * (cell + pad)
            canvas.paste(Image.fromarray(np.asarray(img, np.uint8)).resize((cell, cell), Image.NEAREST), (x, y))
            for j, line in enumerate(wrapped[r][c] if c < len(wrapped[r]) else []):
                draw.text((x, y + cell + 1 + 12 * j), line, fill=(0, 0, 0), font=font)
        y += cell + pad + label_h[r]
    return canvas
