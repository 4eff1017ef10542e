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


# Leaf names of the weights that multiply activations (Dense and conv kernels, embedding
# tables): these are decayed. Biases (modulation biases included) and norm scales are not,
# whatever their rank: scanned blocks stack every leaf to 2-D and more.
DECAYED_NAMES = ("kernel", "embedding")


def decay_mask(params: Any) -> Any:
  """A tree of bools like `params`: True where AdamW's weight decay applies (by leaf name)."""
  def decayed(path, _):
    # The last dict key: boxed (logically partitioned) leaves add an attribute key after it.
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return bool(names) and names[-1] in DECAYED_NAMES
  return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(optim: ml_collections.ConfigDict,
                   total_steps: int) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(optim, total_steps)
  tx = optax.chain(
      optax.clip_by_global_norm(optim.grad_clip),
      optax.adamw(schedule, b1=optim.b1, b2=optim.b2, eps=optim.eps,
                  weight_decay=optim.weight_decay, mask=decay_mask))
  return tx, schedule


def ema_decay(step: jax.Array, decay: float) -> jax.Array:
  """min(decay, (1 + step) / (10 + step)): short runs average recent weights, not the init."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def ema_update(ema: Any, params: Any, step: jax.Array, decay: float) -> Any:
  d = ema_decay(step, decay)
  return jax.tree_util.tree_map(lambda e, p: e * d + p.astype(e.dtype) * (1 - d), ema, params)
