"""diffusers AutoencoderKL checkpoints -> `li_dit.models.vae` (config and parameters).

A diffusers VAE is a folder with config.json and diffusion_pytorch_model.safetensors (or shards
with their index), usually the `vae/` folder of a pipeline; `load_vae` takes either folder.
Everything is checked before any tensor is read: the config, then each tensor's name and shape
against the model's, so a missing, unexpected or mis-shaped tensor fails the load up front,
named. The tensors are then read one at a time (`hf.SafetensorsCheckpoint`) and put in Flax's
layout once: conv kernels OIHW -> HWIO, linear weights (out, in) -> (in, out).

Names: the Flax path ("encoder", "down_blocks_0", "resnets_1", "conv1", "kernel") is diffusers'
"encoder.down_blocks.0.resnets.1.conv1.weight". Attention weights under the names of older
diffusers releases (query, key, value, proj_attn, which diffusers still renames on load) or
stored as 1x1 conv kernels [C,C,1,1] (the original LDM layout) load too.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from li_dit.io import hf
from li_dit.models import vae

Params = dict[str, Any]

WEIGHTS_STEM = "diffusion_pytorch_model"

# diffusers' AutoencoderKL.__init__ arguments and defaults (what a config.json may leave out).
DIFFUSERS_DEFAULTS: dict[str, Any] = dict(
    in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
    up_block_types=("UpDecoderBlock2D",), block_out_channels=(64,), layers_per_block=1,
    act_fn="silu", latent_channels=4, norm_num_groups=32, sample_size=32,
    scaling_factor=0.18215, shift_factor=None, latents_mean=None, latents_std=None,
    force_upcast=True, use_quant_conv=True, use_post_quant_conv=True,
    mid_block_add_attention=True)
# Ignored: force_upcast, which only tells diffusers pipelines to run the VAE in float32 (ours
# computes in the dtype it is given).
_ACTIVATIONS = ("silu", "swish")  # The same function under two names.
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}
_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
_ATTENTION_TENSOR = re.compile(r"(.*\.attentions\.\d+)\.(to_q|to_k|to_v|to_out\.0)\.(weight|bias)")


def vae_config_from_diffusers(fields: Mapping[str, Any], source: str = "config") -> vae.VAEConfig:
  """diffusers AutoencoderKL config fields -> VAEConfig; ValueError naming an unsupported one."""
  class_name = fields.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise ValueError(f"{source}: _class_name {class_name!r} is not supported; only "
                     "AutoencoderKL.")
  unknown = sorted(k for k in fields if not k.startswith("_") and k not in DIFFUSERS_DEFAULTS)
  if unknown:
    raise ValueError(f"{source}: field {unknown[0]} = {fields[unknown[0]]!r} is not a supported "
                     f"AutoencoderKL option; supported: {', '.join(DIFFUSERS_DEFAULTS)}.")
  f = {**DIFFUSERS_DEFAULTS, **fields}
  levels = len(f["block_out_channels"])
  for key, block in (("down_block_types", "DownEncoderBlock2D"),
                     ("up_block_types", "UpDecoderBlock2D")):
    if list(f[key]) != [block] * levels:
      raise ValueError(f"{source}: {key} {list(f[key])} is not supported; supported: {block} "
                       f"at each of the {levels} levels of block_out_channels.")
  if f["act_fn"] not in _ACTIVATIONS:
    raise ValueError(f"{source}: act_fn {f['act_fn']!r} is not supported; supported: "
                     f"{', '.join(_ACTIVATIONS)}.")
  for key in ("latents_mean", "latents_std"):
    if f[key] is not None:
      raise ValueError(f"{source}: {key} {f[key]!r} is not supported (per-channel latent "
                       "statistics); supported: null, with scaling_factor and shift_factor.")
  sample_size = f["sample_size"]
  try:
    return vae.VAEConfig(
        in_channels=int(f["in_channels"]),
        out_channels=int(f["out_channels"]),
        block_out_channels=tuple(int(c) for c in f["block_out_channels"]),
        layers_per_block=int(f["layers_per_block"]),
        latent_channels=int(f["latent_channels"]),
        norm_num_groups=int(f["norm_num_groups"]),
        sample_size=tuple(sample_size) if isinstance(sample_size, list) else int(sample_size),
        scaling_factor=float(f["scaling_factor"]),
        shift_factor=float(f["shift_factor"] or 0.0),
        use_quant_conv=bool(f["use_quant_conv"]),
        use_post_quant_conv=bool(f["use_post_quant_conv"]),
        mid_block_add_attention=bool(f["mid_block_add_attention"]))
  except ValueError as e:
    raise ValueError(f"{source}: {e}") from e


def vae_directory(path: str) -> str:
  """`path` if it holds config.json, else its `vae/` subfolder (a diffusers pipeline folder)."""
  for candidate in (path, os.path.join(path, "vae")):
    if os.path.isfile(os.path.join(candidate, "config.json")):
      return candidate
  raise FileNotFoundError(f"{path} is not a diffusers VAE folder: no config.json in it or in "
                          f"{os.path.join(path, 'vae')}.")


def read_vae_config(path: str) -> vae.VAEConfig:
  """The VAEConfig of a diffusers VAE folder or pipeline folder, without its weights."""
  config_path = os.path.join(vae_directory(path), "config.json")
  with open(config_path) as f:
    try:
      fields = json.load(f)
    except ValueError as e:
      raise ValueError(f"{config_path} is not valid JSON: {e}") from e
  return vae_config_from_diffusers(fields, source=config_path)


def weights_digest(path: str) -> str:
  """sha256 of the weights files of a VAE folder (or pipeline folder), in name order: the same
  weights give the same digest wherever they are stored."""
  directory = vae_directory(path)
  files = sorted({entry[0] for entry in hf.SafetensorsCheckpoint(directory, WEIGHTS_STEM)
                  .index.values()})
  digest = hashlib.sha256()
  for file in files:
    with open(file, "rb") as f:
      for block in iter(lambda: f.read(1 << 24), b""):
        digest.update(block)
  return digest.hexdigest()


def diffusers_name(path: tuple[str, ...]) -> str:
  """A parameter path of `vae.AutoencoderKL` -> its diffusers tensor name.

  ("decoder", "mid_block", "attentions_0", "to_out_0", "kernel") ->
  "decoder.mid_block.attentions.0.to_out.0.weight".
  """
  return ".".join([re.sub(r"_(\d+)$", r".\1", p) for p in path[:-1]] + [_LEAVES[path[-1]]])


def _torch_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
  """A Flax parameter shape -> PyTorch's: HWIO -> OIHW, (in, out) -> (out, in)."""
  if len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  return tuple(reversed(shape))


