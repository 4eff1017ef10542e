"""Synthetic "shapes" text-to-image data: the CPU demo of LI-DiT.

Every caption comes from a small finite grammar, so a tiny model can learn it at 32x32 pixels in
minutes and `li_dit.evaluation.shapes_score` can check generated images against what the prompt
asked:

  count captions:    "a red circle", "an orange square", "two blue squares", "three green triangles"
  relation captions: "a red circle to the left of a blue square"  (also "to the right of",
                     "above", "below"; the two objects always have different colours)

6 colours x 3 shapes x 3 counts = 54 count captions, and 6x5 colour pairs x 3x3 shapes = 270
relation captions per relation: 1134 in all.

Which relations a run uses is its choice (`relations`; the demo: relations.READING_ORDER). With
"to the left of" and "above" alone, the object named first is always the left (top) one; adding
"to the right of" and "below" asks the model to compose word order with the relation word, which
the CPU demo's budget does not learn (measured: left/right position at chance, 0.40, against 0.88
in reading order, both at 1800 steps).

Held-out split: about 10% of the relation captions and 6 count captions are never used for
training. "A left of B" and "B right of A" describe the same picture, so relation captions are held
out by *scene* (both phrasings go together): a held-out prompt is a picture the model has never been
trained on under any wording, not just an unseen sentence.

Rendering draws at 4x with Pillow and box-downsamples, so edges are anti-aliased like real images.
Objects are 9-13 px at 32x32 (sizes and positions are fractions of the image, so any size works),
never overlap and keep a gap of >= 3.8 px (at 32x32) so that slightly blurry generations still
separate into blobs. Relations are unambiguous: for "left of" the objects sit in the left and right
halves (centroids >= 11 px apart horizontally) and their vertical offset is at most 20% of the
image, likewise for "above"/"below" with the axes swapped.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Sequence

import numpy as np
from PIL import Image, ImageDraw

from li_dit.data.synthetic.relations import RELATIONS

# Saturated colours, far apart in RGB (the closest pair, yellow/orange, is 91 apart) and far from
# the background (>= 250 apart), so a colour stays itself when blurred towards the background.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (200, 0, 40),
    "green": (0, 160, 60),
    "blue": (0, 80, 230),
    "yellow": (240, 230, 0),
    "purple": (150, 0, 200),
    "orange": (255, 140, 0),
}
BACKGROUND: tuple[int, int, int] = (255, 255, 255)  # plain white, every image
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
COUNTS: tuple[int, ...] = (1, 2, 3)

_COUNT_WORDS = {2: "two", 3: "three"}  # count 1: "a"/"an"
_SUPERSAMPLE = 4  # draw at 4x, box-downsample: anti-aliased edges
_MARGIN = 0.06  # gap to the image border and to a layout cell's border, fraction of the image
_MAX_OFFSET = 0.2  # largest perpendicular offset between the two objects of a relation
_NUM_HELDOUT_SCENES = {"horizontal": 30, "vertical": 24}  # 60 + 48 relation captions
_NUM_HELDOUT_COUNT = 6  # one count caption per colour


@dataclasses.dataclass(frozen=True, order=True)
class ObjectSpec:
  """`count` objects of one colour and shape."""
  colour: str
  shape: str
  count: int = 1

  def __post_init__(self):
    if self.colour not in PALETTE:
      raise ValueError(f"Unknown colour {self.colour!r}; known: {sorted(PALETTE)}.")
    if self.shape not in SHAPES:
      raise ValueError(f"Unknown shape {self.shape!r}; known: {SHAPES}.")
    if self.count not in COUNTS:
      raise ValueError(f"Count must be one of {COUNTS}, got {self.count}.")

  @property
  def phrase(self) -> str:
    if self.count == 1:
      article = "an" if self.colour[0] in "aeiou" else "a"
      return f"{article} {self.colour} {self.shape}"
    return f"{_COUNT_WORDS[self.count]} {self.colour} {self.shape}s"


@dataclasses.dataclass(frozen=True)
class Scene:
  """What a caption asks for.

  Attributes:
    objects: one ObjectSpec (count caption) or two single objects of different colours (relation
      caption).
    relation: None, or a key of RELATIONS: objects[0] is on that side of objects[1].
  """
  objects: tuple[ObjectSpec, ...]
  relation: str | None = None

  def __post_init__(self):
    if self.relation is None:
      if len(self.objects) != 1:
        raise ValueError(f"A scene without a relation has one object spec, got {self.objects}.")
      return
    if self.relation not in RELATIONS:
      raise ValueError(f"Unknown relation {self.relation!r}; known: {sorted(RELATIONS)}.")
    if len(self.objects) != 2 or any(o.count != 1 for o in self.objects):
      raise ValueError(f"A relation relates two single objects, got {self.objects}.")
    if self.objects[0].colour == self.objects[1].colour:
      raise ValueError(f"The two objects of a relation differ in colour, got {self.objects}.")

  @property
  def caption(self) -> str:
    if self.relation is None:
      return self.objects[0].phrase
    return f"{self.objects[0].phrase} {RELATIONS[self.relation]} {self.objects[1].phrase}"


def _alternatives(words) -> str:
  return "|".join(re.escape(w) for w in words)


# Plurals are optional here and checked by comparing the parse's canonical caption with the input.
_OBJECT = rf"(a|an|two|three) ({_alternatives(PALETTE)}) ({_alternatives(SHAPES)})s?"
_CAPTION_RE = re.compile(
    rf"{_OBJECT}(?: ({_alternatives(RELATIONS.values())}) {_OBJECT})?")
_RELATION_OF_PHRASE = {phrase: key for key, phrase in RELATIONS.items()}
_COUNT_OF_WORD = {"a": 1, "an": 1, "two": 2, "three": 3}


def parse_caption(caption: str) -> Scene:
  """Parses a caption of the grammar (case and surrounding spaces are ignored).

  Raises:
    ValueError: if the caption is not in the grammar (unknown word, wrong plural, a relation
      between a plural or two same-coloured objects, ...).
  """
  match = _CAPTION_RE.fullmatch(caption.strip().lower())
  if match is None:
    raise ValueError(
        f"Cannot parse {caption!r}: expected '<a|an|two|three> <colour> <shape>[s]' "
        f"optionally followed by '<relation> <a|an> <colour> <shape>', with colours "
        f"{sorted(PALETTE)}, shapes {SHAPES}, relations {sorted(RELATIONS.values())}.")
  count, colour, shape, relation, *second = match.groups()
  objects = [ObjectSpec(colour, shape, _COUNT_OF_WORD[count])]
  if relation is not None:
    count, colour, shape = second
    objects.append(ObjectSpec(colour, shape, _COUNT_OF_WORD[count]))
    relation = _RELATION_OF_PHRASE[relation]
  try:
    scene = Scene(tuple(objects), relation)
  except ValueError as e:  # e.g. "two red circles above a blue square"
    raise ValueError(f"Cannot parse {caption!r}: {e}") from e
  if scene.caption != caption.strip().lower():
    raise ValueError(f"Cannot parse {caption!r}: did you mean {scene.caption!r}?")
  return scene


def _check_relations(relations: Sequence[str]) -> tuple[str, ...]:
  unknown = set(relations) - set(RELATIONS)
  if unknown or not relations:
    raise ValueError(f"relations must be a non-empty subset of {tuple(RELATIONS)}, "
                     f"got {tuple(relations)}")
  return tuple(k for k in RELATIONS if k in relations)


def all_captions(relations: Sequence[str] = tuple(RELATIONS)) -> list[str]:
  """Every caption of the grammar with these relations, sorted (1134 with all four)."""
  captions = [ObjectSpec(c, s, n).phrase for c in PALETTE for s in SHAPES for n in COUNTS]
  for key in _check_relations(relations):
    for a in PALETTE:
      for b in PALETTE:
        if a != b:
          for sa in SHAPES:
            for sb in SHAPES:
              captions.append(Scene((ObjectSpec(a, sa), ObjectSpec(b, sb)), key).caption)
  return sorted(captions)


def _scene_key(scene: Scene) -> tuple[str, ObjectSpec, ObjectSpec]:
  """The picture a relation caption describes: "A left of B" == "B right of A"."""
  a, b = scene.objects
  axis = "horizontal" if scene.relation in ("left", "right") else "vertical"
  first_then_second = scene.relation in ("left", "above")
  return (axis,) + ((a, b) if first_then_second else (b, a))


def heldout_captions(seed: int = 0, relations: Sequence[str] = tuple(RELATIONS)) -> list[str]:
  """A fixed set of captions never used for training, sorted.

  The same 54 relation scenes whatever `relations` (30 left/right and 24 above/below), in every
  wording `relations` allows (108 captions with all four, 54 in reading order), and 6 count
  captions (one per colour). Every colour, shape, count and relation keeps plenty of training
  captions.
  """
  rng = np.random.default_rng(seed)
  captions = all_captions(relations)
  scenes = [parse_caption(c) for c in captions]
  keys = sorted({_scene_key(s) for s in scenes if s.relation is not None})
  heldout_keys = set()
  for axis, num in _NUM_HELDOUT_SCENES.items():
    on_axis = [k for k in keys if k[0] == axis]
    heldout_keys.update(on_axis[i] for i in rng.permutation(len(on_axis))[:num])
  # One (count, shape) per colour, all different: no colour loses more than one of its 9 count
  # captions and no (count, shape) disappears from training.
  count_shapes = [(n, s) for n in COUNTS for s in SHAPES]
  picks = rng.permutation(len(count_shapes))[:_NUM_HELDOUT_COUNT]
  heldout_counts = {ObjectSpec(c, count_shapes[i][1], count_shapes[i][0])
                    for c, i in zip(PALETTE, picks)}
  return [c for c, s in zip(captions, scenes)
          if (s.relation is None and s.objects[0] in heldout_counts)
          or (s.relation is not None and _scene_key(s) in heldout_keys)]


def train_captions(seed: int = 0, relations: Sequence[str] = tuple(RELATIONS)) -> list[str]:
  """All captions except the held-out ones, sorted (1020 with all four relations)."""
  heldout = set(heldout_captions(seed, relations))
  return [c for c in all_captions(relations) if c not in heldout]


# A placed object: colour, shape, centre x, centre y, size; geometry in fractions of the image.
_Placement = tuple[str, str, float, float, float]


def _layout(scene: Scene, rng: np.random.Generator) -> list[_Placement]:
  """Random non-overlapping placements that realise the scene."""
  if scene.relation is not None:
    return _relation_layout(scene, rng)
  spec = scene.objects[0]
  if spec.count == 1:
    size = rng.uniform(0.30, 0.42)
    x, y = rng.uniform(_MARGIN + size / 2, 1 - _MARGIN - size / 2, size=2)
    return [(spec.colour, spec.shape, x, y, size)]
  # Several objects: each in its own quadrant, so they never touch.
  placements = []
  for cell in rng.permutation(4)[:spec.count]:
    size = rng.uniform(0.28, 0.36)
    x, y = rng.uniform(_MARGIN + size / 2, 0.5 - _MARGIN - size / 2, size=2)
    placements.append((spec.colour, spec.shape, x + 0.5 * (cell % 2), y + 0.5 * (cell // 2), size))
  return placements


def _relation_layout(scene: Scene, rng: np.random.Generator) -> list[_Placement]:
  """The first object in its half of the image, the second in the other half, roughly aligned."""
  sizes = rng.uniform(0.28, 0.36, size=2)
  # `along`: coordinate on the relation's axis; the object named first goes to the low half for
  # "left"/"above" and to the high half for "right"/"below".
  first_low = scene.relation in ("left", "above")
  along = []
  for i, size in enumerate(sizes):
    low_half = (i == 0) == first_low
    start = 0.0 if low_half else 0.5
    along.append(start + rng.uniform(_MARGIN + size / 2, 0.5 - _MARGIN - size / 2))
  across0 = rng.uniform(_MARGIN + sizes[0] / 2, 1 - _MARGIN - sizes[0] / 2)
  lo = max(_MARGIN + sizes[1] / 2, across0 - _MAX_OFFSET)
  hi = min(1 - _MARGIN - sizes[1] / 2, across0 + _MAX_OFFSET)
  across = [across0, rng.uniform(lo, hi)]
  horizontal = scene.relation in ("left", "right")
  placements = []
  for spec, a, c, size in zip(scene.objects, along, across, sizes):
    x, y = (a, c) if horizontal else (c, a)
    placements.append((spec.colour, spec.shape, x, y, size))
  return placements


def _draw(draw: ImageDraw.ImageDraw, placement: _Placement, scale: float):
  colour, shape, x, y, size = placement
  x, y, half = x * scale, y * scale, size * scale / 2
  fill = PALETTE[colour]
  if shape == "circle":
    draw.ellipse([x - half, y - half, x + half, y + half], fill=fill)
  elif shape == "square":
    # A bit smaller than the circle's box so the two have about the same area.
    half *= 0.9
    draw.rectangle([x - half, y - half, x + half, y + half], fill=fill)
  else:  # triangle, apex up
    draw.polygon([(x, y - half), (x + half, y + half), (x - half, y + half)], fill=fill)


def render(spec: Scene | str, rng: np.random.Generator, image_size: int = 32) -> np.ndarray:
  """Renders one random picture of a scene (or caption).

  Args:
    spec: a Scene or a caption of the grammar.
    rng: source of the layout jitter (sizes and positions).
    image_size: side of the square image in pixels.

  Returns:
    uint8 [image_size, image_size, 3] RGB image.
  """
  scene = parse_caption(spec) if isinstance(spec, str) else spec
  side = image_size * _SUPERSAMPLE
  canvas = Image.new("RGB", (side, side), BACKGROUND)
  draw = ImageDraw.Draw(canvas)
  for placement in _layout(scene, rng):
    _draw(draw, placement, side)
  return np.asarray(canvas.reduce(_SUPERSAMPLE))


class ShapesSource:
  """Endless rendered (image, caption) records as a grain RandomAccessDataSource.

  Record `index` depends on (seed, index) only, so every grain worker process produces the same
  record. Captions are drawn in two steps, the kind first (count or one of the relations, equally
  likely) and then a caption of that kind: count captions are only 5% of the grammar but they are
  what teaches counting and shapes in isolation.
  """

  def __init__(self, image_size: int = 32, seed: int = 0, split: str = "train",
               num_records: int = 1_000_000, relations: Sequence[str] = tuple(RELATIONS)):
    splits = {"train": train_captions, "heldout": heldout_captions}
    if split not in splits:
      raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}.")
    self.image_size = image_size
    self.seed = seed
    self.split = split
    self.num_records = num_records
    self.relations = _check_relations(relations)
    kinds: dict[str | None, list[Scene]] = {}
    for caption in splits[split](seed, self.relations):
      scene = parse_caption(caption)
      kinds.setdefault(scene.relation, []).append(scene)
    self._scenes_by_kind = list(kinds.values())

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    """Returns {"image": uint8 [image_size, image_size, 3], "caption": str}."""
    index = int(index)
    if not 0 <= index < self.num_records:
      raise IndexError(f"Index {index} out of range [0, {self.num_records}).")
    rng = np.random.default_rng([self.seed, index])
    scenes = self._scenes_by_kind[rng.integers(len(self._scenes_by_kind))]
    scene = scenes[rng.integers(len(scenes))]
    return {"image": render(scene, rng, self.image_size), "caption": scene.caption}

  def __repr__(self) -> str:
    # grain checkpoints identify the source by its repr.
    return (f"ShapesSource(image_size={self.image_size}, seed={self.seed}, "
            f"split={self.split!r}, num_records={self.num_records}, "
            f"relations={self.relations})")
