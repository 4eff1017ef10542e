"""Rectified flow: interpolation, velocity target, timestep distribution, resolution shift
(`time_shift`: a run config's shift at an image size).

Convention (SD3): x_t = (1 - t) * x0 + t * noise, t = 0 is data and t = 1 is noise, and the
network predicts the velocity v = dx_t/dt = noise - x0.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections


def resolution_shift(num_pixels: int, base_pixels: int, base_shift: float = 1.0) -> float:
  """SD3's timestep shift for a resolution: sqrt(num_pixels / base_pixels) * base_shift.

  Larger images keep more signal at a given noise level, so training and sampling move t towards
  the noise end as the resolution grows. `num_pixels` counts positions of the model's input
  (latent pixels for a VAE model).
  """
  return base_shift * math.sqrt(num_pixels / base_pixels)


def time_shift(config: ml_collections.ConfigDict, size: tuple[int, int] | None = None) -> float:
  """The resolution-dependent timestep shift at `size` = (height, width) pixels (default: the
  square config.input.image_size); config.flow.base_size is the side whose shift is base_shift."""
  height, width = size or (config.input.image_size,) * 2
  return resolution_shift(height * width, config.flow.base_size ** 2, config.flow.base_shift)


def shift_time(t: jax.Array, shift: float) -> jax.Array:
  """t' = shift * t / (1 + (shift - 1) * t): monotone map of [0,1] onto itself (shift 1: identity)."""
  return shift * t / (1 + (shift - 1) * t)


def sample_time(rng: jax.Array, batch: int, mean: float = 0.0, std: float = 1.0,
                shift: float = 1.0) -> jax.Array:
  """Logit-normal t: sigmoid(N(mean, std^2)), then `shift_time`. Returns [batch] float32."""
  u = mean + std * jax.random.normal(rng, (batch,), jnp.float32)
  return shift_time(jax.nn.sigmoid(u), shift)


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
  """x_t = (1 - t) x0 + t noise, with t [B] broadcast over the other axes of x0 [B,...]."""
  t = t.reshape((-1,) + (1,) * (x0.ndim - 1))
  return (1 - t) * x0 + t * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
  """v = noise - x0, the target of the velocity prediction."""
  return noise - x0


def flow_loss(predicted_velocity: jax.Array, x0: jax.Array, noise: jax.Array) -> jax.Array:
  """Mean squared error of the velocity, per example: [B,...] -> [B] float32."""
  err = jnp.square(predicted_velocity.astype(jnp.float32) - velocity_target(x0, noise))
  return jnp.mean(err.reshape(err.shape[0], -1), axis=1)
