"""The grain pipeline: deterministic batches, exact resume with worker processes, host shards,
caption dropout."""
import numpy as np
import ml_collections
import pytest

from li_dit import config_lib
from li_dit.data import pipeline
from li_dit.data import shapes
from li_dit.text import conditioning


def _input_config(**overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config().input
  config.update({**dict(source="shapes", image_size=32, batch_size=8, num_workers=0),
                 **overrides})
  return config


def _captions():
  return conditioning.CaptionIds(shapes.train_captions(0) + [""])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batches_are_deterministic_and_typed():
  a = _take(iter(pipeline.make_train_dataset(_input_config(), _captions())), 2)
  b = _take(iter(pipeline.make_train_dataset(_input_config(), _captions())), 2)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["caption_id"].shape == (8,)
  c = _take(iter(pipeline.make_train_dataset(_input_config(seed=1), _captions())), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_iterator_state_is_exact(num_workers):
  config = _input_config(num_workers=num_workers)
  it = iter(pipeline.make_train_dataset(config, _captions()))
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(pipeline.make_train_dataset(config, _captions()))
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 3)):
    _assert_same(want, got)


def test_hosts_read_disjoint_shards():
  config = _input_config(batch_size=16)
  host0 = next(iter(pipeline.make_train_dataset(config, _captions(), 0, 2)))
  host1 = next(iter(pipeline.make_train_dataset(config, _captions(), 1, 2)))
  assert host0["image"].shape[0] == host1["image"].shape[0] == 8
  flat0 = {img.tobytes() for img in host0["image"]}
  assert not flat0 & {img.tobytes() for img in host1["image"]}
  with pytest.raises(ValueError, match="does not divide over 3 hosts"):
    pipeline.make_train_dataset(config, _captions(), 0, 3)


def test_caption_dropout_gives_the_null_prompt():
  ids = _captions()
  null_id = ids("")["caption_id"]
  batches = _take(iter(pipeline.make_train_dataset(
      _input_config(batch_size=50, caption_dropout=0.3), ids)), 4)
  rate = np.mean(np.concatenate([b["caption_id"] for b in batches]) == null_id)
  assert 0.2 < rate < 0.4
  none = next(iter(pipeline.make_train_dataset(_input_config(caption_dropout=0.0), ids)))
  assert not np.any(none["caption_id"] == null_id)
  with pytest.raises(KeyError, match="not in the cached feature table"):
    ids("a caption nobody cached")
