"""The grain input pipeline: global batch index -> record indices -> this host's rows, decoded.

Global batch k is a pure function of (seed, k): `li_dit.data.order.BucketBatches` shuffles every
epoch with a seeded permutation, groups the records by aspect-ratio bucket and cuts each bucket's
sequence into batches, so every batch holds one bucket's shape. `LoadBatch` reads this host's
rows of a batch from the source (li_dit.data.sources), decodes and resizes them, picks one of
each record's captions, applies caption dropout and the text transform (tokenization for each
LLM) -- inside grain's worker processes. Hence:

  * the iterator state saved in a checkpoint (a batch position) restores exactly the batches an
    uninterrupted run would have seen, with any number of worker processes;
  * global batch k holds the same examples in the same rows whatever the number of hosts: host
    p's k-th batch is rows [p*B/P, (p+1)*B/P) of it, the rows `sharding.host_to_global` places
    on p's devices.

A record that cannot be decoded is replaced by another row of the same batch and counted under
its reason in the batch's "skipped" array ([rows, len(records.REASONS)]), which the train step
sums over the global batch; training never stops for bad data. Transforms are module-level
classes because grain pickles them into its worker processes. Iterators over the pipeline are
closed by whoever opens them (li_dit.data.loader).
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import grain
import ml_collections
import numpy as np
from absl import flags

from li_dit.data import images
from li_dit.data import loader
from li_dit.data import order
from li_dit.data import records
from li_dit.data import sources

REASONS = records.REASONS


class LoadBatch(grain.transforms.Map):
  """Local batch index -> this host's rows of the global batch, decoded, as numpy arrays.

  Images stay uint8 on the host (4x fewer bytes to move); the train step scales them. Records of
  a dataset of latents give their latents in place of the image.
  """

  def __init__(self, source, batches: order.BucketBatches, shapes_hw: Sequence[tuple[int, int]],
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
  source = sources.make_source(input_config, "train")
  shapes_hw = order.bucket_shapes(input_config)
  bucket_of_record = (None if len(shapes_hw) == 1
                      else images.nearest_buckets(source.sizes(), shapes_hw))
  batches = order.BucketBatches(len(source), input_config.batch_size, input_config.seed,
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
    iter_ds = iter_ds.mp_prefetch(
        grain.MultiprocessingOptions(num_workers=input_config.num_workers,
                                     per_worker_buffer_size=input_config.prefetch_buffer),
        worker_init_fn=loader.exit_with_parent)
  return loader.Dataset(iter_ds)
