"""Builds a TFDS ArrayRecord dataset of image-caption records from folders, tables or tars.

The inputs are split into work units in a fixed order (li_dit.data.records.list_units); unit i
becomes shard i, written by one of `workers` processes. A shard is written under a temporary
name and renamed (on an object store, uploaded whole: objects appear whole or not at all), and
its counts land in `<shard>.counts.json` last: a rerun after an
interruption skips the shards that have their counts and redoes the rest, so the result is the
same as one uninterrupted run. `summary.json` holds the totals: records written, records skipped
by reason, captions truncated.
"""
from __future__ import annotations

import collections
import functools
import json
import multiprocessing
import os
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
from absl import logging
from etils import epath

from li_dit.data import images
from li_dit.data import records
from li_dit.io import paths

SPLIT = "train"


def dataset_dir(out: str, name: str, version: str) -> epath.Path:
  """Where TFDS expects the files: <out>/<name>/<version>."""
  return epath.Path(out) / name / version


def shard_path(directory: epath.Path, name: str, index: int, num_shards: int) -> epath.Path:
  """TFDS's file name of shard `index`."""
  return directory / f"{name}-{SPLIT}.array_record-{index:05d}-of-{num_shards:05d}"


Examples = Iterator[tuple[dict[str, Any], int]]


def write_shard(path: epath.Path, examples: Callable[[collections.Counter], Examples],
                features: Any) -> dict[str, Any]:
  """Writes one shard of `features()`-records; returns (and saves) its counts.

  Args:
    path: the shard's final path. When `<path>.counts.json` exists (an earlier, interrupted run
      finished this shard) nothing is written and the saved counts are returned.
    examples: called with a Counter of skip reasons to add to, yields (record dict, number of
      truncated captions) for every record to write, in order.
    features: the TFDS FeaturesDict of a record.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  path = epath.Path(path)
  counts_path = epath.Path(f"{path}.counts.json")
  if counts_path.exists():  # Done by an earlier, interrupted run.
    return json.loads(counts_path.read_text())
  skipped = collections.Counter()
  counts = {"written": 0, "captions_truncated": 0, "num_bytes": 0, "sizes": []}
  # ArrayRecord writes local files: write here, then publish (upload or rename).
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "shard")
    writer = array_record_module.ArrayRecordWriter(local, "group_size:1")
    for example, truncated in examples(skipped):
      data = features.serialize_example(example)
      writer.write(data)
      counts["sizes"].append([int(example["width"]), int(example["height"])])
      counts["written"] += 1
      counts["num_bytes"] += len(data)
      counts["captions_truncated"] += truncated
    writer.close()
    paths.publish(local, path)
    counts["skipped"] = dict(skipped)
    with open(os.path.join(tmp, "counts.json"), "w") as f:
      json.dump(counts, f)
    paths.publish(os.path.join(tmp, "counts.json"), counts_path)
  return counts


def _validated_examples(unit: tuple[str, Any], limits: dict[str, Any],
                        skipped: collections.Counter) -> Examples:
  """The valid records of a work unit; the invalid ones counted in `skipped` by reason."""
  for item in records.iter_items(unit):
    try:
      yield records.make_example(item, **limits)
    except images.BadInput as e:
      skipped[e.reason] += 1
      logging.info("skipped %s: %s", item.key, e)


def _write_unit(args: tuple[tuple[str, Any], str, dict[str, Any]]) -> dict[str, Any]:
  """Worker: the shard of one work unit of image-caption records."""
  unit, path, limits = args
  return write_shard(epath.Path(path),
                     functools.partial(_validated_examples, unit, limits), records.features())


def write_metadata(directory: epath.Path, name: str, version: str, features: Any,
                   shard_lengths: list[int], num_bytes: int, sizes: np.ndarray,
                   description: str = "") -> None:
  """TFDS's dataset_info.json and features.json for the shards, and sizes.npy.

  sizes: int32 [N,2] (width, height) of every record in the dataset's order (shard by shard),
  which aspect-ratio bucketing reads instead of the images.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split = tfds.core.SplitInfo(
      name=SPLIT, shard_lengths=shard_lengths, num_bytes=num_bytes,
      filename_template=tfds.core.ShardedFileTemplate(
          data_dir=directory, dataset_name=name, split=SPLIT, filetype_suffix="array_record"))
  tfds.folder_dataset.write_metadata(
      data_dir=directory, features=features, split_infos=[split], version=version,
      check_data=False, description=description)
  with (directory / "sizes.npy").open("wb") as f:
    np.save(f, np.asarray(sizes, np.int32).reshape(-1, 2))


