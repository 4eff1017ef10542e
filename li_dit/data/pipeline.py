"""The grain input pipeline: source -> global shuffle -> caption dropout -> text inputs ->
batches -> this host's share of each global batch, optionally in worker processes.

Everything is a deterministic function of (seed, record index), so the iterator state saved in
a checkpoint (a position) restores exactly the batches an uninterrupted run would have seen, and
global batch k holds the same examples in the same rows whatever the number of hosts.
Transforms are module-level classes because grain pickles them into its worker processes.
"""
from __future__ import annotations

from typing import Any, Callable

import grain
import ml_collections
import numpy as np
from absl import flags

from li_dit.data import shapes

SOURCES = ("shapes",)


def make_source(input_config: ml_collections.ConfigDict, split: str = "train"):
  """The random-access source named by `input_config.source`."""
  if input_config.source == "shapes":
    return shapes.ShapesSource(image_size=input_config.image_size, seed=input_config.data_seed,
                               split=split)
  raise ValueError(f"config.input.source: unknown source {input_config.source!r}; "
                   f"choose one of {SOURCES}")


def source_captions(input_config: ml_collections.ConfigDict) -> list[str]:
  """Every caption the training source can produce (for cached text features)."""
  if input_config.source == "shapes":
    return shapes.train_captions(input_config.data_seed)
  raise ValueError(f"source {input_config.source!r} has no fixed caption set; "
                   "use config.text.encode='online'")


class CaptionDropout(grain.transforms.RandomMap):
  """Replaces the caption by "" (the null condition of classifier-free guidance) with prob p."""

  def __init__(self, probability: float):
    self.probability = probability

  def random_map(self, record: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    if rng.random() < self.probability:
      record = dict(record, caption="")
    return record


class ToModelInputs(grain.transforms.Map):
  """Record -> model inputs: the uint8 image and the text transform's arrays for its caption.

  Images stay uint8 on the host (4x fewer bytes to move); the train step scales them.
  """

  def __init__(self, text_transform: Callable[[str], dict[str, np.ndarray]]):
    self.text_transform = text_transform

  def map(self, record: dict[str, Any]) -> dict[str, np.ndarray]:
    return {"image": np.asarray(record["image"], np.uint8), **self.text_transform(record["caption"])}


def make_train_dataset(input_config: ml_collections.ConfigDict,
                       text_transform: Callable[[str], dict[str, np.ndarray]],
                       process_index: int = 0, process_count: int = 1,
                       start_batch: int = 0) -> grain.IterDataset:
  """This host's share of the training batches, as a grain IterDataset of numpy dicts.

  Host p's k-th batch is rows [p*B/P, (p+1)*B/P) of global batch k (B = batch_size, P =
  process_count), the rows `sharding.host_to_global` places on p's devices.

  Args:
    input_config: `config.input` (source, image_size, batch_size (global), caption_dropout,
      seed, num_workers, prefetch_buffer).
    text_transform: caption -> dict of arrays (tokens or caption ids), picklable.
    process_index, process_count: this host and the number of hosts.
    start_batch: the first global batch to read (0: from the start).
  """
  if input_config.batch_size % process_count:
    raise ValueError(f"config.input.batch_size={input_config.batch_size} does not divide over "
                     f"{process_count} hosts")
  local_batch = input_config.batch_size // process_count
  ds = grain.MapDataset.source(make_source(input_config, "train"))
  ds = ds.seed(input_config.seed).shuffle().repeat()
  # Dropout draws by global record index, so it does not depend on the number of hosts either.
  ds = ds.random_map(CaptionDropout(input_config.caption_dropout))
  ds = ds.map(ToModelInputs(text_transform))
  # Global batch k is local batches k*P .. k*P+P-1, one per host.
  ds = ds.batch(local_batch, drop_remainder=True)
  ds = ds[start_batch * process_count + process_index::process_count]
  iter_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0))
  if input_config.num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks) nobody parsed them.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    iter_ds = iter_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=input_config.num_workers,
        per_worker_buffer_size=input_config.prefetch_buffer))
  return iter_ds
