"""Datasets of latents: the training images encoded once by a frozen VAE.

  python tools/encode_latents.py --config C [--config.a.b=v ...] --out DATA_DIR --name NAME

`encode_dataset` reads the training data of a config (config.input: a dataset built by
tools/build_dataset.py, or the shapes source), fits every image to its aspect-ratio bucket as
the pipeline does, runs config.vae's encoder over it and writes a TFDS ArrayRecord dataset
(li_dit.data.build) whose records hold the encoder's Gaussian, mean and log-variance
[H/f, W/f, C], with the captions, in the source's order. The train step draws x0 from them as
online encoding does (li_dit.diffusion.image_space.ImageSpace.x0), so config.vae.sample_latents
keeps its meaning, and a float32 dataset trains as online encoding does, up to float rounding.
float16 (the default) halves the disk and the host-to-device bytes.

`latents.json` beside the shards records what the latents depend on: the VAE (its config and
the sha256 of its weights), the bucket shapes and the storage dtype. Training on the dataset
checks them against the run's config before anything is loaded (`check_dataset`).
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import json
import time
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from li_dit import config_lib
from li_dit.data import build, images, order, records, sources
from li_dit.diffusion import image_space
from li_dit.io import diffusers_vae

METADATA = "latents.json"
FORMAT_VERSION = 1
DTYPES = ("float16", "float32")


def features(channels: int, dtype: str):
  """The TFDS feature spec of a record of latents."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  # "bytes": TFDS stores a tensor of several unknown dimensions as raw bytes with its shape.
  latent = tfds.features.Tensor(shape=(None, None, channels), dtype=np.dtype(dtype),
                                encoding="bytes")
  return tfds.features.FeaturesDict({
      records.LATENT_MEAN: latent,
      records.LATENT_LOGVAR: latent,
      "width": np.int32,   # Of the image the latents decode to (its bucket), in pixels.
      "height": np.int32,
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "key": tfds.features.Text(),
  })


def vae_identity(path: str) -> dict[str, Any]:
  """What a dataset of latents records of its VAE: where it was, its config, its weights' hash."""
  config = diffusers_vae.read_vae_config(path)
  return {"path": path, "sha256": diffusers_vae.weights_digest(path),
          "config": dataclasses.asdict(config)}


def dataset_metadata(input_config: ml_collections.ConfigDict) -> dict[str, Any] | None:
  """latents.json of the training dataset, or None when it holds images."""
  if input_config.source != "tfds":
    return None
  return sources.TfdsSource(input_config.tfds_name, input_config.data_dir,
                            input_config.split).read_json(METADATA)


def check_dataset(config: ml_collections.ConfigDict, metadata: dict[str, Any]) -> None:
  """Raises ConfigError, naming the field, unless `config` can train on the dataset of latents
  described by `metadata` (its latents.json): the same VAE weights, the same bucket shapes."""
  dataset = f"dataset {config.input.tfds_name!r} in {config.input.data_dir!r}"
  if metadata.get("format_version") != FORMAT_VERSION:
    raise config_lib.ConfigError(
        f"config.input.tfds_name: {dataset} has {METADATA} format_version "
        f"{metadata.get('format_version')!r}; this li-dit reads {FORMAT_VERSION}")
  encoded_by = metadata["vae"]
  if not config.vae.path:
    raise config_lib.ConfigError(
        f"config.vae.path: empty, but {dataset} holds latents of the VAE in "
        f"{encoded_by['path']!r}; give config.vae.path that VAE (it decodes the samples)")
  try:
    digest = diffusers_vae.weights_digest(config.vae.path)
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"config.vae.path: {e}") from e
  if digest != encoded_by["sha256"]:
    raise config_lib.ConfigError(
        f"config.vae.path: the VAE in {config.vae.path!r} (weights sha256 {digest[:12]}...) is "
        f"not the one that encoded {dataset} ({encoded_by['path']!r}, sha256 "
        f"{encoded_by['sha256'][:12]}...)")
  buckets = [list(b) for b in order.bucket_shapes(config.input)]
  if buckets != metadata["buckets"]:
    raise config_lib.ConfigError(
        f"config.input.buckets / config.input.image_size: {dataset} was encoded at (height, "
        f"width) {metadata['buckets']}; this config asks for {buckets}")


