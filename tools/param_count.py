r"""Per-module parameter table of a config's trainable model, from `jax.eval_shape` (no memory).

  python tools/param_count.py --config configs/li_dit_10b.py [--config.a.b=v ...] [--depth 2]

The frozen LLMs are not counted (they are not trained); their width, which sizes the refiners'
input projections, comes from `text.llms.<name>.hidden_size` when set, otherwise from the LLM's
file header (no weights are read).
"""
from __future__ import annotations

import collections
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from li_dit import config_lib  # noqa: E402
from li_dit import generate  # noqa: E402
from li_dit.models import li_dit  # noqa: E402
from li_dit.text import encoders as encoders_lib  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file.", lock_config=True)
_DEPTH = flags.DEFINE_integer("depth", 2, "Group parameters by this many levels of module names.")
flags.mark_flags_as_required(["config"])


def count_params(config) -> dict[str, int]:
  """Parameters of the trainable model per '/'-joined module path (every leaf)."""
  widths = [encoders_lib.llm_width(config.text.llms[n]) for n in sorted(config.text.llms)]
  model = generate.build_model(config, len(widths))
  size, channels = config.input.image_size, config.model.channels
  text = [li_dit.TextFeatures(jax.ShapeDtypeStruct((4, w), jnp.float32),
                              jax.ShapeDtypeStruct((1, 8, w), jnp.float32),
                              jax.ShapeDtypeStruct((1, 8), jnp.bool_)) for w in widths]
  shapes = jax.eval_shape(
      lambda x, t, txt: nn.unbox(model.init(jax.random.key(0), x, t, txt)["params"]),
      jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32), text)
  flat = jax.tree_util.tree_flatten_with_path(shapes)[0]
  return {"/".join(k.key for k in path): math.prod(leaf.shape) for path, leaf in flat}


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
  config_lib.validate(config)
  print(table(count_params(config), _DEPTH.value))


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
