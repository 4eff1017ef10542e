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
from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags
from etils import epath

from li_dit.data import images
from li_dit.data import records
from li_dit.data import shapes

SOURCES = ("shapes", "tfds")
REASONS = records.REASONS


class TfdsSource:
  """Records of a dataset built by tools/build_dataset.py, as {"image": bytes, "captions"}.

  Opened lazily (in each worker process) through `tfds.data_source`, images left encoded.
  """

  def __init__(self, name: str, data_dir: str, split: str = "train"):
    self.name, self.data_dir, self.split = name, data_dir, split
    self._source = None
    self.num_records = len(self._open())

  def _open(self):
    if self._source is None:
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      try:
        sources = tfds.data_source(self.name, data_dir=self.data_dir,
                                   decoders={"image": tfds.decode.SkipDecoding()})
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
    record = self._open()[int(index)]
    return {"image": record["image"],
            "captions": [c.decode("utf-8") if isinstance(c, bytes) else c
                         for c in record["captions"]]}

  def sizes(self) -> np.ndarray:
    """int32 [N,2] (width, height) of every record, in the dataset's order.

    build_dataset writes them next to the shards, so bucketing reads no image.
    """
    path = epath.Path(str(self._open().dataset_info.data_dir)) / "sizes.npy"
    if not path.exists():
      raise ValueError(f"{path} is missing: rebuild the dataset with tools/build_dataset.py")
    with path.open("rb") as f:
      sizes = np.load(f)
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
                                             seed=input_config.data_seed, split=split))
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
    return shapes.train_captions(input_config.data_seed)
  source = make_source(input_config)
  return sorted({c for i in range(len(source)) for c in source[i]["captions"]})


def bucket_shapes(input_config: ml_collections.ConfigDict) -> tuple[tuple[int, int], ...]:
  """The (height, width) of every bucket: config.input.buckets, or one square image_size."""
  if input_config.buckets:
    return tuple((int(h), int(w)) for h, w in input_config.buckets)
  return ((input_config.image_size, input_config.image_size),)


class BucketBatches:
  """Global batch index -> (bucket, record indices), a pure function of the seed.

  Epoch e is a seeded permutation of all records; each bucket's records, in permutation order,
  are cut into batches of `batch_size` (a bucket's last partial batch of the epoch is dropped),
  and the batches are ordered by where their last record falls in the permutation, which
  interleaves the buckets in proportion to their sizes. Every epoch has the same number of
  batches (it depends only on the bucket counts).
  """

  def __init__(self, bucket_of_record: np.ndarray, num_buckets: int, batch_size: int,
               seed: int):
    self.bucket_of_record = np.asarray(bucket_of_record, np.int32)
    self.batch_size = batch_size
    self.seed = seed
    counts = np.bincount(self.bucket_of_record, minlength=num_buckets)
    self.batches_per_epoch = int(np.sum(counts // batch_size))
    if self.batches_per_epoch == 0:
      raise ValueError(f"config.input.batch_size={batch_size} is larger than every bucket "
                       f"(records per bucket: {counts.tolist()})")

  @functools.lru_cache(maxsize=2)
  def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    order = np.random.default_rng([self.seed, epoch]).permutation(len(self.bucket_of_record))
    buckets = self.bucket_of_record[order]
    batches, ends, bucket_ids = [], [], []
    for b in np.unique(buckets):
      positions = np.flatnonzero(buckets == b)
      full = len(positions) // self.batch_size * self.batch_size
      chunks = positions[:full].reshape(-1, self.batch_size)
      batches.append(order[chunks])
      ends.append(chunks[:, -1])
      bucket_ids.append(np.full(len(chunks), b, np.int32))
    by_end = np.argsort(np.concatenate(ends), kind="stable")
    return np.concatenate(batches)[by_end], np.concatenate(bucket_ids)[by_end]

  def __call__(self, index: int) -> tuple[int, int, np.ndarray]:
    """(epoch, bucket, int64 [batch_size] record indices) of global batch `index`."""
    epoch, k = divmod(int(index), self.batches_per_epoch)
    batches, bucket_ids = self._epoch(epoch)
    return epoch, int(bucket_ids[k]), batches[k]


class LoadBatch(grain.transforms.Map):
  """Local batch index -> this host's rows of the global batch, decoded, as numpy arrays.

  Images stay uint8 on the host (4x fewer bytes to move); the train step scales them.
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
    pixels, captions, skipped = [], [], np.zeros((len(rows), len(REASONS)), np.int32)
    for row, index in enumerate(rows):
      record = self.source[index]
      try:
        image = record["image"]
        if isinstance(image, bytes):
          image = images.decode_rgb(image, self.min_size)
        pixels.append(images.resize_center_crop(image, height, width))
      except images.BadInput as e:
        skipped[row, REASONS.index(e.reason)] = 1
        pixels.append(None)
      # Caption choice and dropout draw from (seed, epoch, record): host- and worker-independent.
      rng = np.random.default_rng([self.batches.seed, epoch, int(index)])
      caption = record["captions"][rng.integers(len(record["captions"]))]
      captions.append("" if rng.random() < self.caption_dropout else caption)
    good = [i for i, p in enumerate(pixels) if p is not None]
    if not good:
      raise ValueError(f"every record of a batch failed to decode (records {rows.tolist()}): "
                       "is the dataset readable?")
    for i, p in enumerate(pixels):
      if p is None:  # Replaced by the next good row (cyclically), image and caption.
        j = min((g for g in good if g > i), default=good[0])
        pixels[i], captions[i] = pixels[j], captions[j]
    text = [self.text_transform(c) for c in captions]
    return {"image": np.stack(pixels), "skipped": skipped,
            **{k: np.stack([t[k] for t in text]) for k in text[0]}}


def make_train_dataset(input_config: ml_collections.ConfigDict,
                       text_transform: Callable[[str], dict[str, np.ndarray]],
                       process_index: int = 0, process_count: int = 1,
                       start_batch: int = 0) -> grain.IterDataset:
  """This host's share of the training batches, as a grain IterDataset of numpy dicts.

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
  if len(shapes_hw) == 1:
    bucket_of_record = np.zeros(len(source), np.int32)
  else:
    sizes = source.sizes()
    bucket_of_record = images.nearest_buckets(sizes, shapes_hw)
  batches = BucketBatches(bucket_of_record, len(shapes_hw), input_config.batch_size,
                          input_config.seed)
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
  return iter_ds
