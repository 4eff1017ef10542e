"""Where the diffusion model works: pixels, or the latent space of a frozen VAE.

  config.vae.path ""      pixel space: x0 = the images scaled to [-1, 1], and back.
  config.vae.path DIR     a diffusers AutoencoderKL folder (li_dit.io.diffusers_vae). The train
                          step encodes every batch online, x0 = normalize(z) with z a draw from
                          the encoder's Gaussian (config.vae.sample_latents) or its mean, under
                          stop_gradient; generation samples latents, denormalizes and decodes them.
                          A dataset of latents (tools/encode_latents.py,
                          li_dit.data.latent_datasets) holds the encoder's Gaussians instead of
                          images: the step draws z from them the same way, so cached and online
                          runs see the same x0.

`config.input.image_size` and `config.input.buckets` are pixels either way; the DiT sees
[B, H/f, W/f, model.channels] (f = 1 in pixel space). Like the frozen LLMs, the VAE's parameters
are arrays passed into jitted functions (`frozen()`), never closed over and never checkpointed
with the run. Their logical axes (conv_h, conv_w, channels_in, channels) have no mesh axis in the
default rules, so the VAE is replicated; its activations are split over the batch.

The image space belongs to the diffusion process, not to one job: the train step draws x0 from
it, generation decodes with it, and a dataset of latents is encoded by it.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from li_dit import config_lib
from li_dit.data import records
from li_dit.io import architectures
from li_dit.io import diffusers_vae
from li_dit.models import vae as vae_lib
from li_dit.parallel import sharding

RGB = 3  # Channels of the data's images (li_dit.data decodes everything to RGB).


class ImageSpace:
  """The map between data images and the diffusion model's inputs and outputs.

  Attributes:
    channels: C of what the DiT sees (model.channels).
    image_channels: channels of the data's images.
    factor: f, pixels per latent along each side (1 in pixel space).
    vae: the AutoencoderKL module; None in pixel space.
    params: its parameters (arrays, or ShapeDtypeStructs to plan a compile); None in pixel space.
    sample_latents: encode to a draw from the encoder's Gaussian (True) or to its mean.
  """

  def __init__(self, channels: int, vae: vae_lib.AutoencoderKL | None = None,
               params: Any = None, sample_latents: bool = True):
    self.channels = channels
    self.vae = vae
    self.params = params
    self.sample_latents = sample_latents
    self.factor = 1 if vae is None else vae.config.downsampling_factor
    self.image_channels = channels if vae is None else vae.config.in_channels

  def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
    """(h, w, C) of the DiT's input for images of height x width pixels."""
    return height // self.factor, width // self.factor, self.channels

  def frozen(self) -> Any:
    """The arrays `encode` and `decode` need, as a pytree (empty in pixel space)."""
    return {} if self.vae is None else self.params

  def frozen_logical_specs(self) -> Any:
    """Logical PartitionSpecs of `frozen()`, leaf for leaf."""
    if self.vae is None:
      return {}
    return nn.get_partition_spec(diffusers_vae.expected_params(self.vae.config))

  def moments(self, frozen: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Pure and jit-able: uint8 images [B,H,W,3] -> the encoder's (mean, logvar), float32
    [B,H/f,W/f,C] each, unnormalised (what a dataset of latents stores). Latent space only."""
    x = images.astype(jnp.float32) / 127.5 - 1.0
    return vae_lib.encode(self.vae, frozen, x.astype(self.vae.dtype))

  def from_moments(self, mean: jax.Array, logvar: jax.Array, rng: jax.Array) -> jax.Array:
    """The encoder's Gaussians [B,h,w,C] -> x0 float32 [B,h,w,C]: normalize(a draw from them, or
    their mean), with no gradient. `rng` draws the sample."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    z = vae_lib.sample(rng, mean, logvar) if self.sample_latents else mean
    return jax.lax.stop_gradient(self.vae.config.normalize(z))

  def encode(self, frozen: Any, images: jax.Array, rng: jax.Array) -> jax.Array:
    """Pure and jit-able: uint8 images [B,H,W,3] -> x0 float32 [B,H/f,W/f,C] (no gradient).

    `rng` draws the latent sample; unused in pixel space and for the mean.
    """
    if self.vae is None:
      return images.astype(jnp.float32) / 127.5 - 1.0
    return self.from_moments(*self.moments(frozen, images), rng)

  def x0(self, frozen: Any, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
    """x0 [B,h,w,C] of a data batch: its images encoded, or its cached latents
    (records.LATENT_MEAN, records.LATENT_LOGVAR) drawn from with the same `rng`."""
    if records.LATENT_MEAN in batch:
      return self.from_moments(batch[records.LATENT_MEAN], batch[records.LATENT_LOGVAR], rng)
    return self.encode(frozen, batch["image"], rng)

  def decode(self, frozen: Any, x: jax.Array) -> jax.Array:
    """Pure and jit-able: the DiT's outputs [B,h,w,C] -> float32 images [B,h*f,w*f,3], about
    [-1, 1] (not clipped)."""
    if self.vae is None:
      return x
    z = self.vae.config.denormalize(x.astype(jnp.float32)).astype(self.vae.dtype)
    return vae_lib.decode(self.vae, frozen, z)


def check_vae_fits(config: ml_collections.ConfigDict, vae_config: vae_lib.VAEConfig) -> None:
  """Raises ConfigError, naming the fields, when the VAE of config.vae.path does not fit the
  model and the input sizes of `config`."""
  where = f"the VAE in config.vae.path={config.vae.path!r}"
  m = config.model
  if (vae_config.in_channels, vae_config.out_channels) != (RGB, RGB):
    raise config_lib.ConfigError(
        f"config.vae.path: {where} maps {vae_config.in_channels}-channel images to "
        f"{vae_config.out_channels}-channel images; the data is RGB ({RGB} channels)")
  if vae_config.latent_channels != m.channels:
    raise config_lib.ConfigError(
        f"config.model.channels: {m.channels} does not match latent_channels="
        f"{vae_config.latent_channels} of {where}")
  f = vae_config.downsampling_factor
  step = f * m.patch_size
  why = (f"f * model.patch_size = {f} * {m.patch_size} = {step} (pixels per token side: "
         f"{where} downsamples {f}x)")
  if config.input.image_size % step:
    raise config_lib.ConfigError(
        f"config.input.image_size: {config.input.image_size} is not divisible by {why}")
  for bucket in config.input.buckets:
    if any(int(side) % step for side in bucket):
      raise config_lib.ConfigError(
          f"config.input.buckets: {tuple(bucket)} has a side not divisible by {why}")


def read_vae_config(path: str, planned: bool = False) -> vae_lib.VAEConfig:
  """The VAEConfig of config.vae.path (ConfigError naming the field). `planned`: a path that is
  not on this machine may name a published VAE (li_dit.io.architectures), as a run planned here
  for a pod whose workers hold the VAE."""
  try:
    return diffusers_vae.read_vae_config(path)
  except FileNotFoundError as e:
    if not planned:
      raise config_lib.ConfigError(f"config.vae.path: {e}") from e
    try:
      return architectures.known_vae_config(path)
    except ValueError as unknown:
      raise config_lib.ConfigError(f"config.vae.path: {unknown}") from e
  except (OSError, ValueError) as e:
    raise config_lib.ConfigError(f"config.vae.path: {e}") from e


def from_config(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                rules: Any = None, load: bool = True) -> ImageSpace:
  """The image space of a run's config, its VAE checked against the config before any weight is
  read (ConfigError naming the field or file).

  Args:
    mesh, rules: put the VAE's parameters on `mesh` by the logical `rules` (else: the default
      device).
    load: False gives the parameters as ShapeDtypeStructs, read from nothing but config.json,
      or a published VAE's architecture when the path is not on this machine (ahead-of-time
      compiles, run cards).
  """
  # Runs saved before config.vae existed were all in pixel space.
  vae_fields = config.get("vae") or ml_collections.ConfigDict(dict(path=""))
  if not vae_fields.path:
    if config.model.channels != RGB:
      raise config_lib.ConfigError(
          f"config.model.channels: {config.model.channels} in pixel space (config.vae.path is "
          f"empty), where the data is RGB ({RGB} channels); give config.vae.path a VAE with "
          f"{config.model.channels} latent channels")
    return ImageSpace(config.model.channels)
  vae_config = read_vae_config(vae_fields.path, planned=not load)
  check_vae_fits(config, vae_config)
  dtype = jnp.dtype(vae_fields.dtype)
  if load:
    try:
      _, params = diffusers_vae.load_vae(vae_fields.path, dtype)
    except (OSError, ValueError) as e:
      raise config_lib.ConfigError(f"config.vae.path: {e}") from e
  else:
    params = nn.unbox(diffusers_vae.expected_params(vae_config, dtype))
  space = ImageSpace(config.model.channels, vae_lib.AutoencoderKL(vae_config, dtype=dtype,
                                                                  param_dtype=dtype),
                     params, vae_fields.sample_latents)
  if mesh is not None and load:
    # From host arrays, as the LLMs' weights: every process puts its own copy on its devices.
    space.params = jax.device_put(jax.tree.map(np.asarray, params), sharding.divisible_shardings(
        space.frozen_logical_specs(), params, mesh, rules))
  return space
