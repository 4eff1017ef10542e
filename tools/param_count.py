r"""Per-module parameter table of a config's trainable model, from `jax.eval_shape` (no memory).

  python tools/param_count.py --config configs/li_dit_10b.py [--config.a.b=v ...] [--depth 2]

The frozen LLMs are not counted (they are not trained); their width, which sizes the refiners'
input projections, comes from the LLM's file header (no weights are read), or from its published
architecture when the file is not on this machine (li_dit.io.architectures).
"""
from __future__ import annotations

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.diffusion import image_space  # noqa: E402
from li_dit.training import run_card  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_DEPTH = flags.DEFINE_integer("depth", 2, "Group parameters by this many levels of module names.")
flags.mark_flags_as_required(["config"])


def table(counts: dict[str, int], depth: int) -> str:
  groups = collections.OrderedDict()
  for name, n in counts.items():
    key = "/".join(name.split("/")[:depth])
    groups[key] = groups.get(key, 0) + n
  total = sum(counts.values())
  width = max(len(k) for k in groups) + 2
  lines = [f"{'module':<{width}}{'parameters':>16}{'share':>9}", "-" * (width + 25)]
  lines += [f"{k:<{width}}{v:>16,}{v / total:>9.1%}" for k, v in groups.items()]
  lines += ["-" * (width + 25), f"{'total':<{width}}{total:>16,}  ({total / 1e9:.3f} B)"]
  return "\n".join(lines)


def main(argv):
  del argv
  config = _CONFIG.value
  with cli.one_line_failures("param_count", config_lib.ConfigError):
    config_lib.validate(config)
    counts = run_card.param_counts(config, run_card.planned_encoders(config),
                                   image_space.from_config(config, load=False))
  print(table(counts, _DEPTH.value))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
