"""AdamW with warm-up and cosine decay, global-norm clipping, and the EMA of the parameters."""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax


def learning_rate_schedule(optim: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `optim.lr`, then cosine decay to `optim.lr * optim.final_lr_ratio`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=optim.lr, warmup_steps=optim.warmup_steps,
      decay_steps=max(total_steps, optim.warmup_steps + 1),
      end_value=optim.lr * optim.final_lr_ratio)


def _decay_mask(params: Any) -> Any:
  """Weight decay on matrices and conv kernels only, not on biases and norm scales."""
  return jax.tree_util.tree_map(lambda p: p.ndim >= 2, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=_decay_mask))
  return tx, schedule


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """min(decay, (1 + step) / (10 + step)): short runs average recent weights, not the init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  d = ema_decay(step, decay)
  return jax.tree_util.tree_map(lambda e, p: e * d + p.astype(e.dtype) * (1 - d), ema, params)
