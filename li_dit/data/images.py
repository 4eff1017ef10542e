"""Image bytes -> RGB uint8 arrays, robustly: every failure is a `BadInput` with a reason.

One decoder serves `tools/build_dataset.py` (which validates every image before writing it) and
the training pipeline (which decodes the stored bytes), so what the tool accepts is what the
pipeline can read. Reasons are short fixed strings: they are the keys of the skip counts in
`summary.json`, `metrics.jsonl` and the progress line.
"""
from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps

# Skip reasons of images (the caption reasons live in li_dit.data.records).
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable_image"  # not an image, corrupt or truncated
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
IMAGE_REASONS = (EMPTY_FILE, UNREADABLE, DECOMPRESSION_BOMB, TOO_SMALL)

DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k: larger is a decompression bomb, not a photo.


class BadInput(ValueError):
  """An input that is skipped and counted under `reason`."""

  def __init__(self, reason: str, detail: str):
    super().__init__(f"{reason}: {detail}")
    self.reason = reason


def decode_rgb(data: bytes, min_size: int = 1,
               max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
  """Encoded image -> uint8 [H,W,3], EXIF orientation applied, any mode converted to RGB.

  L, LA, P (with or without transparency), RGBA, CMYK, I;16 and I (16/32-bit) images become RGB;
  transparent pixels are composited on white (the background a viewer shows).

  Raises:
    BadInput: empty, unreadable or truncated, a decompression bomb (more than `max_pixels`
      pixels), or a side shorter than `min_size`.
  """
  with _open(data, max_pixels) as img:
    try:
      img.load()
      img = ImageOps.exif_transpose(img)
      rgb = _to_rgb(img)
    except (OSError, ValueError, SyntaxError) as e:  # Pillow's errors for broken data.
      raise BadInput(UNREADABLE, f"{type(e).__name__}: {e}") from e
  if min(rgb.size) < min_size:
    raise BadInput(TOO_SMALL, f"{rgb.size[0]}x{rgb.size[1]} is below the minimum side {min_size}")
  return np.asarray(rgb, np.uint8)


def _open(data: bytes, max_pixels: int) -> Image.Image:
  if not data:
    raise BadInput(EMPTY_FILE, "0 bytes")
  try:
    with warnings.catch_warnings():
      # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we decide ourselves.
      warnings.simplefilter("ignore", Image.DecompressionBombWarning)
      img = Image.open(io.BytesIO(data))
  except Image.DecompressionBombError as e:
    raise BadInput(DECOMPRESSION_BOMB, str(e)) from e
  except (OSError, ValueError, SyntaxError) as e:
    raise BadInput(UNREADABLE, f"{type(e).__name__}: {e}") from e
  if img.width * img.height > max_pixels:
    img.close()
    raise BadInput(DECOMPRESSION_BOMB,
                   f"{img.width}x{img.height} is more than {max_pixels} pixels")
  return img


def _to_rgb(img: Image.Image) -> Image.Image:
  if img.mode in ("I;16", "I;16B", "I;16L", "I"):
    # 16/32-bit greyscale: scale the full range to 8 bits (Pillow's convert("L") clips instead).
    values = np.asarray(img, np.float64)
    top = 65535.0 if img.mode.startswith("I;16") or values.max() > 255 else 255.0
    img = Image.fromarray(np.clip(values / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
  if img.mode == "P":
    img = img.convert("RGBA" if "transparency" in img.info else "RGB")
  if img.mode in ("LA", "RGBA", "La", "RGBa", "PA"):
    rgba = img.convert("RGBA")
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, rgba).convert("RGB")
  return img.convert("RGB")


def resize_center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """uint8 [h,w,3] -> uint8 [height,width,3]: scale to cover, then crop the centre."""
  h, w = image.shape[:2]
  scale = max(height / h, width / w)
  new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
  img = Image.fromarray(image)
  if (new_h, new_w) != (h, w):
    # reducing_gap: Pillow first shrinks by an integer factor in the decoder's way (fast), then
    # resamples the rest with the antialiased filter.
    img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
  top, left = (new_h - height) // 2, (new_w - width) // 2
  return np.asarray(img.crop((left, top, left + width, top + height)), np.uint8)


def nearest_buckets(sizes: np.ndarray, buckets: Sequence[tuple[int, int]],
                    chunk: int = 1 << 20) -> np.ndarray:
  """int [N,2] (width, height) -> uint8 [N]: the (height, width) bucket of closest aspect ratio.

  Closeness is in log(width / height), so 2:1 and 1:2 are equally far from 1:1. Works through
  `sizes` in chunks, so a memory-mapped array of a billion sizes is never loaded whole.
  """
  if not 1 <= len(buckets) <= 256:
    raise ValueError(f"between 1 and 256 buckets, got {len(buckets)}")
  bucket_ratios = np.log([w / h for h, w in buckets])
  out = np.empty(len(sizes), np.uint8)
  for start in range(0, len(sizes), chunk):
    part = np.asarray(sizes[start:start + chunk], np.float64).reshape(-1, 2)
    ratios = np.log(part[:, 0] / part[:, 1])
    out[start:start + chunk] = np.argmin(np.abs(ratios[:, None] - bucket_ratios[None]), axis=1)
  return out
