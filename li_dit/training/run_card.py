"""The run card: what a config will do, from its fields and the frozen models' shapes alone.

  image_size_px      the square training size in pixels (config.input.image_size)
  latent_size        its side as the DiT sees it (pixels / the VAE's factor; 1 in pixel space)
  image_tokens       (latent_size / patch_size)^2, the DiT's sequence length
  buckets            every aspect-ratio bucket: size_px [h, w], latent [h, w], image_tokens
  text_tokens        per LLM: the instruction prefix and the prompt part (prompt, template suffix,
                     padding); only prompt parts reach the DiT's cross-attention. `estimated`:
                     the tokenizer is not on this machine and the template lengths are guesses
  time_shift         the resolution shift of training and sampling at image_size_px
  median_t           the median training t after the shift (logit-normal: sigmoid(t_mean),
                     shifted; 0.5 unshifted)
  global_batch, per_device_batch, devices, mesh
  trainable_parameters, model_tflops_per_step (li_dit.training.flops: the step over the global
                     batch)

Nothing is loaded or compiled: `li_dit.train` writes the card to <workdir>/run_card.json and
prints it on start, `tools/run_card.py` prints it for any config, `tools/aot_compile.py --json`
includes it.
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from li_dit import config_lib
from li_dit.data import order
from li_dit.diffusion import flow
from li_dit.diffusion import image_space
from li_dit.models import lidit
from li_dit.parallel import sharding
from li_dit.text import conditioning
from li_dit.text import encoders as encoders_lib
from li_dit.training import flops as flops_lib

Encoders = Mapping[str, encoders_lib.PromptEncoder]


def planned_encoders(config: ml_collections.ConfigDict, prefix_tokens: int = 64,
                     suffix_tokens: int = 8) -> dict[str, encoders_lib.PromptEncoder]:
  """The config's LLMs without their weights (`PromptEncoder.planned`), in branch order."""
  encoders = {}
  for name in sorted(config.text.llms):
    try:
      encoders[name] = encoders_lib.PromptEncoder.planned(
          {"name": name, **config.text.llms[name].to_dict()}, prefix_tokens, suffix_tokens)
    except (ValueError, OSError) as e:
      raise config_lib.ConfigError(f"config.text.llms.{name}.path: {e}") from e
  return encoders


def abstract_params(config: ml_collections.ConfigDict, encoders: Encoders,
                    space: image_space.ImageSpace) -> Any:
  """The trainable model's parameters of `config` as boxed ShapeDtypeStructs (logical axes
  kept), from jax.eval_shape."""
  size = config.input.image_size
  return lidit.abstract_params(lidit.build_model(config, len(encoders)),
                               [e.width for e in encoders.values()],
                               space.latent_shape(size, size))