def _to_flax(tensor: np.ndarray) -> np.ndarray:
  """A PyTorch tensor -> Flax's layout (the inverse of `_torch_shape`), contiguous."""
  if tensor.ndim == 4:
    return np.ascontiguousarray(tensor.transpose(2, 3, 1, 0))
  return np.ascontiguousarray(tensor.T)


def _stored_name(name: str, index: Mapping[str, Any]) -> str | None:
  """The checkpoint's name for diffusers tensor `name`: itself or its legacy name, or None."""
  if name in index:
    return name
  match = _ATTENTION_TENSOR.fullmatch(name)
  if match:
    legacy = f"{match[1]}.{_LEGACY_ATTENTION[match[2]]}.{match[3]}"
    if legacy in index:
      return legacy
  return None


def expected_params(config: vae.VAEConfig, dtype: Any = jnp.float32) -> Params:
  """Tree of jax.ShapeDtypeStruct of `vae.AutoencoderKL(config)`'s parameters (nothing allocated).

  Leaves keep their logical axis names as nn.Partitioned boxes.
  """
  model = vae.AutoencoderKL(config, dtype=dtype, param_dtype=dtype)
  f = config.downsampling_factor
  images = jnp.zeros((1, f, f, config.in_channels), dtype)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), images))["params"]


def load_vae(path: str, dtype: Any = jnp.float32) -> tuple[vae.VAEConfig, Params]:
  """Config and parameters (a plain tree of `dtype` arrays) of a diffusers AutoencoderKL.

  Args:
    path: a diffusers VAE folder (config.json, diffusion_pytorch_model.safetensors) or a
      pipeline folder with one under `vae/`.
    dtype: parameter dtype.
  Raises:
    FileNotFoundError: no config.json or no safetensors weights.
    ValueError: an unsupported config field, or a tensor missing, unexpected or mis-shaped
      (named, with its file); nothing is returned half-loaded.
  """
  directory = vae_directory(path)
  config = read_vae_config(directory)
  checkpoint = hf.SafetensorsCheckpoint(directory, stem=WEIGHTS_STEM)
  index = checkpoint.index
  plan = {}  # Flax path -> (stored name, stored shape, PyTorch shape).
  for key, spec in traverse_util.flatten_dict(nn.meta.unbox(expected_params(config))).items():
    name, shape = diffusers_name(key), _torch_shape(spec.shape)
    stored = _stored_name(name, index)
    if stored is None:
      raise ValueError(f"Tensor {name} (shape {shape}) is missing from the checkpoint in "
                       f"{directory}.")
    file_shape = index[stored][2]
    conv_stored_linear = len(shape) == 2 and file_shape == shape + (1, 1)  # LDM attention.
    if file_shape != shape and not conv_stored_linear:
      raise ValueError(f"Tensor {stored} in {index[stored][0]} has shape {file_shape}, expected "
                       f"{shape} for the AutoencoderKL of {directory}/config.json.")
    plan[key] = (stored, file_shape, shape)
  extra = sorted(index.keys() - {stored for stored, _, _ in plan.values()})
  if extra:
    raise ValueError(f"Tensor {extra[0]} in {index[extra[0]][0]} is not part of the "
                     f"AutoencoderKL of {directory}/config.json ({len(extra)} unexpected "
                     "tensors).")
  np_dtype = np.dtype(jnp.dtype(dtype))
  params = {
      key: jnp.asarray(_to_flax(checkpoint.read(stored, file_shape, np_dtype).reshape(shape)))
      for key, (stored, file_shape, shape) in plan.items()}
  return config, traverse_util.unflatten_dict(params)
