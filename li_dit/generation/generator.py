"""Text-to-image generation from a model and its frozen text side, shared by training (sample
grids), `li_dit.sample` and `li_dit.evaluate`, on the same device mesh and logical rules as
training (`li_dit.generation.load.load_run` makes one of a trained run).

One jitted program encodes the prompts and the empty prompt with the frozen LLMs, runs the
sampler (the refiners and the DiT at every step, conditional and unconditional halves as one
batch split over the data-parallel axes) and, in a VAE's latent space, decodes the result to
pixels (li_dit.diffusion.image_space). `save_grid` writes the images as one PNG grid.
"""
from __future__ import annotations

import functools
import io
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from PIL import Image

from li_dit.data import order
from li_dit.diffusion import flow
from li_dit.diffusion import image_space
from li_dit.diffusion import samplers
from li_dit.models import layers
from li_dit.models import lidit
from li_dit.parallel import sharding
from li_dit.text import conditioning


def to_uint8(x: jax.Array) -> jax.Array:
  """[-1, 1] float images -> uint8 (jit-able)."""
  return jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255).astype(jnp.uint8)


class Generator:
  """Samples images for prompts with a trained LI-DiT, on a device mesh.

  One jitted program per (size, steps, sampler) encodes the prompts and the empty prompt (the
  classifier-free guidance null condition) with the frozen LLMs, runs the sampler (conditional
  and unconditional halves as one batch) and decodes latents to pixels. Parameters, LLMs and VAE
  stay where they are (sharded by the logical rules, as in training); the prompts and their
  noise are split over the mesh's data-parallel axes, the batch padded to a multiple of them;
  splash attention runs under its shard_map.

  Attributes:
    model, conditioner (its LLMs encode any prompt), space (pixels or a VAE), config (the run's:
    its time shift, image size and buckets), mesh, rules.
  """

  def __init__(self, model: lidit.LIDiT, conditioner: conditioning.TextConditioner,
               space: image_space.ImageSpace, config: ml_collections.ConfigDict,
               mesh: jax.sharding.Mesh, rules: Any):
    self.model = model
    self.conditioner = conditioner
    self.space = space
    self.config = config
    self.mesh = mesh
    self.rules = rules
    # Images come back whole on every process (uint8, small next to the model).
    self.program = jax.jit(functools.partial(_generate, model, space, conditioner),
                           static_argnames=("steps", "sampler", "shift"),
                           out_shardings=sharding.replicated(mesh))

  @property
  def batch_multiple(self) -> int:
    """Batches are padded to a multiple of this: the data-parallel size of the mesh."""
    return sharding.data_parallel_size(self.mesh, self.rules)

  @property
  def sizes(self) -> tuple[tuple[int, int], ...]:
    """The (H, W) pixel sizes the run trained on: its buckets, or the square image_size."""
    return order.bucket_shapes(self.config.input)

  def noise(self, seed: int, batch: int, size: tuple[int, int]) -> jax.Array:
    """The initial noise of `batch` images of `size` (H, W) pixels: float32 [B,h,w,C], a function
    of the seed alone (not of the mesh or the padding)."""
    return jax.random.normal(jax.random.key(seed), (batch,) + self.space.latent_shape(*size),
                             jnp.float32)

  def inputs(self, prompts: Sequence[str], seed: int, size: tuple[int, int]
             ) -> tuple[dict[str, jax.Array], dict[str, jax.Array], jax.Array]:
    """The program's host inputs on the mesh: (token rows [Bp,L] per LLM, the empty prompt's
    rows [Bp,L], noise [Bp,h,w,C]), split over the data-parallel axes; Bp = len(prompts) padded
    to `batch_multiple` (empty prompts, zero noise)."""
    pad = -len(prompts) % self.batch_multiple
    noise = np.asarray(self.noise(seed, len(prompts), size))
    noise = np.concatenate([noise, np.zeros((pad,) + noise.shape[1:], noise.dtype)])
    tokens = self.conditioner.tokenize(list(prompts) + [""] * pad)
    # Every process holds the same host arrays and places its own shards of them.
    place = lambda x, where: jax.make_array_from_callback(x.shape, where, lambda i: x[i])
    split = lambda x: place(x, sharding.batch_sharding(self.mesh, x.ndim, self.rules))
    null = self.conditioner.tokenize([""] * len(noise))
    return ({k: split(v) for k, v in tokens.items()}, {k: split(v) for k, v in null.items()},
            split(noise))

  def __call__(self, params: Any, prompts: Sequence[str], seed: int, steps: int,
               cfg_scale: float, sampler: str = "heun", size: tuple[int, int] | None = None
               ) -> np.ndarray:
    """uint8 images [B,H,W,3] of `prompts` at `size` = (H, W) pixels (default: the square
    config.input.image_size), with the time shift of that size."""
    size = tuple(size or (self.config.input.image_size,) * 2)
    tokens, null, noise = self.inputs(prompts, seed, size)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      images = self.program(params, self.conditioner.llm_state(), self.space.frozen(), tokens,
                            null, noise, jnp.float32(cfg_scale), steps=steps, sampler=sampler,
                            shift=flow.time_shift(self.config, size))
    return np.asarray(images)[:len(prompts)]


def _generate(model: lidit.LIDiT, space: image_space.ImageSpace,
              conditioner: conditioning.TextConditioner, params: Any, llm_state: Any,
              frozen_vae: Any, tokens: dict[str, jax.Array], null_tokens: dict[str, jax.Array],
              noise: jax.Array, cfg_scale: jax.Array, steps: int, sampler: str, shift: float
              ) -> jax.Array:
  """Token rows [B,L] per LLM and noise [B,h,w,C] -> uint8 images [B,H,W,3]."""
  # One LLM pass over the prompts and the empty prompts together [2B,L]: with two passes XLA
  # shares each all-gathered LLM weight between them, so a whole gathered LLM stays alive per chip.
  both = conditioner.encode_tokens(
      llm_state, {k: jnp.concatenate([tokens[k], null_tokens[k]]) for k in tokens})

  def denoise(x, t):
    x = layers.constrain(x, ("batch", None, None, None))
    return model.apply({"params": params}, x, t, both)
  images = space.decode(frozen_vae, samplers.sample(denoise, noise, steps, cfg_scale, sampler,
                                                    shift))
  return to_uint8(images)


def save_grid(images: np.ndarray, path: str, columns: int | None = None, scale: int = 1) -> None:
  """Writes uint8 images [N,H,W,C] as one PNG grid (C = 1 or 3), upscaled `scale` times."""
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.full((rows * h, columns * w, c), 255, np.uint8)
  for i, img in enumerate(images):
    r, col = divmod(i, columns)
    grid[r * h:(r + 1) * h, col * w:(col + 1) * w] = img
  pil = Image.fromarray(grid[..., 0] if c == 1 else grid)
  if scale > 1:
    pil = pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST)
  path = epath.Path(path)  # Local or gs://.
  buffer = io.BytesIO()
  pil.save(buffer, Image.registered_extensions().get(path.suffix.lower(), "PNG"))
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(buffer.getvalue())