def leaf_name(path: tuple[Any, ...]) -> str:
  """A parameter's tree path as "module/.../leaf" (dict keys only; boxes add none)."""
  return "/".join(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def param_counts(config: ml_collections.ConfigDict, encoders: Encoders,
                 space: image_space.ImageSpace) -> dict[str, int]:
  """Parameters of the trainable model per '/'-joined leaf path, from jax.eval_shape."""
  flat = jax.tree_util.tree_flatten_with_path(nn.unbox(abstract_params(config, encoders,
                                                                       space)))[0]
  return {leaf_name(path): math.prod(leaf.shape) for path, leaf in flat}


def _text_shapes(encoders: Encoders) -> list[flops_lib.TextShape]:
  return [flops_lib.TextShape(e.layout.prefix_len, e.layout.length, e.config, e.spec.layer)
          for e in encoders.values()]


def forward_flops(config: ml_collections.ConfigDict, encoders: Encoders,
                  space: image_space.ImageSpace) -> dict[str, int]:
  """Forward model FLOPs of one example at the square image size (li_dit.training.flops):
  "refiners", "dit", and "llms" (one prompt row through every LLM, after its cached prefix)."""
  texts = _text_shapes(encoders)
  out = flops_lib.model_forward_flops(lidit.ModelConfig(**config.model.to_dict()),
                                      config.input.image_size // space.factor, texts)
  out["llms"] = sum(flops_lib.llm_forward_flops(t) for t in texts)
  return out


def step_flops(config: ml_collections.ConfigDict, encoders: Encoders,
               space: image_space.ImageSpace) -> dict[str, int]:
  """Model FLOPs of one train step of `config` over its global batch (li_dit.training.flops), at the
  DiT's input size; the VAE's encoder is not counted."""
  return flops_lib.train_step_flops(
      lidit.ModelConfig(**config.model.to_dict()), config.input.image_size // space.factor,
      _text_shapes(encoders), config.input.batch_size,
      online=config.text.encode == conditioning.ONLINE)


def mesh_sizes(config: ml_collections.ConfigDict, num_devices: int, num_slices: int = 1
               ) -> dict[str, int]:
  """Each mesh axis's size over `num_devices` devices in `num_slices` slices (config.mesh within
  a slice times config.dcn_mesh across them); ConfigError when they do not fit."""
  try:
    dcn = sharding.mesh_shape(config.dcn_mesh, num_slices)
    ici = sharding.mesh_shape(config.mesh, num_devices // num_slices)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.mesh / config.dcn_mesh: {e}") from e
  return {axis: a * b for axis, a, b in zip(sharding.MESH_AXES, ici, dcn)}


def make(config: ml_collections.ConfigDict, encoders: Encoders, space: image_space.ImageSpace,
         mesh: Mapping[str, int]) -> dict[str, Any]:
  """The run card of `config` (see the module docstring) on a mesh of these axis sizes (a
  Mesh's `shape`, or `mesh_sizes`)."""
  patch = config.model.patch_size
  size = config.input.image_size
  latent = size // space.factor
  buckets = [{"size_px": [h, w], "latent": [h // space.factor, w // space.factor],
              "image_tokens": (h // space.factor // patch) * (w // space.factor // patch)}
             for h, w in order.bucket_shapes(config.input)]
  shift = flow.time_shift(config)
  median_t = float(flow.shift_time(1 / (1 + np.exp(-config.flow.t_mean)), shift))
  mesh = {axis: int(mesh[axis]) for axis in sharding.MESH_AXES}
  rules = sharding.rules_from_config(config.sharding_rules)
  batch_axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  batch_axes = () if batch_axes is None else (
      batch_axes if isinstance(batch_axes, tuple) else (batch_axes,))
  data_parallel = math.prod(mesh[a] for a in batch_axes)
  if config.input.batch_size % data_parallel:
    raise config_lib.ConfigError(
        f"config.input.batch_size={config.input.batch_size} does not divide over the "
        f"{data_parallel} data-parallel devices of mesh {mesh}")
  flops = step_flops(config, encoders, space)
  return {
      "image_size_px": size,
      "latent_size": latent,
      "latent_channels": space.channels,
      "image_tokens": (latent // patch) ** 2,
      "buckets": buckets,
      "text_tokens": {name: {"prefix": e.layout.prefix_len, "prompt": e.layout.length,
                             "estimated": e.layout_estimated}
                      for name, e in encoders.items()},
      "time_shift": shift,
      "median_t": median_t,
      "global_batch": config.input.batch_size,
      "per_device_batch": config.input.batch_size / data_parallel,
      "devices": math.prod(mesh.values()),
      "mesh": mesh,
      "trainable_parameters": sum(param_counts(config, encoders, space).values()),
      "model_tflops_per_step": flops["total"] / 1e12,
      "model_tflops_per_step_by_part": {k: v / 1e12 for k, v in flops.items() if k != "total"},
  }


def describe(card: Mapping[str, Any]) -> str:
  """The card as a few readable lines."""
  text = ", ".join(f"{name} {t['prefix']} prefix + {t['prompt']} prompt"
                   + (" (estimated)" if t["estimated"] else "")
                   for name, t in card["text_tokens"].items())
  buckets = ", ".join(f"{b['size_px'][0]}x{b['size_px'][1]}" for b in card["buckets"])
  size, latent = card["image_size_px"], card["latent_size"]
  return "\n".join([
      f"run card: {size}x{size} px -> DiT input {latent}x{latent}x{card['latent_channels']}, "
      f"{card['image_tokens']} image tokens (buckets {buckets})",
      f"  text tokens: {text}",
      f"  time shift {card['time_shift']:.3g} (median training t {card['median_t']:.3f})",
      f"  global batch {card['global_batch']}, {card['per_device_batch']:g} per device on "
      f"{card['devices']} devices, mesh {card['mesh']}",
      f"  {card['trainable_parameters']:,} trainable parameters, "
      f"{card['model_tflops_per_step']:.4g} model TFLOPs per step"])
