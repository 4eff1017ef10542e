"""The train step on a mesh, shared by `li_dit.train` and ahead-of-time compiles
(`tools/aot_compile.py`): the config's mesh, the model, optimizer, state and frozen-side
shardings, the jitted step (`plan_step` -> `StepPlan`), and batches of the right shapes.

The frozen side is one pytree passed into the step, {"text": TextConditioner.frozen(), "vae":
ImageSpace.frozen()} (`frozen_arrays`): LLMs, prefixes or tables, and the VAE.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from li_dit import config_lib
from li_dit.data import records
from li_dit.diffusion import flow
from li_dit.diffusion import image_space
from li_dit.models import lidit
from li_dit.parallel import sharding
from li_dit.text import conditioning
from li_dit.training import optim
from li_dit.training import step as step_lib


class StepPlan(NamedTuple):
  """The train step and what it is built from: the same for a run and an ahead-of-time compile.

  Attributes:
    init_state: rng -> the initial TrainState (unboxed), to jit with `state_shardings`.
    state_shardings, frozen_shardings: NamedShardings of the TrainState and of the frozen side
      (`frozen_arrays`).
    train_step: jitted (state, frozen, batch) -> (state, metrics); call or lower it inside
      `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)`.
  """
  model: lidit.LIDiT
  rules: tuple[tuple[str, Any], ...]
  init_state: Callable[[jax.Array], step_lib.TrainState]
  state_shardings: Any
  frozen_shardings: Any
  train_step: Any


def make_mesh(config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> jax.sharding.Mesh:
  """The mesh of `config` (config.mesh within a slice, config.dcn_mesh across slices) over
  `devices` (default: all); ConfigError when the sizes do not fit the devices."""
  try:
    return sharding.make_mesh(config.mesh, devices, config.dcn_mesh)
  except ValueError as e:
    raise config_lib.ConfigError(f"config.mesh / config.dcn_mesh: {e}") from e


def check_batch_divides(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh
                        ) -> tuple[tuple[str, Any], ...]:
  """Raises ConfigError unless the global batch, and each micro-batch of
  config.optim.accumulate_steps, divides over the mesh's data-parallel devices.

  Returns the sharding rules of `config` (which decide which mesh axes split the batch).
  """
  rules = sharding.rules_from_config(config.sharding_rules)
  dp = sharding.data_parallel_size(mesh, rules)
  if config.input.batch_size % dp:
    raise config_lib.ConfigError(
        f"config.input.batch_size={config.input.batch_size} does not divide over the "
        f"{dp} data-parallel devices of mesh {dict(mesh.shape)}")
  micro_batch = config.input.batch_size // config.optim.accumulate_steps
  if micro_batch % dp:
    raise config_lib.ConfigError(
        f"config.optim.accumulate_steps={config.optim.accumulate_steps}: micro-batches of "
        f"{micro_batch} rows do not divide over the {dp} data-parallel devices of mesh "
        f"{dict(mesh.shape)}")
  return rules


def frozen_arrays(conditioner: conditioning.TextConditioner, space: image_space.ImageSpace
                  ) -> dict[str, Any]:
  """The frozen side of the train step, one pytree: {"text": ..., "vae": ...}."""
  return {"text": conditioner.frozen(), "vae": space.frozen()}


def plan_step(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh,
              conditioner: conditioning.TextConditioner, space: image_space.ImageSpace) -> StepPlan:
  """Builds the model, optimizer, state shardings and the jitted train step on `mesh`.

  Raises ConfigError when the global batch does not divide over the data-parallel devices.
  """
  rules = check_batch_divides(config, mesh)
  memories = {m.kind for m in mesh.devices.flat[0].addressable_memories()}
  if config.model.remat == "offload" and "pinned_host" not in memories:
    raise config_lib.ConfigError(
        f"config.model.remat='offload': {mesh.devices.flat[0].platform} devices have no host "
        f"memory to offload to (memories {sorted(memories)}); use 'save_dots' or 'full'")
  model = lidit.build_model(config, len(conditioner.names))
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  size = config.input.image_size
  text_shapes = jax.eval_shape(conditioner.features, conditioner.frozen(),
                               example_text_batch(conditioner, 1))

  def init_state(rng):
    x = jnp.zeros((1,) + space.latent_shape(size, size), jnp.float32)
    text = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), text_shapes)
    params = model.init(rng, x, jnp.zeros((1,)), text)["params"]
    # The optimizer state is built from the boxed params, so its moments carry the params'
    # logical axes and are sharded like them (not replicated).
    return step_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                               opt_state=tx.init(params))

  # Shapes and logical axes without allocating anything.
  abstract = jax.eval_shape(init_state, jax.random.key(0))
  frozen_shardings = sharding.divisible_shardings(
      {"text": conditioner.frozen_logical_specs(), "vae": space.frozen_logical_specs()},
      frozen_arrays(conditioner, space), mesh, rules)
  step_fn = step_lib.make_train_step(model, conditioner, space, tx, schedule, config,
                                     flow.time_shift(config))
  state_shardings = sharding.divisible_shardings(
      nn.get_partition_spec(abstract), nn.unbox(abstract), mesh, rules)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    # Batch shardings come with the global arrays (sharding.host_to_global).
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, None),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))
  return StepPlan(model, rules, lambda rng: nn.unbox(init_state(rng)),
                  state_shardings, frozen_shardings, train_step)


def example_text_batch(conditioner: conditioning.TextConditioner, batch_size: int
                       ) -> dict[str, np.ndarray]:
  """The text fields of a data batch, zeros of the right shapes and dtypes."""
  if conditioner.mode == conditioning.ONLINE:
    out = {}
    for name, enc in conditioner.encoders.items():
      out[f"tokens/{name}"] = np.zeros((batch_size, enc.layout.length), np.int32)
      out[f"mask/{name}"] = np.ones((batch_size, enc.layout.length), bool)
    return out
  return {"caption_id": np.zeros((batch_size,), np.int32)}


def example_batch(config: ml_collections.ConfigDict, conditioner: conditioning.TextConditioner,
                  space: image_space.ImageSpace) -> dict[str, np.ndarray]:
  """A global data batch of `config` as the pipeline makes it, zeros (square image_size)."""
  size, batch = config.input.image_size, config.input.batch_size
  return {"image": np.zeros((batch, size, size, space.image_channels), np.uint8),
          "truncated": np.zeros((batch,), np.int32),
          "skipped": np.zeros((batch, len(records.REASONS)), np.int32),
          **example_text_batch(conditioner, batch)}