class _BucketBatcher:
  """Collects fitted images per bucket and encodes them `batch_size` at a time (the last batch
  of a bucket padded with zeros: one compile per bucket shape)."""

  def __init__(self, moments, batch_size: int):
    self.moments = moments
    self.batch_size = batch_size
    self.waiting: dict[int, list[tuple[int, np.ndarray]]] = collections.defaultdict(list)

  def add(self, index: int, bucket: int, image: np.ndarray
          ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """Queues an image; returns the (index, mean, logvar) of a batch encoded now, if any."""
    self.waiting[bucket].append((index, image))
    return self._encode(bucket) if len(self.waiting[bucket]) == self.batch_size else []

  def flush(self) -> list[tuple[int, np.ndarray, np.ndarray]]:
    return [x for bucket in list(self.waiting) for x in self._encode(bucket)]

  def _encode(self, bucket: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
    queue = self.waiting.pop(bucket, [])
    if not queue:
      return []
    batch = np.zeros((self.batch_size,) + queue[0][1].shape, np.uint8)
    batch[:len(queue)] = [image for _, image in queue]
    mean, logvar = jax.device_get(self.moments(batch))
    return [(index, mean[i], logvar[i]) for i, (index, _) in enumerate(queue)]


def _shard_examples(source, indices: range, bucket_of: np.ndarray, shapes_hw, batcher,
                    dtype: str, min_size: int, skipped: collections.Counter
                    ) -> Iterator[tuple[dict[str, Any], int]]:
  """The records of latents of source records `indices`, in their order; the images that do
  not decode counted in `skipped` by reason."""
  pending: dict[int, dict[str, Any] | None] = {}  # Index -> its record (None: skipped).
  encoded: dict[int, tuple[np.ndarray, np.ndarray]] = {}
  order = iter(indices)
  next_index = next(order, None)

  def ready():
    nonlocal next_index
    while next_index is not None and next_index in pending and (
        pending[next_index] is None or next_index in encoded):
      example = pending.pop(next_index)
      if example is not None:
        mean, logvar = encoded.pop(next_index)
        example.update({records.LATENT_MEAN: mean.astype(dtype),
                        records.LATENT_LOGVAR: logvar.astype(dtype)})
        yield example, 0
      next_index = next(order, None)

  for index in indices:
    record = source[index]
    height, width = shapes_hw[bucket_of[index]]
    try:
      image = record["image"]
      if isinstance(image, bytes):
        image = images.decode_rgb(image, min_size)
      image = images.resize_center_crop(image, height, width)
    except images.BadInput as e:
      skipped[e.reason] += 1
      pending[index] = None
    else:
      pending[index] = {"width": width, "height": height, "captions": record["captions"],
                        "key": record.get("key") or f"{index}"}
      encoded.update((i, (m, v)) for i, m, v in batcher.add(index, bucket_of[index], image))
    yield from ready()
  encoded.update((i, (m, v)) for i, m, v in batcher.flush())
  yield from ready()


def encode_dataset(config: ml_collections.ConfigDict, out: str, name: str,
                   version: str = "1.0.0", num_records: int | None = None,
                   batch_size: int = 16, dtype: str = "float16",
                   examples_per_shard: int = 1000) -> dict[str, Any]:
  """Writes (or finishes writing) the dataset of latents of `config`'s training data; returns
  the summary also written to summary.json.

  Args:
    config: a training config: config.input names the data, its image_size or buckets and
      min_size; config.vae the VAE and its dtype.
    out, name, version: the TFDS data_dir, dataset name and version to write.
    num_records: encode the first `num_records` source records (default: all).
    batch_size: images per encoder call, split over this host's devices.
    dtype: the stored latents' dtype, one of DTYPES.
    examples_per_shard: source records per shard.
  Raises:
    ConfigError: the config has no VAE, or one that does not fit it; bad arguments.
  """
  if not config.vae.path:
    raise config_lib.ConfigError("config.vae.path: empty; a dataset of latents needs the VAE "
                                 "that encodes it")
  if dtype not in DTYPES:
    raise config_lib.ConfigError(f"--dtype {dtype!r}: one of {DTYPES}")
  if not name.isidentifier() or name.lower() != name:
    raise config_lib.ConfigError(f"--name {name!r}: a TFDS name is a lower-case identifier")
  devices = jax.local_devices()
  if batch_size % len(devices):
    raise config_lib.ConfigError(f"--batch_size {batch_size} does not divide over this host's "
                                 f"{len(devices)} devices")
  start = time.time()
  space = image_space.from_config(config)  # The VAE, checked against the config first.
  source = sources.make_source(config.input)
  count = len(source) if num_records is None else min(num_records, len(source))
  shapes_hw = order.bucket_shapes(config.input)
  bucket_of = (np.zeros(count, np.uint8) if len(shapes_hw) == 1
               else images.nearest_buckets(source.sizes()[:count], shapes_hw))

  # The batch is split over this host's devices; the VAE is replicated on them.
  mesh = Mesh(np.asarray(devices), ("batch",))
  replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))
  vae_params = jax.device_put(space.frozen(), replicated)
  moments = jax.jit(space.moments, in_shardings=(replicated, rows), out_shardings=rows)
  batcher = _BucketBatcher(functools.partial(moments, vae_params), batch_size)

  directory = build.dataset_dir(out, name, version)
  directory.mkdir(parents=True, exist_ok=True)
  spec = features(space.channels, dtype)
  starts = range(0, count, examples_per_shard)
  results = []
  for i, first in enumerate(starts):
    indices = range(first, min(first + examples_per_shard, count))
    examples = functools.partial(_shard_examples, source, indices, bucket_of, shapes_hw,
                                 batcher, dtype, config.input.min_size)
    results.append(build.write_shard(build.shard_path(directory, name, i, len(starts)),
                                     examples, spec))
  metadata = {"format_version": FORMAT_VERSION, "vae": vae_identity(config.vae.path),
              "vae_dtype": config.vae.dtype, "buckets": [list(b) for b in shapes_hw],
              "dtype": dtype, "channels": space.channels, "factor": space.factor}
  (directory / METADATA).write_text(json.dumps(metadata, indent=2) + "\n")
  source_fields = {k: config.input[k] for k in ("source", "tfds_name", "data_dir", "split",
                                                "data_seed")}
  return build.finish(directory, name, version, spec, results,
                      f"Latents of {source_fields} by the VAE in {config.vae.path}.", start,
                      {"data_dir": str(out), "source": source_fields, "num_records": count,
                       "latents": metadata})
