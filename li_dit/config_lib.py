"""Config loading, overrides with clear errors, and checks that run before anything compiles.

Configs are Python files with `get_config(arg=None) -> ml_collections.ConfigDict` (big_vision
style), given as `--config configs/demo.py[:arg]` and overridden field by field with
`--config.a.b=value`. The config is locked: an override of a key that does not exist, or of the
wrong type, stops the program with a message naming the flag before any model code runs.
"""
from __future__ import annotations

import json
import logging as std_logging
import os
import re
import sys
from typing import Any, Sequence

import ml_collections
from absl import flags, logging

from li_dit.data.synthetic import relations
from li_dit.diffusion import samplers
from li_dit.models import attention, dit

DTYPES = ("float32", "bfloat16")
TEXT_MODES = ("online", "cached")


def default_config() -> ml_collections.ConfigDict:
  """Every field a training config has, with defaults; config files change what differs.

  Keeping the schema in one place is what lets a locked config reject unknown override keys.
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.total_steps = 100_000
  config.log_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3  # The newest N checkpoints ...
  # ... plus every checkpoint whose step is a multiple of keep_every, kept for good (0: none), so
  # a long run keeps milestones that a later divergence cannot rotate away.
  config.keep_every = 0
  config.sample_every = 5000  # 0: no sample grids during training.
  # Staged training: a workdir (its latest checkpoint) or <workdir>/checkpoints/<step> whose
  # parameters and EMA start this run; optimizer and data start fresh. Ignored once this run's
  # workdir has a checkpoint of its own (a resume).
  config.init_from = ""

  # source "tfds": a dataset built by tools/build_dataset.py, `tfds.data_source(tfds_name,
  # data_dir=data_dir)[split]` (data_dir may be gs://).
  config.input = dict(
      source="shapes",
      tfds_name="",
      data_dir="",
      split="train",
      data_seed=0,            # The data itself (for the shapes source: held-out split, scenes).
      # Shapes source: its relation words (li_dit.data.synthetic.relations.RELATIONS). In
      # reading order (the first-named object is the left/top one) by default; all four is the
      # harder grammar.
      relations=("left", "above"),
      seed=0,                 # Shuffle order, caption choice and caption dropout.
      image_size=256,         # Side of the square images, in pixels (the DiT sees size / f).
      # Aspect-ratio buckets, ((height, width), ...) of about equal area: each image goes to the
      # bucket of closest aspect ratio, every batch holds one bucket. Empty: image_size square.
      buckets=(),
      min_size=1,             # Images with a shorter side are skipped (and counted).
      batch_size=256,         # Global, over all hosts and devices.
      caption_dropout=0.1,    # Trains the "" (null) condition for classifier-free guidance.
      num_workers=2,          # Data worker processes (0: in the training process).
      prefetch_buffer=4,      # Batches buffered per worker.
  )

  # One entry per frozen LLM, keyed by a name (sorted names give the branch order).
  # encode: "online" runs the LLMs in the train step; "cached" precomputes every caption's
  # features once (sources with a fixed caption set only).
  config.text = dict(encode="online", llms={})

  # The latent space (li_dit.diffusion.image_space). path "": pixel space. Else a diffusers
  # AutoencoderKL folder (or a pipeline folder holding vae/); the train step encodes each batch
  # with it, and model.channels must equal its latent_channels. dtype: its parameters and
  # computation.
  # sample_latents: x0 is a draw from the encoder's Gaussian (False: its mean).
  config.vae = dict(path="", dtype="float32", sample_latents=True)

  # remat: a key of li_dit.models.dit.REMAT_POLICIES. attention: "xla", or "splash" (the TPU
  # flash-attention kernel; interpreted, slowly, on other backends).
  config.model = dict(
      patch_size=2, channels=3, width=1152, depth=28, num_heads=16, mlp_ratio=4.0,
      qk_norm=True, pos_kernel_size=3, refiner_depth=2, scan_layers=True, remat="none",
      attention="xla", dtype="float32", param_dtype="float32")

  # Rectified flow: logit-normal t (mean, std), shifted by
  # base_shift * sqrt(image pixels / base_size^2); base_size is an image side in pixels (the
  # stage whose shift is base_shift), like every size in a config.
  config.flow = dict(t_mean=0.0, t_std=1.0, base_size=256, base_shift=1.0)

  config.optim = dict(lr=1e-4, warmup_steps=1000, final_lr_ratio=0.1, b1=0.9, b2=0.999,
                      eps=1e-8, weight_decay=0.0, grad_clip=1.0, ema_decay=0.9999,
                      # A step with a non-finite loss, gradient or parameter changes nothing
                      # (it is counted); this many in a row stop the run, unsaved, as diverged.
                      max_nonfinite_steps=20,
                      # k micro-batches per global batch inside the step (a scan): the same
                      # update, the DiT's activations of batch_size / k rows alive at once.
                      accumulate_steps=1)

  # Sample grids written during training (and the defaults of li_dit.sample).
  config.sample = dict(prompts=(), steps=30, cfg=4.5, sampler="heun", seed=0)

  # Mesh sizes within a slice (ICI) and across slices (DCN, multiplying them); -1 fills the rest.
  config.mesh = dict(data=-1, fsdp=1, tensor=1)
  config.dcn_mesh = dict(data=1, fsdp=1, tensor=1)
  # None: li_dit.parallel.sharding.DEFAULT_RULES; else a list of [logical name, mesh axes].
  config.sharding_rules = ml_collections.FieldReference(None, field_type=list)
  return config


def llm_config(path: str, *, layer: int = -3, max_tokens: int = 128, template: str = "paper",
               dtype: str = "bfloat16", hidden_size: int | None = None) -> dict[str, Any]:
  """One `config.text.llms` entry. `hidden_size`: the LLM's width, needed only to plan a model
  without its files (tools/param_count.py); checked against the files when they are loaded."""
  return dict(path=path, layer=layer, max_tokens=max_tokens, template=template, dtype=dtype,
              hidden_size=ml_collections.FieldReference(hidden_size, field_type=int))


class ConfigError(ValueError):
  """A config value that cannot work; the message names the field."""


def quiet_library_logs() -> None:
  """WARNING as the default log level of our CLIs: orbax and grain log every save and restore
  at INFO. An explicit --verbosity wins."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    # orbax writes a checkpoint in asyncio tasks; when a write fails (a full disk), orbax raises
    # it to the caller (li_dit.io.checkpoints: one line), and asyncio's own reports of the same
    # error, with tracebacks, would only repeat it.
    std_logging.getLogger("asyncio").setLevel(std_logging.CRITICAL)


