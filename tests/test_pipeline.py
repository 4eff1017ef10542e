"""The grain pipeline: deterministic batches, exact resume with worker processes, host shards
of the same global batches, starting at a batch, caption dropout."""
import os

import numpy as np
import ml_collections
import pytest

from li_dit import config_lib
from li_dit.data import build
from li_dit.data import pipeline
from li_dit.data import shapes
from li_dit.text import conditioning

import image_fixtures as fx


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


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_their_rows_of_the_same_global_batches(hosts):
  # Host p's k-th batch is rows [p*B/P, (p+1)*B/P) of global batch k, caption dropout included:
  # the global batches (and so the per-example noise of the train step) do not depend on the
  # number of hosts.
  config = _input_config(batch_size=16, caption_dropout=0.3)
  one_host = _take(iter(pipeline.make_train_dataset(config, _captions())), 3)
  shares = [_take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts)), 3)
            for p in range(hosts)]
  for k, want in enumerate(one_host):
    assert shares[0][k]["image"].shape[0] == 16 // hosts
    _assert_same(want, {key: np.concatenate([s[k][key] for s in shares]) for key in want})
  with pytest.raises(ValueError, match="does not divide over 3 hosts"):
    pipeline.make_train_dataset(config, _captions(), 0, 3)


def test_start_batch_continues_the_stream():
  config = _input_config(batch_size=8)
  for hosts in (1, 2):
    for p in range(hosts):
      stream = _take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts)), 5)
      late = _take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts,
                                                    start_batch=3)), 2)
      for want, got in zip(stream[3:], late):
        _assert_same(want, got)


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


# -- datasets built by tools/build_dataset.py ------------------------------------------------------

_BUCKETS = ((32, 64), (48, 48), (64, 32))  # (height, width): wide, square, tall.


def _bucketed_dataset(root) -> tuple[str, list[str], dict[str, tuple[int, int]]]:
  """42 images of three aspect ratios built into the TFDS dataset "mixed"."""
  folder = os.path.join(root, "in")
  sizes = fx.write_aspect_folder(folder, 42)
  build.build([folder], os.path.join(root, "data"), "mixed", examples_per_shard=10, workers=1)
  return os.path.join(root, "data"), sorted(sizes), sizes


def _tfds_config(data_dir, **overrides):
  return _input_config(**{**dict(source="tfds", tfds_name="mixed", data_dir=data_dir,
                                 buckets=_BUCKETS, batch_size=4, caption_dropout=0.0),
                          **overrides})


def test_buckets_one_shape_per_batch_and_exact_resume_with_two_workers(tmp_path):
  data_dir, captions, sizes = _bucketed_dataset(str(tmp_path))
  transform = conditioning.CaptionIds(captions)
  config = _tfds_config(data_dir, num_workers=2)
  it = iter(pipeline.make_train_dataset(config, transform))
  seen = _take(it, 3)
  state = it.get_state()
  expected = _take(it, 9)  # Past the end of the first epoch (42 // 4 = 10 batches).
  for batch in seen + expected:
    height, width = batch["image"].shape[1:3]
    assert (height, width) in _BUCKETS
    for cid in batch["caption_id"]:
      w, h = sizes[captions[cid]]
      assert (w > h, w == h, w < h) == (width > height, width == height, width < height)
    assert batch["skipped"].sum() == 0
  # Both captions of the records are used.
  used = {captions[c] for b in seen + expected for c in b["caption_id"]}
  assert any(c.startswith("another") for c in used) and any(c.startswith("picture") for c in used)
  resumed = iter(pipeline.make_train_dataset(config, transform))
  resumed.set_state(state)
  for a, b in zip(expected, _take(resumed, 9)):
    _assert_same(a, b)
  # Worker processes change nothing.
  in_process = _take(iter(pipeline.make_train_dataset(_tfds_config(data_dir), transform)), 12)
  for a, b in zip(seen + expected, in_process):
    _assert_same(a, b)


def test_undecodable_record_is_replaced_and_counted(tmp_path):
  fx.write_rotted_dataset(str(tmp_path), "broken", num=8, rotten=5)
  captions = [f"grey {i}" for i in range(8)]
  config = _input_config(source="tfds", tfds_name="broken", data_dir=str(tmp_path),
                         batch_size=4, caption_dropout=0.0)
  batches = _take(iter(pipeline.make_train_dataset(config, conditioning.CaptionIds(captions))), 2)
  skipped = sum(b["skipped"] for b in batches).sum(axis=0)
  assert skipped[pipeline.REASONS.index("unreadable_image")] == 1 and skipped.sum() == 1
  ids = [int(c) for b in batches for c in b["caption_id"]]
  assert 5 not in ids and len(ids) == 8  # Full batches: its row holds another record.
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3)
