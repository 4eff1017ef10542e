r"""Encodes a training config's images once with its VAE: a TFDS dataset of latents to train on.

  python tools/encode_latents.py --config C [--config.a.b=v ...] --out DATA_DIR --name NAME \
      [--version 1.0.0] [--num_records N] [--batch_size 16] [--dtype float16|float32] \
      [--examples_per_shard 1000]

Reads config.input's data (a dataset built by tools/build_dataset.py, or the shapes source: give
--num_records, it is endless), fits each image to its aspect-ratio bucket (config.input.buckets,
or image_size square) as the training pipeline does, and stores the Gaussian that config.vae's
encoder gives it, mean and log-variance [H/f, W/f, C], with the captions, in the source's order
(li_dit.data.latent_datasets). Images that do not decode are skipped and counted in summary.json.
The batch is split over this host's devices. Rerunning the command after an interruption keeps
the finished shards.

Train on the result with the same VAE and buckets (checked, against DATA_DIR/NAME/VERSION/
latents.json, before anything is loaded):
  python -m li_dit.train --config C --workdir W --config.input.source=tfds \
      --config.input.tfds_name=NAME --config.input.data_dir=DATA_DIR
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.data import latent_datasets  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.",
                                          lock_config=True)
_OUT = flags.DEFINE_string("out", None, "TFDS data_dir to write the dataset of latents into.")
_NAME = flags.DEFINE_string("name", None, "Dataset name (a lower-case identifier).")
_VERSION = flags.DEFINE_string("version", "1.0.0", "Dataset version.")
_NUM = flags.DEFINE_integer("num_records", None, "Encode the first N source records (default: "
                            "all; needed for the endless shapes source).", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 16, "Images per encoder call.", lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float16", list(latent_datasets.DTYPES),
                           "dtype of the stored latents.")
_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1000, "Source records per shard.",
                                  lower_bound=1)
flags.mark_flags_as_required(["config", "out", "name"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_lib.quiet_library_logs()
  config = _CONFIG.value
  # ConfigError and bad input raise ValueErrors whose messages name them.
  with cli.one_line_failures("encode_latents", ValueError):
    config_lib.validate(config)
    summary = latent_datasets.encode_dataset(config, _OUT.value, _NAME.value, _VERSION.value,
                                             _NUM.value, _BATCH.value, _DTYPE.value,
                                             _PER_SHARD.value)
  print(json.dumps(summary, indent=2))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
