r"""What a config's run will do, with no weights loaded and nothing compiled.

  python tools/run_card.py --config configs/li_dit_1b.py [--config.a.b=v ...] [--devices N] \
      [--slices S] [--json card.json] [--prefix_tokens 64 --suffix_tokens 8]

Prints and writes (--json) the run card (li_dit.training.run_card): image_size_px, latent_size,
image_tokens (and per bucket), text_tokens per LLM (instruction prefix and prompt part),
time_shift, median_t, global_batch, per_device_batch on --devices devices (default: this
machine's), trainable parameters and model TFLOPs per step. The frozen models come from their
files where they are on this machine, else from their published architectures
(li_dit.io.architectures); LLM template lengths are then --prefix_tokens / --suffix_tokens.
`li_dit.train` writes the same card to <workdir>/run_card.json.
"""
from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.diffusion import image_space  # noqa: E402
from li_dit.training import run_card  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_DEVICES = flags.DEFINE_integer("devices", None, "Devices the run has (default: this machine's).",
                                lower_bound=1)
_SLICES = flags.DEFINE_integer("slices", 1, "Slices the devices are in (config.dcn_mesh).",
                               lower_bound=1)
_JSON = flags.DEFINE_string("json", None, "Also write the card here as JSON.")
_PREFIX = flags.DEFINE_integer("prefix_tokens", 64, "Template prefix tokens of an LLM whose "
                               "tokenizer is not on this machine.")
_SUFFIX = flags.DEFINE_integer("suffix_tokens", 8, "Template suffix tokens of such an LLM.")
flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = _CONFIG.value
  with cli.one_line_failures("run_card", config_lib.ConfigError):
    config_lib.validate(config)
    mesh = run_card.mesh_sizes(config, _DEVICES.value or jax.device_count(), _SLICES.value)
    card = run_card.make(config, run_card.planned_encoders(config, _PREFIX.value, _SUFFIX.value),
                         image_space.from_config(config, load=False), mesh)
    print(run_card.describe(card))
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(card, f, indent=2)
      print(f"wrote {_JSON.value}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
