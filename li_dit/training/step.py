"""The one train step: (state, frozen arrays, batch) -> (state, metrics).

A rectified-flow step: x0 from the image space (pixels, or a frozen VAE's latents), the text
features from the frozen text side (LLMs, prefixes or tables, and the VAE come in as one pytree,
li_dit.training.plan.frozen_arrays), t from the shifted logit-normal, the velocity loss and its
gradient, AdamW and the EMA. li_dit.training.plan builds the model and jits the step on a mesh.
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections

from li_dit.data import records
from li_dit.diffusion import flow
from li_dit.diffusion import image_space
from li_dit.text import conditioning
from li_dit.training import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_train_step(model, conditioner: conditioning.TextConditioner, space: image_space.ImageSpace,
                    tx, schedule, config: ml_collections.ConfigDict, shift: float):
  """The one train step: (state, frozen arrays (plan.frozen_arrays), batch) -> (state, metrics)."""
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
    # The step's randomness is a function of the step alone, so a resumed run draws the same.
    # Three keys, not a fold_in for the latent draw: fold_in(k, 1) is split(k, 2)[1]. The first
    # two of split(k, 3) are split(k, 2)'s, so pixel-space runs draw what they always drew.
    rng_t, rng_noise, rng_latent = jax.random.split(jax.random.fold_in(base_rng, state.step), 3)
    x0 = space.x0(frozen["vae"], batch, rng_latent)
    text = conditioner.features(frozen["text"], batch)
    t = flow.sample_time(rng_t, x0.shape[0], config.flow.t_mean, config.flow.t_std, shift)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    x_t = flow.interpolate(x0, noise, t)

    def loss_fn(params):
      v = model.apply({"params": params}, x_t, t, text)
      return jnp.mean(flow.flow_loss(v, x0, noise))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(jnp.add, state.params, updates)
    ema_params = optim.ema_update(state.ema_params, params, state.step, config.optim.ema_decay)
    # A step whose loss, gradients or new parameters are not finite changes nothing but the step
    # count (the data moves on), so one bad batch cannot poison the state or a checkpoint. The
    # select fuses into the update: no second copy of the state.
    finite = jnp.isfinite(loss) & all_finite(grads) & all_finite(params)
    keep = lambda new, old: jnp.where(finite, new, old)
    new_state = TrainState(
        step=state.step + 1,
        params=jax.tree_util.tree_map(keep, params, state.params),
        ema_params=jax.tree_util.tree_map(keep, ema_params, state.ema_params),
        opt_state=jax.tree_util.tree_map(keep, opt_state, state.opt_state))
    metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": schedule(state.step),
               "truncated_captions": jnp.sum(batch["truncated"]),
               "nonfinite": jnp.logical_not(finite).astype(jnp.int32)}
    # Records the pipeline could not decode (replaced in the batch), by reason.
    skipped = jnp.sum(batch["skipped"], axis=0)
    metrics.update({f"skipped/{reason}": skipped[i] for i, reason in enumerate(records.REASONS)})
    return new_state, metrics

  return train_step


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: whether every element of every leaf of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
