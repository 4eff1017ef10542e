"""Random-access record sources of the training data, opened in every data worker.

  shapes  the synthetic shapes data (li_dit.data.synthetic.shapes), rendered on the fly
  tfds    a dataset built by tools/build_dataset.py (images) or tools/encode_latents.py
          (latents, li_dit.data.latent_datasets): TFDS ArrayRecord shards, images left encoded

Each source gives records by index and the (width, height) of every record (`sizes`), which the
bucket planner (li_dit.data.order) reads without decoding any image.
"""
from __future__ import annotations

import json
import os
from typing import Any

import ml_collections
import numpy as np
from etils import epath

from li_dit.data.synthetic import shapes
from li_dit.io import paths

SOURCES = ("shapes", "tfds")


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
