"""Text-to-image generation from a model and its frozen text side, shared by training (sample
grids), `li_dit.sample` and `li_dit.evaluate`.

LLM features are computed once per prompt; the refiners and the DiT run at every sampler step
(both depend on t), conditional and unconditional halves as one batch. The sampler runs in the
DiT's space; in a VAE's latent space its result is decoded to pixels (li_dit.latents).
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

from li_dit import latents
from li_dit.diffusion import flow
from li_dit.diffusion import samplers
from li_dit.models import li_dit
from li_dit.text import conditioning
from li_dit.text import encoders as encoders_lib


def build_encoders(text_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                   rules: Any = None) -> dict[str, encoders_lib.PromptEncoder]:
  """One frozen PromptEncoder per configured LLM, in the order of their names; with a mesh,
  their weights are loaded straight into their shards (`PromptEncoder`)."""
  return {name: encoders_lib.PromptEncoder(name=name, mesh=mesh, rules=rules,
                                           **text_config.llms[name].to_dict())
          for name in sorted(text_config.llms)}


def build_model(config: ml_collections.ConfigDict, num_llms: int) -> li_dit.LIDiT:
  return li_dit.LIDiT(li_dit.ModelConfig(**config.model.to_dict()), num_llms=num_llms)


def time_shift(config: ml_collections.ConfigDict) -> float:
  """The resolution-dependent timestep shift of this config's input size."""
  size = config.input.image_size
  return flow.resolution_shift(size * size, config.flow.base_size ** 2, config.flow.base_shift)


def to_uint8(x: jax.Array) -> np.ndarray:
  """[-1, 1] float images -> uint8 numpy."""
  return np.asarray(jnp.clip(jnp.round((x + 1.0) * 127.5), 0, 255)).astype(np.uint8)


class Generator:
  """Samples images for prompts with a trained LI-DiT.

  Attributes:
    model: the LIDiT module. conditioner: its frozen text side (online mode is used for
    arbitrary prompts). space: pixels or the VAE latents the model works in. image_size:
    (H, W) of the images, in pixels. latent_shape: (h, w, C) of the model's input.
  """

  def __init__(self, model: li_dit.LIDiT, conditioner: conditioning.TextConditioner,
               space: latents.ImageSpace, image_size: tuple[int, int], shift: float):
    self.model = model
    self.conditioner = conditioner
    self.space = space
    self.image_size = image_size
    self.latent_shape = space.latent_shape(*image_size)
    self.shift = shift
    self._null = None
    self._sample = jax.jit(functools.partial(_sample, model, space),
                           static_argnames=("steps", "sampler", "shift"))

  def encode(self, prompts: Sequence[str]) -> list[li_dit.TextFeatures]:
    return self.conditioner.encode_prompts(prompts)

  def null_features(self) -> list[li_dit.TextFeatures]:
    """Features of the empty prompt, the unconditional half of classifier-free guidance."""
    if self._null is None:
      self._null = self.conditioner.encode_prompts([""])
    return self._null

  def sample(self, params: Any, text: Sequence[li_dit.TextFeatures], seed: int, steps: int,
             cfg_scale: float, sampler: str = "heun") -> np.ndarray:
    """Images for pre-encoded prompts: text per LLM [B,...] -> uint8 [B,H,W,C]."""
    batch = text[0].tokens.shape[0]
    noise = jax.random.normal(jax.random.key(seed), (batch,) + self.latent_shape, jnp.float32)
    x = self._sample(params, self.space.frozen(), list(text), self.null_features(), noise,
                     steps=steps, cfg_scale=float(cfg_scale), sampler=sampler, shift=self.shift)
    return to_uint8(x)

  def __call__(self, params: Any, prompts: Sequence[str], seed: int, steps: int,
               cfg_scale: float, sampler: str = "heun") -> np.ndarray:
    return self.sample(params, self.encode(prompts), seed, steps, cfg_scale, sampler)


def _sample(model: li_dit.LIDiT, space: latents.ImageSpace, params: Any, frozen_vae: Any,
            text: list[li_dit.TextFeatures], null: list[li_dit.TextFeatures], noise: jax.Array,
            steps: int, cfg_scale: float, sampler: str, shift: float) -> jax.Array:
  """Noise [B,h,w,C] -> float32 images [B,H,W,3], about [-1, 1]."""
  batch = noise.shape[0]
  both = [li_dit.TextFeatures(
      t.prefix,
      jnp.concatenate([t.tokens, jnp.broadcast_to(n.tokens, (batch,) + n.tokens.shape[1:])]),
      jnp.concatenate([t.mask, jnp.broadcast_to(n.mask, (batch,) + n.mask.shape[1:])]))
          for t, n in zip(text, null)]

  def denoise(x, t):
    return model.apply({"params": params}, x, t, both)
  return space.decode(frozen_vae, samplers.sample(denoise, noise, steps, cfg_scale, sampler,
                                                  shift))


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


def load_run(workdir: str, step: int | None = None, ema: bool = True
             ) -> tuple[ml_collections.ConfigDict, Generator, Any, int]:
  """A trained run's config, a Generator and its (EMA) params, from the latest checkpoint.

  Returns (config, generator, params, step). Prompts are encoded online (any prompt works).
  """
  from li_dit.io import checkpoints  # Entry points only: keeps training imports lean.
  with checkpoints.Checkpointer(workdir, async_save=False) as ckpt:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise checkpoints.CheckpointError(f"no checkpoint in {checkpoints.checkpoint_dir(workdir)}")
    config = ckpt.restore_config(step)
    space = latents.from_config(config)
    conditioner = conditioning.TextConditioner(build_encoders(config.text), conditioning.ONLINE)
    model = build_model(config, len(conditioner.names))
    size = config.input.image_size
    text = conditioner.encode_prompts([""])
    abstract = jax.eval_shape(
        lambda: nn.unbox(model.init(jax.random.key(0),
                                    jnp.zeros((1,) + space.latent_shape(size, size)),
                                    jnp.zeros((1,)), text)["params"]))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree_util.tree_map(
        lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract)
    item = "ema_params" if ema else "params"
    params = ckpt.restore(step, {item: abstract})[item]
  generator = Generator(model, conditioner, space, (size, size), time_shift(config))
  return config, generator, params, step
