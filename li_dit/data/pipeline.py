"""The grain input pipeline: global batch index -> record indices -> this host's rows, decoded.

Global batch k is a pure function of (seed, k): `BucketBatches` shuffles every epoch with a
seeded permutation, groups the records by aspect-ratio bucket and cuts each bucket's sequence
into batches, so every batch holds one bucket's shape. `LoadBatch` reads this host's rows of a
batch, decodes and resizes them, picks one of each record's captions, applies caption dropout
and the text transform (tokenization for each LLM) -- inside grain's worker processes. Hence:

  * the iterator state saved in a checkpoint (a batch position) restores exactly the batches an
    uninterrupted run would have seen, with any number of worker processes;
  * global batch k holds the same examples in the same rows whatever the number of hosts: host
    p's k-th batch is rows [p*B/P, (p+1)*B/P) of it, the rows `sharding.host_to_global` places
    on p's devices.

A record that cannot be decoded is replaced by another row of the same batch and counted under
its reason in the batch's "skipped" array ([rows, len(records.REASONS)]), which the train step
sums over the global batch; training never stops for bad data. Transforms are module-level
classes because grain pickles them into its worker processes.
"""
from __future__ import annotations

import functools
import json
import os
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from li_dit.data import images
from li_dit.data import loader
from li_dit.data import records
from li_dit.data import shapes
from li_dit.io import paths

SOURCES = ("shapes", "tfds")
REASONS = records.REASONS


