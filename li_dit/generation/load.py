"""A trained run, ready to sample: its config, a Generator on a mesh and its parameters.

`li_dit.sample` and `li_dit.evaluate` read a run's checkpoint with `load_run`, on the devices
present (`fit_mesh`) or on a mesh given with --mesh (`parse_mesh`).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import ml_collections

from li_dit import config_lib
from li_dit.diffusion import image_space
from li_dit.generation import generator as generator_lib
from li_dit.io import checkpoints
from li_dit.models import lidit
from li_dit.parallel import sharding
from li_dit.text import conditioning
from li_dit.text import encoders as encoders_lib


def fit_mesh(sizes: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """A run's mesh sizes (config.mesh) fitted to `num_devices` devices: as they are when they fit;
  else the run's tensor size where it divides the devices (1 otherwise) and fsdp over the rest,
  which shards the parameters as far as the devices go."""
  try:
    return dict(zip(sharding.MESH_AXES, sharding.mesh_shape(sizes, num_devices)))
  except ValueError:
    tensor = int(sizes.get("tensor", 1))
    tensor = tensor if tensor > 0 and num_devices % tensor == 0 else 1
    return {"data": 1, "fsdp": num_devices // tensor, "tensor": tensor}


def parse_mesh(text: str) -> dict[str, int]:
  """"data=D,fsdp=F,tensor=T" (any subset; the rest 1) -> sizes; ConfigError naming the part."""
  sizes = {}
  for part in filter(None, (p.strip() for p in text.split(","))):
    axis, _, value = part.partition("=")
    if axis not in sharding.MESH_AXES or not value.lstrip("-").isdigit():
      raise config_lib.ConfigError(f"--mesh: {part!r} is not AXIS=SIZE with AXIS one of {sharding.MESH_AXES}")
    sizes[axis] = int(value)
  return sizes


def load_run(workdir: str, step: int | None = None, ema: bool = True,
             mesh_sizes: Mapping[str, int] | None = None
             ) -> tuple[ml_collections.ConfigDict, generator_lib.Generator, Any, int]:
  """A trained run's config, a Generator on a mesh and its (EMA) params, from a checkpoint.

  Args:
    step: the checkpoint (default: the latest).
    ema: the EMA parameters (else the raw ones).
    mesh_sizes: {axis: size} of the mesh over the first devices of this process (li_dit.sample
      --mesh); default: the run's mesh fitted to the devices present (`fit_mesh`).
  Returns (config, generator, params, step). Parameters are restored straight into their shards,
  the LLMs and the VAE loaded into theirs, by the run's logical rules; prompts are encoded online
  (any prompt works). Raises CheckpointError (no checkpoint) or ConfigError (a mesh that does not
  fit, a missing frozen model), naming what is wrong.
  """
  with checkpoints.Checkpointer(workdir, async_save=False, create=False) as ckpt:
    # Every checkpoint of a run has its config; the model's shapes come from it.
    config = ckpt.newest_config(step)
    mesh, rules = _sampling_mesh(config, mesh_sizes)
    space = image_space.from_config(config, mesh, rules)
    conditioner = conditioning.TextConditioner(
        encoders_lib.build_encoders(config.text, mesh, rules), conditioning.ONLINE)
    model = lidit.build_model(config, len(conditioner.names))
    size = config.input.image_size
    abstract = lidit.abstract_params(model, [e.width for e in conditioner.encoders.values()],
                                     space.latent_shape(size, size))
    shardings = sharding.divisible_shardings(nn.get_partition_spec(abstract), nn.unbox(abstract),
                                             mesh, rules)
    target = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), nn.unbox(abstract),
        shardings)
    item = "ema_params" if ema else "params"
    # The newest checkpoint that restores whole, its config included (a damaged one is moved
    # aside), or `step`.
    def abstract_at(candidate: int) -> dict[str, Any]:
      ckpt.restore_config(candidate)  # A config that does not read is damage too.
      return {item: target}

    step, restored = ckpt.restore_whole(abstract_at, step)
    params = restored[item]
  generator = generator_lib.Generator(model, conditioner, space, config, mesh, rules)
  return config, generator, params, step


def _sampling_mesh(config: ml_collections.ConfigDict, sizes: Mapping[str, int] | None
                   ) -> tuple[jax.sharding.Mesh, Any]:
  """The mesh (over this process's first devices) and logical rules a run samples with."""
  devices = jax.local_devices()
  sizes = fit_mesh(config.mesh, len(devices)) if sizes is None else dict(sizes)
  count = len(devices) if -1 in sizes.values() else math.prod(sizes.values())
  try:
    mesh = sharding.make_mesh(sizes, devices[:count])
    rules = sharding.rules_from_config(config.sharding_rules)
  except ValueError as e:
    raise config_lib.ConfigError(f"--mesh: {e}") from e
  return mesh, rules
