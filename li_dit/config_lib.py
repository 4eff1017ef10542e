"""Config loading, overrides with clear errors, and checks that run before anything compiles.

Configs are Python files with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision
style), given as `--config configs/demo.py[:arg]` and overridden field by field with
`--config.a.b=value`. The config is locked: an override of a key that does not exist, or of the
wrong type, stops the program with a message naming the flag before any model code runs.
"""
from __future__ import annotations

import json
import re
import sys
from typing import Any, Sequence

import jax.numpy as jnp
import ml_collections
from absl import flags

DTYPES = ("float32", "bfloat16")
TEXT_MODES = ("online", "cached")


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` that turns config override errors into one clear line.

  ml_collections reports an unknown key as a bare KeyError from deep inside its parser; this
  names the offending `--config.…` flag and the suggestion it makes.
  """
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{argv[0]}: {e}")
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    key = re.match(r"'?([^'\s]+)'?", message)
    bad = [a for a in argv[1:] if a.startswith("--config.") and key and
           key.group(1) in re.split(r"[.=]", a[len("--config."):])]
    where = bad[0] if bad else "a --config override"
    sys.exit(f"{argv[0]}: {where}: no such config key ({message})")


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json` (lists come back as lists, which the code accepts for tuples)."""
  return ml_collections.ConfigDict(json.loads(text))


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Semantic checks of a training config; raises ConfigError naming the field."""
  m = config.model
  _require(m.width % m.num_heads == 0, "model.width",
           f"{m.width} is not divisible by model.num_heads={m.num_heads}")
  _require(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
  _require(m.patch_size >= 1, "model.patch_size", f"must be >= 1, got {m.patch_size}")
  for field in ("dtype", "param_dtype"):
    _require(m[field] in DTYPES, f"model.{field}", f"{m[field]!r} is not one of {DTYPES}")
  _require(m.remat in ("none", "full", "save_dots"), "model.remat",
           f"{m.remat!r} is not one of ('none', 'full', 'save_dots')")
  size = config.input.image_size
  _require(size % m.patch_size == 0, "input.image_size",
           f"{size} is not divisible by model.patch_size={m.patch_size}")
  _require(config.input.batch_size >= 1, "input.batch_size", "must be >= 1")
  _require(0.0 <= config.input.caption_dropout < 1.0, "input.caption_dropout",
           f"must be in [0, 1), got {config.input.caption_dropout}")

  _require(config.text.encode in TEXT_MODES, "text.encode",
           f"{config.text.encode!r} is not one of {TEXT_MODES}")
  _require(len(config.text.llms) >= 1, "text.llms", "needs at least one LLM")
  for name, llm in config.text.llms.items():
    _require(llm.dtype in DTYPES, f"text.llms.{name}.dtype",
             f"{llm.dtype!r} is not one of {DTYPES}")
    _require(llm.max_tokens >= 1, f"text.llms.{name}.max_tokens", "must be >= 1")

  o = config.optim
  _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
  _require(0 <= o.warmup_steps <= config.total_steps, "optim.warmup_steps",
           f"must be in [0, total_steps={config.total_steps}], got {o.warmup_steps}")
  _require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
  from li_dit.diffusion import samplers  # Late import: keeps this module free of jax setup.
  _require(config.sample.sampler in samplers.SAMPLERS, "sample.sampler",
           f"{config.sample.sampler!r} is not one of {samplers.SAMPLERS}")
  _require(config.sample.steps >= 1, "sample.steps", "must be >= 1")


def dtype(name: str) -> Any:
  return jnp.dtype(name)
