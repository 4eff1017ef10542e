"""ODE samplers for rectified flow with classifier-free guidance.

The whole loop is one `jax.lax.fori_loop`, so it compiles once for a number of steps. The
conditional and unconditional halves run as one batch of 2B through the denoiser.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from li_dit.diffusion import flow

# denoise(x [2B,...], t [2B]) -> velocity [2B,...]; the first B rows are conditional.
Denoiser = Callable[[jax.Array, jax.Array], jax.Array]

SAMPLERS = ("euler", "heun")


def time_grid(steps: int, shift: float = 1.0) -> jax.Array:
  """steps + 1 times from 1 (noise) to 0 (data), uniform before the resolution shift."""
  return flow.shift_time(jnp.linspace(1.0, 0.0, steps + 1, dtype=jnp.float32), shift)


def guided_velocity(denoise: Denoiser, x: jax.Array, t: jax.Array, cfg_scale: float) -> jax.Array:
  """v_uncond + s (v_cond - v_uncond), both halves in one batch. x [B,...], t scalar."""
  batch = x.shape[0]
  v = denoise(jnp.concatenate([x, x]), jnp.full((2 * batch,), t, jnp.float32))
  v_cond, v_uncond = v[:batch], v[batch:]
  return v_uncond + cfg_scale * (v_cond - v_uncond)


def sample(denoise: Denoiser, noise: jax.Array, steps: int, cfg_scale: float,
           sampler: str = "heun", shift: float = 1.0) -> jax.Array:
  """Integrates dx/dt = v from t=1 (x = noise [B,...]) to t=0. Returns x0 [B,...] float32.

  Heun's second-order correction is skipped on the last step (t_next = 0), as in EDM, so heun
  makes 2 * steps - 1 denoiser calls and euler `steps`.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  ts = time_grid(steps, shift)

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    v = guided_velocity(denoise, x, t, cfg_scale)
    x_euler = x + (t_next - t) * v
    if sampler == "euler":
      return x_euler

    def heun(_):
      v_next = guided_velocity(denoise, x_euler, t_next, cfg_scale)
      return x + (t_next - t) * 0.5 * (v + v_next)
    return jax.lax.cond(i == steps - 1, lambda _: x_euler, heun, None)

  return jax.lax.fori_loop(0, steps, step, noise.astype(jnp.float32))