def parse_flags(argv: Sequence[str]) -> list[str]:
  """absl `flags_parser` that turns config override errors into one clear line.

  ml_collections reports an unknown key as a bare KeyError from deep inside its parser; this
  names the offending `--config.…` flag and the suggestion it makes.
  """
  prog = os.path.basename(argv[0])
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{prog}: {e}")
  except (AttributeError, KeyError) as e:
    message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'")
    key = re.match(r"'?([^'\s]+)'?", message)
    bad = [a for a in argv[1:] if a.startswith("--config.") and key and
           key.group(1) in re.split(r"[.=]", a[len("--config."):])]
    where = bad[0] if bad else "a --config override"
    sys.exit(f"{prog}: {where}: no such config key ({message})")


def to_json(config: ml_collections.ConfigDict) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True)


def from_json(text: str) -> ml_collections.ConfigDict:
  """Inverse of `to_json` (lists come back as lists, which the code accepts for tuples)."""
  return ml_collections.ConfigDict(json.loads(text))


def _require(condition: bool, field: str, message: str) -> None:
  if not condition:
    raise ConfigError(f"config.{field}: {message}")


def validate(config: ml_collections.ConfigDict) -> None:
  """Semantic checks of a training config; raises ConfigError naming the field.

  What depends on the VAE's own config (latent channels, f) is checked where it is read,
  `li_dit.diffusion.image_space.from_config`.
  """
  m = config.model
  _require(m.width % m.num_heads == 0, "model.width",
           f"{m.width} is not divisible by model.num_heads={m.num_heads}")
  _require(m.depth >= 1, "model.depth", f"must be >= 1, got {m.depth}")
  _require(m.patch_size >= 1, "model.patch_size", f"must be >= 1, got {m.patch_size}")
  for field in ("dtype", "param_dtype"):
    _require(m[field] in DTYPES, f"model.{field}", f"{m[field]!r} is not one of {DTYPES}")
  _require(m.remat in dit.REMAT_POLICIES, "model.remat",
           f"{m.remat!r} is not one of {tuple(dit.REMAT_POLICIES)}")
  _require(m.attention in attention.IMPLEMENTATIONS, "model.attention",
           f"{m.attention!r} is not one of {attention.IMPLEMENTATIONS}")
  size = config.input.image_size
  _require(size % m.patch_size == 0, "input.image_size",
           f"{size} is not divisible by model.patch_size={m.patch_size}")
  _require(len(config.input.buckets) <= 256, "input.buckets",
           f"at most 256 buckets, got {len(config.input.buckets)}")
  for bucket in config.input.buckets:
    _require(len(bucket) == 2 and all(int(v) >= 1 and int(v) % m.patch_size == 0
                                      for v in bucket), "input.buckets",
             f"{bucket} is not a (height, width) pair divisible by model.patch_size="
             f"{m.patch_size}")
  _require(config.input.source != "tfds" or (config.input.tfds_name and config.input.data_dir),
           "input.tfds_name", "source 'tfds' needs input.tfds_name and input.data_dir")
  _require(len(config.input.relations) >= 1
           and set(config.input.relations) <= set(relations.RELATIONS), "input.relations",
           f"{tuple(config.input.relations)} is not a non-empty subset of "
           f"{tuple(relations.RELATIONS)}")
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

  _require(config.vae.dtype in DTYPES, "vae.dtype",
           f"{config.vae.dtype!r} is not one of {DTYPES}")

  o = config.optim
  _require(o.lr > 0, "optim.lr", f"must be > 0, got {o.lr}")
  _require(0 <= o.warmup_steps <= config.total_steps, "optim.warmup_steps",
           f"must be in [0, total_steps={config.total_steps}], got {o.warmup_steps}")
  _require(0.0 <= o.ema_decay < 1.0, "optim.ema_decay", f"must be in [0, 1), got {o.ema_decay}")
  _require(o.max_nonfinite_steps >= 1, "optim.max_nonfinite_steps",
           f"must be >= 1, got {o.max_nonfinite_steps}")
  _require(o.accumulate_steps >= 1, "optim.accumulate_steps",
           f"must be >= 1, got {o.accumulate_steps}")
  _require(config.input.batch_size % o.accumulate_steps == 0, "optim.accumulate_steps",
           f"{o.accumulate_steps} does not divide input.batch_size={config.input.batch_size}")
  _require(config.keep_checkpoints >= 1, "keep_checkpoints",
           f"must be >= 1, got {config.keep_checkpoints}")
  _require(config.keep_every >= 0, "keep_every", f"must be >= 0, got {config.keep_every}")
  _require(config.sample.sampler in samplers.SAMPLERS, "sample.sampler",
           f"{config.sample.sampler!r} is not one of {samplers.SAMPLERS}")
  _require(config.sample.steps >= 1, "sample.steps", "must be >= 1")
