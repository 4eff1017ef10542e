"""The grain pipeline: the epoch shuffle and bucketed batches at scale, deterministic batches,
exact resume with worker processes, host shards of the same global batches, starting at a batch,
caption dropout."""
import os
import tracemalloc

import numpy as np
import ml_collections
import pytest

from li_dit import config_lib
from li_dit.data import build
from li_dit.data import order
from li_dit.data import pipeline
from li_dit.data.synthetic import shapes
from li_dit.text import transforms

import image_fixtures as fx


def _input_config(**overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config().input
  config.update({**dict(source="shapes", image_size=32, batch_size=8, num_workers=0),
                 **overrides})
  return config


def _captions():
  return transforms.CaptionIds(shapes.train_captions(0) + [""])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _first(dataset, n, state=None):
  """The first `n` batches of a fresh iterator over `dataset` (from `state`, if given); the
  iterator is closed before this returns."""
  with iter(dataset) as iterator:
    if state is not None:
      iterator.set_state(state)
    return _take(iterator, n)


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


@pytest.mark.parametrize("n", [1, 2, 3, 17, 1000, 4097])
def test_index_shuffle_is_a_seeded_permutation(n):
  positions = np.arange(n)
  a = order.IndexShuffle(n, (0, 0))(positions)
  assert a.dtype == np.int64 and np.array_equal(np.sort(a), positions)
  if n >= 1000:
    b = order.IndexShuffle(n, (0, 1))(positions)
    assert np.mean(a == b) < 0.01 and np.mean(a == positions) < 0.01
    assert abs(np.corrcoef(positions, a)[0, 1]) < 0.1
    # Pointwise: any subset of positions maps as the whole does.
    np.testing.assert_array_equal(order.IndexShuffle(n, (0, 0))(positions[::-7]), a[::-7])


def test_bucket_batches_cover_each_epoch_once_whatever_the_window():
  rng = np.random.default_rng(0)
  bucket_of_record = rng.choice(3, size=1000, p=[0.7, 0.25, 0.05])  # bucket 2: rare
  whole = order.BucketBatches(1000, 8, 3, bucket_of_record, 3)
  windowed = order.BucketBatches(1000, 8, 3, bucket_of_record, 3, window=37)
  assert whole.batches_per_epoch == sum(np.bincount(bucket_of_record) // 8) == 124
  epochs = []
  for epoch in range(2):
    seen = []
    for k in range(epoch * 124, (epoch + 1) * 124):
      e, bucket, records = whole(k)
      assert e == epoch and len(records) == 8 and np.all(bucket_of_record[records] == bucket)
      # Windows change the cost, not the result: batches span window borders exactly.
      e2, bucket2, records2 = windowed(k)
      assert (e2, bucket2) == (e, bucket) and np.array_equal(records2, records)
      seen.append(records)
    seen = np.concatenate(seen)
    assert len(np.unique(seen)) == len(seen) == 992  # each bucket drops < 8 records
    epochs.append(seen)
  assert not np.array_equal(epochs[0], epochs[1])
  # The buckets interleave: the rare bucket's batches are spread over the epoch.
  rare = [k for k in range(124) if whole(k)[1] == 2]
  assert len(rare) == 6 and rare[-1] - rare[0] > 60


def test_bucket_batches_memory_does_not_grow_with_the_dataset():
  # 50M records: a permutation would hold 400 MB; the windowed epoch holds a few windows.
  tracemalloc.start()
  try:
    batches = order.BucketBatches(50_000_000, 256, 0, window=1 << 16)
    records = np.concatenate([batches(k)[2] for k in range(0, 190_000, 9_973)])
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 16e6, peak
  assert len(np.unique(records)) == len(records) and records.max() < 50_000_000


def test_batches_are_deterministic_and_typed():
  a = _first(pipeline.make_train_dataset(_input_config(), _captions()), 2)
  b = _first(pipeline.make_train_dataset(_input_config(), _captions()), 2)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["caption_id"].shape == (8,)
  c = _first(pipeline.make_train_dataset(_input_config(seed=1), _captions()), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_iterator_state_is_exact(num_workers):
  config = _input_config(num_workers=num_workers)
  with iter(pipeline.make_train_dataset(config, _captions())) as it:
    _take(it, 3)
    state = it.get_state()
    expected = _take(it, 3)
  for want, got in zip(expected, _first(pipeline.make_train_dataset(config, _captions()), 3,
                                        state)):
    _assert_same(want, got)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_their_rows_of_the_same_global_batches(hosts):
  # Host p's k-th batch is rows [p*B/P, (p+1)*B/P) of global batch k, caption dropout included:
  # the global batches (and so the per-example noise of the train step) do not depend on the
  # number of hosts.
  config = _input_config(batch_size=16, caption_dropout=0.3)
  one_host = _first(pipeline.make_train_dataset(config, _captions()), 3)
  shares = [_first(pipeline.make_train_dataset(config, _captions(), p, hosts), 3)
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
      stream = _first(pipeline.make_train_dataset(config, _captions(), p, hosts), 5)
      late = _first(pipeline.make_train_dataset(config, _captions(), p, hosts, start_batch=3), 2)
      for want, got in zip(stream[3:], late):
        _assert_same(want, got)


def test_caption_dropout_gives_the_null_prompt():
  ids = _captions()
  null_id = ids("")["caption_id"]
  batches = _first(pipeline.make_train_dataset(
      _input_config(batch_size=50, caption_dropout=0.3), ids), 4)
  rate = np.mean(np.concatenate([b["caption_id"] for b in batches]) == null_id)
  assert 0.2 < rate < 0.4
  none, = _first(pipeline.make_train_dataset(_input_config(caption_dropout=0.0), ids), 1)
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
  transform = transforms.CaptionIds(captions)
  config = _tfds_config(data_dir, num_workers=2)
  with iter(pipeline.make_train_dataset(config, transform)) as it:
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
  for a, b in zip(expected, _first(pipeline.make_train_dataset(config, transform), 9, state)):
    _assert_same(a, b)
  # Worker processes change nothing.
  in_process = _first(pipeline.make_train_dataset(_tfds_config(data_dir), transform), 12)
  for a, b in zip(seen + expected, in_process):
    _assert_same(a, b)


def test_undecodable_record_is_replaced_and_counted(tmp_path):
  fx.write_rotted_dataset(str(tmp_path), "broken", num=8, rotten=5)
  captions = [f"grey {i}" for i in range(8)]
  config = _input_config(source="tfds", tfds_name="broken", data_dir=str(tmp_path),
                         batch_size=4, caption_dropout=0.0)
  batches = _first(pipeline.make_train_dataset(config, transforms.CaptionIds(captions)), 2)
  skipped = sum(b["skipped"] for b in batches).sum(axis=0)
  assert skipped[pipeline.REASONS.index("unreadable_image")] == 1 and skipped.sum() == 1
  ids = [int(c) for b in batches for c in b["caption_id"]]
  assert 5 not in ids and len(ids) == 8  # Full batches: its row holds another record.
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3)
