"""The shapes data: grammar, split, rendering contract and the grain source.

The scorer's behaviour on these renders is tested in test_shapes_score.py.
"""
import pickle

import grain
import numpy as np
import pytest

from li_dit.data.synthetic import relations as relations_lib
from li_dit.data.synthetic import shapes


def test_caption_counts_and_round_trip():
  captions = shapes.all_captions()
  assert captions == sorted(set(captions)) and len(captions) == 54 + 1080
  for caption in captions:
    assert shapes.parse_caption(caption).caption == caption
  scene = shapes.parse_caption("  A Red Circle to the left of an orange square ")
  assert scene == shapes.Scene(
      (shapes.ObjectSpec("red", "circle"), shapes.ObjectSpec("orange", "square")), "left")
  assert shapes.parse_caption("three green triangles").objects == (
      shapes.ObjectSpec("green", "triangle", 3),)


@pytest.mark.parametrize("caption", [
    "", "a pink circle", "a red hexagon", "four red circles", "two red circle", "a red circles",
    "a orange circle", "a red circle next to a blue square", "a red circle above a red square",
    "two red circles above a blue square", "a red circle above"])
def test_parse_rejects(caption):
  with pytest.raises(ValueError, match="Cannot parse"):
    shapes.parse_caption(caption)


def test_split():
  train, heldout = shapes.train_captions(0), shapes.heldout_captions(0)
  assert not set(train) & set(heldout)
  assert sorted(train + heldout) == shapes.all_captions()
  assert heldout == shapes.heldout_captions(0) and heldout != shapes.heldout_captions(1)
  assert len(heldout) >= 60
  relations = [shapes.parse_caption(c).relation for c in heldout]
  assert relations.count("left") + relations.count("right") >= 40
  assert relations.count("above") + relations.count("below") >= 20
  assert relations.count(None) >= 1
  train_objects = [o for c in train for o in shapes.parse_caption(c).objects]
  assert {o.colour for o in train_objects} == set(shapes.PALETTE)
  assert {o.shape for o in train_objects} == set(shapes.SHAPES)
  assert {o.count for o in train_objects} == set(shapes.COUNTS)
  assert {shapes.parse_caption(c).relation for c in train} == set(relations_lib.RELATIONS) | {None}


def test_heldout_scenes_have_no_training_paraphrase():
  # "A left of B" is the same picture as "B right of A": both are held out or neither.
  flip = {"left": "right", "right": "left", "above": "below", "below": "above"}
  heldout = set(shapes.heldout_captions(0))
  for caption in heldout:
    scene = shapes.parse_caption(caption)
    if scene.relation is not None:
      swapped = shapes.Scene(scene.objects[::-1], flip[scene.relation])
      assert swapped.caption in heldout


def test_reading_order_keeps_the_same_heldout_scenes_in_one_wording():
  order = relations_lib.READING_ORDER
  assert len(shapes.all_captions(order)) == 54 + 540
  heldout, train = shapes.heldout_captions(0, order), shapes.train_captions(0, order)
  assert len(heldout) == 54 + 6 and sorted(train + heldout) == shapes.all_captions(order)
  # The same pictures are held out as with all four relations, in their reading-order wording.
  assert set(heldout) == {c for c in shapes.heldout_captions(0)
                          if shapes.parse_caption(c).relation in (None, *order)}
  source = shapes.ShapesSource(num_records=300, relations=order)
  kinds = {shapes.parse_caption(source[i]["caption"]).relation for i in range(len(source))}
  assert kinds == {None, "left", "above"}
  assert "relations=('left', 'above')" in repr(source)  # grain's checkpoints compare reprs
  with pytest.raises(ValueError, match="relations must be a non-empty subset"):
    shapes.all_captions(("left", "beside"))


def _colour_pixels(image, colour):
  """(row, col) of pixels within 60 of a palette colour: the object interiors."""
  distance = np.linalg.norm(image.astype(float) - shapes.PALETTE[colour], axis=-1)
  return np.argwhere(distance < 60)


@pytest.mark.parametrize("image_size", [32, 64])
def test_render_places_relations_unambiguously(image_size):
  rng = np.random.default_rng(0)
  half = image_size / 2
  for caption in shapes.all_captions()[::7]:
    scene = shapes.parse_caption(caption)
    image = shapes.render(scene, rng, image_size)
    assert image.shape == (image_size, image_size, 3) and image.dtype == np.uint8
    if scene.relation is None:
      continue
    first, second = (_colour_pixels(image, o.colour) for o in scene.objects)
    axis = 1 if scene.relation in ("left", "right") else 0
    if scene.relation in ("right", "below"):
      first, second = second, first
    assert first[:, axis].max() < half <= second[:, axis].min(), caption
    gap = second[:, axis].mean() - first[:, axis].mean()
    assert gap >= 10 / 32 * image_size, caption


def test_render_is_anti_aliased_and_sized():
  image = shapes.render("a blue square", np.random.default_rng(0))
  values = {tuple(p) for p in image.reshape(-1, 3)}
  assert shapes.BACKGROUND in values and shapes.PALETTE["blue"] in values
  assert len(values) > 3  # soft edges: blends between blue and the background
  area = len(_colour_pixels(image, "blue"))
  assert 50 <= area <= 13 * 13


def test_source_is_deterministic_and_picklable():
  source = shapes.ShapesSource(seed=3)
  assert isinstance(source, grain.sources.RandomAccessDataSource)
  assert len(source) == 1_000_000
  a, b = source[17], source[17]
  assert a["caption"] == b["caption"] and np.array_equal(a["image"], b["image"])
  assert a["image"].shape == (32, 32, 3) and a["image"].dtype == np.uint8
  assert not np.array_equal(source[18]["image"], a["image"])
  assert not np.array_equal(shapes.ShapesSource(seed=4)[17]["image"], a["image"])
  clone = pickle.loads(pickle.dumps(source))
  assert repr(clone) == repr(source)
  assert clone[17]["caption"] == a["caption"]
  assert np.array_equal(clone[np.int64(17)]["image"], a["image"])
  with pytest.raises(IndexError):
    source[len(source)]


def test_source_splits_and_caption_mix():
  train = shapes.ShapesSource(split="train", num_records=1000)
  heldout = shapes.ShapesSource(split="heldout", num_records=200)
  train_captions = [train[i]["caption"] for i in range(len(train))]
  assert set(train_captions) <= set(shapes.train_captions(0))
  assert {heldout[i]["caption"] for i in range(len(heldout))} <= set(shapes.heldout_captions(0))
  # One fifth each: count captions, left, right, above, below.
  count_share = np.mean([shapes.parse_caption(c).relation is None for c in train_captions])
  assert 0.15 < count_share < 0.25
  with pytest.raises(ValueError, match="split"):
    shapes.ShapesSource(split="test")


def test_source_in_a_grain_pipeline():
  source = shapes.ShapesSource(num_records=16, image_size=16)
  batch = grain.MapDataset.source(source).batch(8)[1]
  assert batch["image"].shape == (8, 16, 16, 3)
  assert list(batch["caption"]) == [source[i]["caption"] for i in range(8, 16)]
