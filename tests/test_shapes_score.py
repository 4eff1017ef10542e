"""The shapes scorer: right on ground truth (also blurred or noisy), wrong on noise, blank and
swapped images."""
import numpy as np
import pytest
from PIL import Image, ImageFilter

from li_dit.data.synthetic import shapes
from li_dit.evaluation import shapes_score


@pytest.fixture(scope="module")
def records():
  source = shapes.ShapesSource(split="train", seed=0)
  recs = [source[i] for i in range(200)]
  return np.stack([r["image"] for r in recs]), [r["caption"] for r in recs]


def _acc(report):
  return {k: v for k, v in report.items() if k.endswith("accuracy")}


def test_ground_truth_scores_high(records):
  images, captions = records
  acc = _acc(shapes_score.score_images(images, captions))
  assert acc["colour_accuracy"] == 1.0 and acc["count_accuracy"] == 1.0
  assert acc["position_accuracy"] == 1.0
  assert acc["lr_position_accuracy"] == 1.0 and acc["ud_position_accuracy"] == 1.0
  assert acc["shape_accuracy"] >= 0.97 and acc["all_accuracy"] >= 0.97


def test_heldout_ground_truth_scores_high():
  captions = shapes.heldout_captions(0)
  images = np.stack([shapes.render(c, np.random.default_rng(i)) for i, c in enumerate(captions)])
  acc = _acc(shapes_score.score_images(images, captions))
  assert acc["colour_accuracy"] == 1.0 and acc["lr_position_accuracy"] == 1.0


def test_blurred_and_noisy_ground_truth_still_scores(records):
  images, captions = records
  blurred = np.stack([np.asarray(Image.fromarray(i).filter(ImageFilter.GaussianBlur(1.0)))
                      for i in images])
  acc = _acc(shapes_score.score_images(blurred, captions))
  assert acc["colour_accuracy"] >= 0.97 and acc["position_accuracy"] >= 0.97
  noisy = np.clip(images + np.random.default_rng(0).normal(0, 20, images.shape), 0, 255)
  acc = _acc(shapes_score.score_images(noisy.astype(np.uint8), captions))
  assert acc["colour_accuracy"] >= 0.97 and acc["count_accuracy"] >= 0.95


def test_noise_and_blank_images_score_zero(records):
  images, captions = records
  noise = np.random.default_rng(0).integers(0, 256, images.shape, dtype=np.uint8)
  blank = np.full_like(images, 255)
  for wrong in (noise, blank):
    acc = _acc(shapes_score.score_images(wrong, captions))
    assert acc["colour_accuracy"] <= 0.05 and acc["position_accuracy"] <= 0.05


def test_swapped_relation_scores_zero_position():
  rng = np.random.default_rng(0)
  pairs = [("a red circle to the left of a blue square",
            "a red circle to the right of a blue square"),
           ("a green triangle above an orange circle", "a green triangle below an orange circle")]
  for drawn, asked in pairs:
    images = np.stack([shapes.render(drawn, rng) for _ in range(20)])
    report = shapes_score.score_images(images, [asked] * 20)
    assert report["position_accuracy"] == 0.0 and report["colour_accuracy"] == 1.0


def test_wrong_colour_and_count():
  rng = np.random.default_rng(0)
  red = shapes.render("two red circles", rng)
  record = shapes_score.score_image(red, "two blue circles")
  assert not record["colour"] and not record["count"]
  record = shapes_score.score_image(red, "three red circles")
  assert record["colour"] and not record["count"]
  assert record["position"] is None and record["found"] == {"red": 2}
  with pytest.raises(ValueError, match="images but"):
    shapes_score.score_images(red[None], ["a", "b"])
