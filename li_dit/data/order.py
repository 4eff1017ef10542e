"""The order of the training records: global batch index -> (bucket, record indices).

Global batch k is a pure function of (seed, k): `BucketBatches` shuffles every epoch with a
seeded permutation (`IndexShuffle`, a Feistel network evaluated pointwise), groups the records
by aspect-ratio bucket (`bucket_shapes`) and cuts each bucket's sequence into batches, so every
batch holds one bucket's shape. Memory does not grow with the dataset beyond a byte of bucket id
per record.
"""
from __future__ import annotations

import functools
from typing import Sequence

import ml_collections
import numpy as np


def bucket_shapes(input_config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """The (height, width) of every bucket: config.input.buckets, or one square image_size."""
  if input_config.buckets:
    return tuple((int(h), int(w)) for h, w in input_config.buckets)
  return ((input_config.image_size, input_config.image_size),)


def _mix64(x: np.ndarray) -> np.ndarray:
  """splitmix64's finaliser: a fast bijective hash of uint64 (wraps on overflow by design)."""
  x = x ^ (x >> 30)
  x = x * 0xBF58476D1CE4E5B9
  x = x ^ (x >> 27)
  x = x * 0x94D049BB133111EB
  return x ^ (x >> 31)


class IndexShuffle:
  """A seeded pseudo-random permutation of [0, n) evaluated pointwise: O(1) memory per index.

  A balanced Feistel network on the 2h bits that cover n (a bijection of [0, 4^h)), with cycle
  walking (re-encrypt until the value falls below n, at most a few times as 4^h < 4n), which
  restricts it to a bijection of [0, n). The same idea as grain's index_shuffle, vectorised.
  """

  def __init__(self, n: int, seed: Sequence[int], rounds: int = 6):
    self.n = int(n)
    self.half_bits = max(1, -(-max(self.n - 1, 1).bit_length() // 2))
    self.keys = np.random.default_rng(list(seed)).integers(
        0, np.iinfo(np.uint64).max, size=rounds, dtype=np.uint64, endpoint=True)

  def _feistel(self, x: np.ndarray) -> np.ndarray:
    mask = np.uint64((1 << self.half_bits) - 1)
    left, right = x >> np.uint64(self.half_bits), x & mask
    for key in self.keys:
      left, right = right, left ^ (_mix64(right ^ key) & mask)
    return (left << np.uint64(self.half_bits)) | right

  def __call__(self, positions: np.ndarray) -> np.ndarray:
    """int [k] positions in [0, n) -> int64 [k] their images under the permutation."""
    out = self._feistel(np.asarray(positions, np.uint64))
    outside = np.flatnonzero(out >= self.n)
    while len(outside):
      out[outside] = self._feistel(out[outside])
      outside = outside[out[outside] >= self.n]
    return out.astype(np.int64)


class BucketBatches:
  """Global batch index -> (bucket, record indices), a pure function of the seed.

  Epoch e visits the records in the order of a seeded `IndexShuffle`; each bucket's records, in
  that order, are cut into batches of `batch_size` (a bucket's last partial batch of the epoch is
  dropped), and the batches are ordered by where their last record falls in the epoch, which
  interleaves the buckets in proportion to their sizes. Every epoch has the same number of
  batches (it depends only on the bucket counts).

  Memory does not grow with the dataset beyond the bucket ids (1 byte per record with several
  buckets, nothing with one): the epoch is evaluated in windows of `window` positions, a few of
  them cached, plus a [windows, buckets] table of counts that one pass over the epoch fills when
  the epoch starts (skipped with one bucket: then the counts are known). A billion records cost a
  1 GB bucket table and a pass of about a minute per epoch; a full permutation would be 8 GB.
  """

  def __init__(self, num_records: int, batch_size: int, seed: int,
               bucket_of_record: np.ndarray | None = None, num_buckets: int = 1,
               window: int = 1 << 20):
    self.num_records = int(num_records)
    self.batch_size = batch_size
    self.seed = seed
    self.window = window
    self.num_buckets = num_buckets
    if bucket_of_record is None:
      self.bucket_of_record = None
      counts = np.array([self.num_records])
    else:
      self.bucket_of_record = np.asarray(
          bucket_of_record, np.uint8 if num_buckets <= 256 else np.int32)
      counts = np.bincount(self.bucket_of_record, minlength=num_buckets)
    self.batches_per_epoch = int(np.sum(counts // batch_size))
    if self.batches_per_epoch == 0:
      raise ValueError(f"config.input.batch_size={batch_size} is larger than every bucket "
                       f"(records per bucket: {counts.tolist()})")
    self.num_windows = -(-self.num_records // window)

  @functools.lru_cache(maxsize=4)
  def _window(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 records, bucket ids) at positions [w*window, (w+1)*window) of the epoch."""
    positions = np.arange(w * self.window, min((w + 1) * self.window, self.num_records))
    records = IndexShuffle(self.num_records, (self.seed, epoch))(positions)
    if self.bucket_of_record is None:
      return records, np.zeros(len(records), np.uint8)
    return records, self.bucket_of_record[records]

  @functools.lru_cache(maxsize=2)
  def _plan(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """(int64 [windows+1, buckets] records of each bucket before each window,
    int64 [windows+1] batches ending before each window)."""
    if self.bucket_of_record is None:
      before = np.minimum(np.arange(self.num_windows + 1) * self.window, self.num_records)[:, None]
    else:
      per_window = [np.bincount(self._window(epoch, w)[1], minlength=self.num_buckets)
                    for w in range(self.num_windows)]
      before = np.concatenate([np.zeros((1, self.num_buckets), np.int64),
                               np.cumsum(per_window, axis=0)])
    full_batches = before // self.batch_size
    return before, np.sum(full_batches, axis=1)

  @functools.lru_cache(maxsize=4)
  def _window_batches(self, epoch: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(bucket, batch number within the bucket's stream) of the batches ending in window w, in
    the order of their last records."""
    before, _ = self._plan(epoch)
    buckets = self._window(epoch, w)[1]
    ends, bucket_ids, numbers = [], [], []
    for b in range(before.shape[1]):
      first, last = before[w, b] // self.batch_size, before[w + 1, b] // self.batch_size
      if last > first:
        number = np.arange(first, last)
        # Stream position of each batch's last record -> its position within the window.
        ends.append(np.flatnonzero(buckets == b)[(number + 1) * self.batch_size - 1 - before[w, b]])
        bucket_ids.append(np.full(len(number), b))
        numbers.append(number)
    order = np.argsort(np.concatenate(ends), kind="stable")
    return np.concatenate(bucket_ids)[order], np.concatenate(numbers)[order]

  def __call__(self, index: int) -> tuple[int, int, np.ndarray]:
    """(epoch, bucket, int64 [batch_size] record indices) of global batch `index`."""
    epoch, k = divmod(int(index), self.batches_per_epoch)
    before, batches_before = self._plan(epoch)
    w = int(np.searchsorted(batches_before, k, side="right")) - 1
    bucket_ids, numbers = self._window_batches(epoch, w)
    bucket, number = int(bucket_ids[k - batches_before[w]]), int(numbers[k - batches_before[w]])
    start, stop = number * self.batch_size, (number + 1) * self.batch_size
    # The batch's records may start in an earlier window (a rare bucket spans several).
    first = int(np.searchsorted(before[:, bucket], start, side="right")) - 1
    parts = []
    for v in range(first, w + 1):
      records, buckets = self._window(epoch, v)
      mine = records[buckets == bucket]
      parts.append(mine[max(start - before[v, bucket], 0):stop - before[v, bucket]])
    return epoch, bucket, np.concatenate(parts)
