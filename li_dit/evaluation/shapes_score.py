"""Scores generated images against "shapes" captions: colour, count, shape and position.

The scorer knows the palette. A pixel belongs to colour c when it lies close to the segment from
"halfway between the background and c" to "somewhat more saturated than c": soft and blurry edges
are blends with the background, so they join their object instead of passing for another colour,
and muddy pixels near no segment are ignored. Pixels of one colour form blobs (8-connected
components); blobs smaller than `MIN_BLOB_FRACTION` of the image are noise, not objects.

  colour    every requested colour has an object and no other palette colour has one
  count     each requested colour has exactly the requested number of objects
  shape     every object of a requested colour has the requested shape (the ideal circle, square
            or triangle fitted to its bounding box that overlaps it best)
  position  relation captions: the centroid of colour A lies on the stated side of colour B's, by
            at least POSITION_MARGIN of the image (reported as lr_position for left/right and
            ud_position for above/below)
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from li_dit.data.synthetic import shapes

MIN_BLOB_FRACTION = 0.012  # ~12 pixels at 32x32; the smallest rendered object has ~50.
MAX_COLOUR_DISTANCE = 70.0  # RGB distance from a colour's segment still counted as that colour.
MIN_ALPHA, MAX_ALPHA = 0.5, 1.5  # The segment: background + alpha * (colour - background).
POSITION_MARGIN = 1 / 16  # Centroids differ by >= 2 px at 32x32 along the relation's axis.

_NAMES = tuple(shapes.PALETTE)
_COLOURS = np.asarray([shapes.PALETTE[n] for n in _NAMES], np.float32)
_BACKGROUND = np.asarray(shapes.BACKGROUND, np.float32)


def classify_pixels(image: np.ndarray) -> np.ndarray:
  """uint8 [H,W,3] -> int [H,W]: index into the palette, or -1 (background or unsure)."""
  offset = image.astype(np.float32) - _BACKGROUND  # [H,W,3]
  directions = _COLOURS - _BACKGROUND  # [K,3]
  alpha = offset @ directions.T / np.sum(directions ** 2, axis=-1)  # [H,W,K]
  on_segment = np.clip(alpha, MIN_ALPHA, MAX_ALPHA)[..., None] * directions  # [H,W,K,3]
  distance = np.linalg.norm(offset[..., None, :] - on_segment, axis=-1)  # [H,W,K]
  nearest = np.argmin(distance, axis=-1)
  alpha_nearest = np.take_along_axis(alpha, nearest[..., None], axis=-1)[..., 0]
  keep = (np.min(distance, axis=-1) <= MAX_COLOUR_DISTANCE) & (alpha_nearest >= MIN_ALPHA)
  return np.where(keep, nearest, -1)


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
  """The shape whose ideal silhouette, fitted to the blob's bounding box, overlaps it best."""
  top, left = blob.min(axis=0)
  h, w = blob.max(axis=0) - (top, left) + 1
  mask = np.zeros((h, w), bool)
  mask[blob[:, 0] - top, blob[:, 1] - left] = True
  v, u = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
  templates = {"circle": (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25,
               "square": np.ones((h, w), bool),
               "triangle": np.abs(u - 0.5) <= v / 2}  # Apex up, as rendered.
  iou = {name: np.sum(mask & t) / np.sum(mask | t) for name, t in templates.items()}
  return max(iou, key=iou.get)


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
      axis, sign = {"left": (1, 1), "right": (1, -1), "above": (0, 1), "below": (0, -1)}[
          scene.relation]
      position = sign * (cb[axis] - ca[axis]) >= POSITION_MARGIN * image.shape[axis]
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
  ud_position; None where no caption asks for it; all: every criterion the caption has is right),
  `num_images` and per-image `records`.
  """
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions")
  records = [score_image(img, cap) for img, cap in zip(images, captions)]
  report = {f"{key}_accuracy": _mean([r[key] for r in records])
            for key in ("colour", "count", "shape", "position", "lr_position", "ud_position")}
  criteria = ("colour", "count", "shape", "position")
  report["all_accuracy"] = _mean([all(r[c] is not False for c in criteria) for r in records])
  report["num_images"] = len(records)
  report["records"] = records
  return report
