"""The one train step: (state, frozen arrays, batch) -> (state, metrics).

A rectified-flow step: x0 from the image space (pixels, or a frozen VAE's latents), the text
features from the frozen text side (LLMs, prefixes or tables, and the VAE come in as one pytree,
li_dit.training.plan.frozen_arrays), t from the shifted logit-normal, the velocity loss and its
gradient, AdamW and the EMA. li_dit.training.plan builds the model and jits the step on a mesh.
"""
from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections

from li_dit.data import records
from li_dit.diffusion import flow
from li_dit.diffusion import image_space
from li_dit.models import lidit
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

    # The frozen encoders and the draws above see the whole batch (no gradient: their
    # activations are short-lived), so the draws do not depend on optim.accumulate_steps; the
    # DiT's forward and backward, where the memory goes, run a micro-batch at a time.
    prefixes = [f.prefix for f in text]  # Shared by every row; the rest is per row.

    def loss_fn(params, x_t, t, text_rows, x0, noise):
      rows_text = [lidit.TextFeatures(p, *rows) for p, rows in zip(prefixes, text_rows)]
      v = model.apply({"params": params}, x_t, t, rows_text)
      return jnp.mean(flow.flow_loss(v, x0, noise))

    text_rows = [(f.tokens, f.mask) for f in text]
    loss, grads = accumulate(jax.value_and_grad(loss_fn), state.params,
                             (x_t, t, text_rows, x0, noise), config.optim.accumulate_steps)
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


def accumulate(value_and_grad: Callable[..., tuple[jax.Array, Any]], params: Any,
               batch: tuple[Any, ...], k: int) -> tuple[jax.Array, Any]:
  """The mean loss and gradient of `value_and_grad(params, *batch)` over the whole batch,
  computed k micro-batches at a time in a scan, so one micro-batch's activations are alive at once.

  Every leaf of `batch` has the batch B first, B divisible by k. Micro-batch j holds rows j, j+k,
  j+2k, ...: each is spread over the data-parallel shards like the whole batch, so no device
  idles. The loss is a mean over rows, so the mean of the k micro-batches' losses and gradients
  is the whole batch's (up to the order of float additions). k = 1 is value_and_grad itself.
  """
  if k == 1:
    return value_and_grad(params, *batch)

  def micro(x):  # [B, ...] -> [k, B/k, ...]: row i*k + j goes to micro-batch j.
    return jnp.swapaxes(x.reshape(x.shape[0] // k, k, *x.shape[1:]), 0, 1)

  def add(carry, micro_batch):
    loss, grads = value_and_grad(params, *micro_batch)
    return jax.tree_util.tree_map(jnp.add, carry, (loss, grads)), None

  zeros = (jnp.zeros((), jnp.float32), jax.tree_util.tree_map(jnp.zeros_like, params))
  (loss, grads), _ = jax.lax.scan(add, zeros, jax.tree_util.tree_map(micro, batch))
  return jax.tree_util.tree_map(lambda x: x / k, (loss, grads))


def all_finite(tree: Any) -> jax.Array:
  """A scalar bool: whether every element of every leaf of `tree` is finite."""
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]))


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))