class TfdsSource:
  """Records of a dataset built by tools/build_dataset.py, as {"image": bytes, "captions", "key"};
  or of a dataset of latents (tools/encode_latents.py), as {"latent_mean", "latent_logvar",
  "captions", "key"}.

  Opened lazily (in each worker process) through TFDS, images left encoded.
  """

  def __init__(self, name: str, data_dir: str, split: str = "train"):
    self.name, self.data_dir, self.split = name, data_dir, split
    self._source = None
    self.num_records = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        builder = tfds.builder(self.name, data_dir=self.data_dir)
        decoders = ({"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features
                    else None)
        sources = builder.as_data_source(decoders=decoders)
      except Exception as e:  # TFDS raises several types for a missing or broken dataset.
        raise ValueError(f"config.input: cannot open TFDS dataset {self.name!r} in "
                         f"{self.data_dir!r} (built by tools/build_dataset.py?): {e}") from e
      if self.split not in sources:
        raise ValueError(f"config.input.split: {self.name!r} has splits {sorted(sources)}, "
                         f"not {self.split!r}")
      self._source = sources[self.split]
    return self._source

  def __len__(self) -> int:
    return self.num_records

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = dict(self._open()[int(index)])
    for size in ("width", "height"):  # In sizes(), for bucketing.
      record.pop(size, None)
    record["captions"] = [c.decode("utf-8") if isinstance(c, bytes) else c
                          for c in record["captions"]]
    if isinstance(record.get("key"), bytes):
      record["key"] = record["key"].decode("utf-8")
    return record

  @property
  def directory(self) -> epath.Path:
    """The dataset's folder (data_dir/name/version): shards and metadata."""
    return epath.Path(str(self._open().dataset_info.data_dir))

  def read_json(self, filename: str) -> Any:
    """The JSON file `filename` of the dataset's folder, or None when it has none."""
    path = self.directory / filename
    return json.loads(path.read_text()) if path.exists() else None

  def sizes(self) -> np.ndarray:
    """int32 [N,2] (width, height) of every record, in the dataset's order.

    build_dataset writes them next to the shards, so bucketing reads no image.
    """
    path = self.directory / "sizes.npy"
    if not path.exists():
      raise ValueError(f"{path} is missing: rebuild the dataset with tools/build_dataset.py")
    if paths.is_remote(path):  # gs:// and other remote files are read whole.
      with path.open("rb") as f:
        sizes = np.load(f)
    else:  # Local: mapped, so bucketing a billion records never holds 8 GB of sizes.
      sizes = np.load(os.fspath(path), mmap_mode="r")
    if len(sizes) != self.num_records:
      raise ValueError(f"{path}: {len(sizes)} sizes for {self.num_records} records")
    return sizes

  def __getstate__(self):  # The opened source stays in the process that opened it.
    return dict(self.__dict__, _source=None)


class ShapesRecords:
  """The synthetic shapes source as {"image": uint8 array, "captions": [caption]} records."""

  def __init__(self, source: shapes.ShapesSource):
    self.source = source

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    record = self.source[index]
    return {"image": record["image"], "captions": [record["caption"]]}

  def sizes(self) -> np.ndarray:
    return np.full((len(self.source), 2), self.source.image_size, np.int32)


def make_source(input_config: ml_collections.ConfigDict, split: str = "train"):
  """The random-access record source named by `input_config.source`."""
  if input_config.source == "shapes":
    return ShapesRecords(shapes.ShapesSource(image_size=input_config.image_size,
                                             seed=input_config.data_seed, split=split,
                                             relations=input_config.relations))
  if input_config.source == "tfds":
    return TfdsSource(input_config.tfds_name, input_config.data_dir, input_config.split)
  raise ValueError(f"config.input.source: unknown source {input_config.source!r}; "
                   f"choose one of {SOURCES}")


def source_captions(input_config: ml_collections.ConfigDict) -> list[str]:
  """Every caption the training source can produce (for cached text features).

  A TFDS dataset is read once for its captions: fine for small sets (the emoji set: 3,655
  records, seconds); large ones encode online (config.text.encode='online').
  """
  if input_config.source == "shapes":
    return shapes.train_captions(input_config.data_seed, input_config.relations)
  source = make_source(input_config)
  return sorted({c for i in range(len(source)) for c in source[i]["captions"]})


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


class LoadBatch(grain.transforms.Map):
  """Local batch index -> this host's rows of the global batch, decoded, as numpy arrays.

  Images stay uint8 on the host (4x fewer bytes to move); the train step scales them. Records of
  a dataset of latents give their latents in place of the image.
  """

  def __init__(self, source, batches: BucketBatches, shapes_hw: Sequence[tuple[int, int]],
               text_transform: Callable[[str], dict[str, np.ndarray]],
               caption_dropout: float, rows: slice, start_batch: int, min_size: int):
    self.source = source
    self.batches = batches
    self.shapes_hw = tuple(shapes_hw)
    self.text_transform = text_transform
    self.caption_dropout = caption_dropout
    self.rows = rows
    self.start_batch = start_batch
    self.min_size = min_size

  def map(self, local_index: int) -> dict[str, np.ndarray]:
    epoch, bucket, indices = self.batches(self.start_batch + int(local_index))
    height, width = self.shapes_hw[bucket]
    rows = indices[self.rows]
    examples, captions, skipped = [], [], np.zeros((len(rows), len(REASONS)), np.int32)
    for row, index in enumerate(rows):
      record = self.source[index]
      try:
        examples.append(self._example(record, height, width))
      except images.BadInput as e:
        skipped[row, REASONS.index(e.reason)] = 1
        examples.append(None)
      # Caption choice and dropout draw from (seed, epoch, record): host- and worker-independent.
      rng = np.random.default_rng([self.batches.seed, epoch, int(index)])
      caption = record["captions"][rng.integers(len(record["captions"]))]
      captions.append("" if rng.random() < self.caption_dropout else caption)
    good = [i for i, x in enumerate(examples) if x is not None]
    if not good:
      raise ValueError(f"every record of a batch failed to decode (records {rows.tolist()}): "
                       "is the dataset readable?")
    for i, x in enumerate(examples):
      if x is None:  # Replaced by the next good row (cyclically), image and caption.
        j = min((g for g in good if g > i), default=good[0])
        examples[i], captions[i] = examples[j], captions[j]
    text = [self.text_transform(c) for c in captions]
    return {**{k: np.stack([x[k] for x in examples]) for k in examples[0]}, "skipped": skipped,
            **{k: np.stack([t[k] for t in text]) for k in text[0]}}

  def _example(self, record: dict[str, Any], height: int, width: int) -> dict[str, np.ndarray]:
    """A record's image, decoded and fitted to height x width: {"image": uint8 [h,w,3]}; or its
    cached latents (encoded at that size), as they are. Raises images.BadInput."""
    if records.LATENT_MEAN in record:
      return {k: record[k] for k in (records.LATENT_MEAN, records.LATENT_LOGVAR)}
    image = record["image"]
    if isinstance(image, bytes):
      image = images.decode_rgb(image, self.min_size)
    return {"image": images.resize_center_crop(image, height, width)}


def make_train_dataset(input_config: ml_collections.ConfigDict,
                       text_transform: Callable[[str], dict[str, np.ndarray]],
                       process_index: int = 0, process_count: int = 1,
                       start_batch: int = 0) -> loader.Dataset:
  """This host's share of the training batches: a grain pipeline of numpy dicts, whose iterators
  their user closes (`with iter(dataset) as batches:`; see li_dit.data.loader).

  Args:
    input_config: `config.input` (source and its fields, image_size or buckets, batch_size
      (global), caption_dropout, seed, num_workers, prefetch_buffer, min_size).
    text_transform: caption -> dict of arrays (tokens or caption ids), picklable.
    process_index, process_count: this host and the number of hosts.
    start_batch: the first global batch to read (0: from the start).
  """
  if input_config.batch_size % process_count:
    raise ValueError(f"config.input.batch_size={input_config.batch_size} does not divide over "
                     f"{process_count} hosts")
  local = input_config.batch_size // process_count
  source = make_source(input_config, "train")
  shapes_hw = bucket_shapes(input_config)
  bucket_of_record = (None if len(shapes_hw) == 1
                      else images.nearest_buckets(source.sizes(), shapes_hw))
  batches = BucketBatches(len(source), input_config.batch_size, input_config.seed,
                          bucket_of_record, len(shapes_hw))
  load = LoadBatch(source, batches, shapes_hw, text_transform, input_config.caption_dropout,
                   slice(process_index * local, (process_index + 1) * local), start_batch,
                   input_config.min_size)
  ds = grain.MapDataset.range(2**62).map(load)
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if input_config.num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks) nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_config.num_workers,
        per_worker_buffer_size=input_config.prefetch_buffer))
  return loader.Dataset(iter_ds)
