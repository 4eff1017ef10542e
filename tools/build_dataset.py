r"""Builds an image-caption dataset for training: ArrayRecord shards that TFDS opens.

  python tools/build_dataset.py --input DIR|TABLE|TAR [--input ...] --out DATA_DIR --name NAME \
      [--version 1.0.0] [--examples_per_shard 1000] [--workers 0] [--min_size 64] \
      [--max_pixels 100000000] [--max_caption_chars 1000]

Inputs, any mix, local or gs://:
  folder      images (.jpg .jpeg .png .webp .bmp .gif .tif .tiff, searched recursively), each with
              a sidecar caption of the same stem: `.txt` (one caption per non-empty line) or
              `.json` ({"caption": ...}, {"captions": [...]}, a string or a list).
  table       .jsonl, .csv or .parquet rows with an image path (column image, image_path, path,
              file or filename; relative to the table's folder; Parquet may embed
              {"bytes": ...}) and captions (column captions (a list, JSON in CSV), caption, text
              or prompt).
  webdataset  .tar shards: members sharing a key (e.g. 000123.jpg + 000123.txt or .json).

Output: DATA_DIR/NAME/VERSION/ with NAME-train.array_record-XXXXX-of-NNNNN, TFDS's
dataset_info.json and features.json, so `tfds.data_source(NAME, data_dir=DATA_DIR)` opens it, and
summary.json: records written, skipped by reason (unreadable_image, empty_file,
decompression_bomb, too_small, missing_caption, empty_caption, caption_not_utf8, missing_image),
captions truncated. Every image is fully decoded once here, so what is written can be read.

Rerunning the same command after an interruption keeps the finished shards and writes the rest.
Train on the result with `--config.input.source=tfds --config.input.tfds_name=NAME
--config.input.data_dir=DATA_DIR`.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit.data import build, images, records  # noqa: E402

_INPUT = flags.DEFINE_multi_string("input", None, "Folder, table or .tar shard (repeatable).")
_OUT = flags.DEFINE_string("out", None, "TFDS data_dir to write the dataset into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (a lower-case identifier).")
_VERSION = flags.DEFINE_string("version", "1.0.0", "Dataset version.")
_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1000,
                                  "Input examples per shard (folders and tables).", lower_bound=1)
_WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: one per core).",
                                lower_bound=0)
_MIN_SIZE = flags.DEFINE_integer("min_size", 1, "Skip images with a shorter side.",
                                 lower_bound=1)
_MAX_PIXELS = flags.DEFINE_integer("max_pixels", images.DEFAULT_MAX_PIXELS,
                                   "Skip larger images (decompression bombs).", lower_bound=1)
_MAX_CHARS = flags.DEFINE_integer("max_caption_chars", records.DEFAULT_MAX_CAPTION_CHARS,
                                  "Cut longer captions at a word boundary.", lower_bound=1)
flags.mark_flags_as_required(["input", "out", "name"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  # Bad arguments or input raise ValueErrors whose messages name them.
  with cli.one_line_failures("build_dataset", ValueError):
    summary = build.build(_INPUT.value, _OUT.value, _NAME.value, _VERSION.value,
                          _PER_SHARD.value, _WORKERS.value, _MIN_SIZE.value, _MAX_PIXELS.value,
                          _MAX_CHARS.value)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main)