def build(inputs: Sequence[str], out: str, name: str, version: str = "1.0.0",
          examples_per_shard: int = 1000, workers: int = 0, min_size: int = 1,
          max_pixels: int = images.DEFAULT_MAX_PIXELS,
          max_caption_chars: int = records.DEFAULT_MAX_CAPTION_CHARS) -> dict[str, Any]:
  """Builds (or finishes building) the dataset; returns the summary also written to summary.json.

  Args:
    inputs: folders, tables (.jsonl/.csv/.parquet) and WebDataset .tar shards.
    out: the TFDS data_dir (`tfds.data_source(name, data_dir=out)` opens the result).
    name, version: the TFDS dataset name and version.
    examples_per_shard: input examples per shard for folders and tables (one shard per tar).
    workers: processes (0: all cores).
    min_size: images with a side shorter than this are skipped.
    max_pixels: larger images are skipped as decompression bombs.
    max_caption_chars: longer captions are cut at a word boundary (and counted).
  """
  if not name.isidentifier() or name.lower() != name:
    raise ValueError(f"--name {name!r}: a TFDS name is a lower-case Python identifier")
  start = time.time()
  units = records.list_units(inputs, examples_per_shard)
  if not units:
    raise ValueError(f"no images found in {list(inputs)}")
  directory = dataset_dir(out, name, version)
  directory.mkdir(parents=True, exist_ok=True)
  limits = dict(min_size=min_size, max_pixels=max_pixels, max_caption_chars=max_caption_chars)
  tasks = [(unit, str(shard_path(directory, name, i, len(units))), limits)
           for i, unit in enumerate(units)]
  workers = workers or os.cpu_count() or 1
  if workers == 1:
    results = [_write_unit(t) for t in tasks]
  else:
    # spawn: the parent may hold JAX/TFDS state that must not be forked.
    with multiprocessing.get_context("spawn").Pool(min(workers, len(tasks))) as pool:
      results = pool.map(_write_unit, tasks, chunksize=1)

  return finish(directory, name, version, records.features(), results,
                f"Image-caption records built from {list(inputs)}.", start,
                {"data_dir": str(out), "inputs": list(inputs), "limits": limits})


def finish(directory: epath.Path, name: str, version: str, features: Any,
           results: Sequence[dict[str, Any]], description: str, start: float,
           fields: dict[str, Any]) -> dict[str, Any]:
  """Writes the metadata of finished shards (`write_shard`'s counts, in shard order) and
  summary.json: name, version, `fields`, records written, skipped by reason and in total,
  captions truncated, shards, seconds since `start`. Returns the summary."""
  skipped = collections.Counter()
  for r in results:
    skipped.update(r["skipped"])
  shard_lengths = [r["written"] for r in results]
  sizes = np.asarray([wh for r in results for wh in r["sizes"]], np.int32).reshape(-1, 2)
  write_metadata(directory, name, version, features, shard_lengths,
                 sum(r["num_bytes"] for r in results), sizes, description)
  summary = {
      "name": name, "version": version, **fields,
      "written": sum(shard_lengths), "skipped": dict(sorted(skipped.items())),
      "skipped_total": sum(skipped.values()),
      "captions_truncated": sum(r["captions_truncated"] for r in results),
      "num_shards": len(results), "seconds": round(time.time() - start, 2),
  }
  (directory / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
  return summary
