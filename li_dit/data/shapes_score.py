"""Scores generated images against "shapes" captions: colour, count, shape and position.

The scorer knows the palette. Each pixel is assigned to the nearest palette colour when it is
close to it (and closer than to the background); soft, anti-aliased or slightly noisy edges fall
between colours and stay unassigned. Pixels of one colour form blobs (8-connected components);
blobs smaller than `MIN_BLOB_FRACTION` of the image are noise, not objects.

  colour    every requested colour has an object and no other palette colour has one
  count     each requested colour has exactly the requested number of objects
  shape     every object of a requested colour has the requested shape (fill ratio of its box:
            triangle ~0.5, circle ~0.79, square ~1)
  position  relation captions: the centroid of colour A lies on the stated side of colour B's
            (reported as lr_position for left/right and ud_position for above/below)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from li_dit.data import shapes

MIN_BLOB_FRACTION = 0.012  # ~12 pixels at 32x32; the smallest rendered object has ~50.
MAX_COLOUR_DISTANCE = 80.0  # RGB distance within which a pixel is that palette colour.

_NAMES = tuple(shapes.PALETTE)
_COLOURS = np.asarray([shapes.PALETTE[n] for n in _NAMES], np.float32)
_BACKGROUND = np.asarray(shapes.BACKGROUND, np.float32)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3] -> int [H,W]: index into the palette, or -1 (background or unsure)."""
  pixels = image.astype(np.float32)
  dist = np.linalg.norm(pixels[:, :, None, :] - _COLOURS[None, None], axis=-1)
  nearest = np.argmin(dist, axis=-1)
  best = np.take_along_axis(dist, nearest[..., None], axis=-1)[..., 0]
  to_background = np.linalg.norm(pixels - _BACKGROUND, axis=-1)
  return np.where((best < MAX_COLOUR_DISTANCE) & (best < to_background), nearest, -1)


def _components(mask: np.ndarray) -> list[np.ndarray]:
  """8-connected components of a boolean [H,W] mask, as arrays of (row, col) pixels."""
  seen = np.zeros_like(mask)
  height, width = mask.shape
  blobs = []
  for start in zip(*np.nonzero(mask)):
    if seen[start]:
      continue
    seen[start] = True
    stack, pixels = [start], []
    while stack:
      r, c = stack.pop()
      pixels.append((r, c))
      for dr in (-1, 0, 1):
        for dc in (-1, 0, 1):
          rr, cc = r + dr, c + dc
          if 0 <= rr < height and 0 <= cc < width and mask[rr, cc] and not seen[rr, cc]:
            seen[rr, cc] = True
            stack.append((rr, cc))
    blobs.append(np.asarray(pixels))
  return blobs


def _shape_of(blob: np.ndarray) -> str:
  """Classifies a blob by how much of its bounding box it fills."""
  extent = blob.max(axis=0) - blob.min(axis=0) + 1
  fill = len(blob) / float(extent[0] * extent[1])
  if fill < 0.64:
    return "triangle"
  return "circle" if fill < 0.885 else "square"


def find_objects(image: np.ndarray) -> dict[str, list[np.ndarray]]:
  """Palette colour -> its objects (blobs of at least MIN_BLOB_FRACTION of the image)."""
  labels = classify_pixels(image)
  min_size = MIN_BLOB_FRACTION * labels.size
  return {name: [b for b in _components(labels == i) if len(b) >= min_size]
          for i, name in enumerate(_NAMES)}


def score_image(image: np.ndarray, caption: str) -> dict[str, Any]:
  """Scores one uint8 [H,W,3] image against its caption.

  Returns {"caption", "colour", "count", "shape": bool, "position", "lr_position",
  "ud_position": bool or None (not a relation caption / not that axis), "found": {colour: n}}.
  """
  scene = shapes.parse_caption(caption)
  objects = find_objects(image)
  wanted = {o.colour: o for o in scene.objects}
  found = {c: len(b) for c, b in objects.items() if b}
  colour_ok = set(found) == set(wanted)
  count_ok = all(len(objects[c]) == o.count for c, o in wanted.items())
  shape_ok = all(objects[c] and all(_shape_of(b) == o.shape for b in objects[c])
                 for c, o in wanted.items())
  position = lr = ud = None
  if scene.relation is not None:
    a, b = (scene.objects[0].colour, scene.objects[1].colour)
    if objects[a] and objects[b]:
      # Centroids as (row, col); "left": a's column is smaller, "above": a's row is smaller.
      ca = np.concatenate(objects[a]).mean(axis=0)
      cb = np.concatenate(objects[b]).mean(axis=0)
      position = {"left": ca[1] < cb[1], "right": ca[1] > cb[1],
                  "above": ca[0] < cb[0], "below": ca[0] > cb[0]}[scene.relation]
    else:
      position = False
    position = bool(position)
    if scene.relation in ("left", "right"):
      lr = position
    else:
      ud = position
  return {"caption": caption, "colour": colour_ok, "count": count_ok, "shape": shape_ok,
          "position": position, "lr_position": lr, "ud_position": ud, "found": found}


def _mean(values: Sequence[bool | None]) -> float | None:
  present = [v for v in values if v is not None]
  return float(np.mean(present)) if present else None


def score_images(images: np.ndarray, captions: Sequence[str]) -> dict[str, Any]:
  """Scores uint8 [N,H,W,3] images against their N captions.

  Returns accuracies (colour, count, shape, position over all relation captions, lr_position,
  ud_position; None where no caption asks for it), `num_images` and per-image `records`.
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  records = [score_image(img, cap) for img, cap in zip(images, captions)]
  report = {f"{key}_accuracy": _mean([r[key] for r in records])
            for key in ("colour", "count", "shape", "position", "lr_position", "ud_position")}
  report["num_images"] = len(records)
  report["records"] = records
  return report
