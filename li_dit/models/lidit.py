"""LI-DiT: frozen-LLM features -> token refiners -> collaborative refiner -> DiT.

The frozen LLMs themselves are not part of this module (they are not trained and not
checkpointed with the run); it receives their features. Each LLM's features arrive in two parts:
the instruction prefix [P,D], identical for every prompt because the LLM is causal (computed
once), and the per-prompt tokens [B,L,D] with their padding mask.

`build_model` makes the model of a run's config; `abstract_params` gives its parameters' shapes
and logical axes without computing anything (run cards, restoring a run, compile plans).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from li_dit.models import dit as dit_lib
from li_dit.models import layers
from li_dit.models import refiner as refiner_lib


class TextFeatures(NamedTuple):
  """One LLM's features for a batch of prompts.

  prefix: [P,Dllm] the instruction prefix (shared by every prompt).
  tokens: [B,L,Dllm] the prompt part (prompt tokens, chat-template suffix, padding).
  mask: [B,L] bool, True on valid tokens.
  """
  prefix: jax.Array
  tokens: jax.Array
  mask: jax.Array

  def with_prefix(self) -> tuple[jax.Array, jax.Array]:
    """The full sequences: features [B,P+L,D] and mask [B,P+L] (the prefix is always valid).

    The instruction span is [0, P): the refiners keep it and drop it only at the end.
    """
    batch, prefix_len = self.tokens.shape[0], self.prefix.shape[0]
    prefix = jnp.broadcast_to(self.prefix[None].astype(self.tokens.dtype),
                              (batch,) + self.prefix.shape)
    return (jnp.concatenate([prefix, self.tokens], axis=1),
            jnp.concatenate([jnp.ones((batch, prefix_len), bool), self.mask], axis=1))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture of the trainable part (refiners + DiT); see configs/*.py `config.model`."""
  patch_size: int = 2
  channels: int = 3
  width: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  pos_kernel_size: int = 3
  refiner_depth: int = 2
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "xla"
  dtype: str = "float32"
  param_dtype: str = "float32"


class LIDiT(nn.Module):
  """The trainable LI-DiT model.

  Attributes:
    config: architecture.
    num_llms: how many LLM branches feed the model (collaborative refiner when >= 2).
  """
  config: ModelConfig
  num_llms: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, t: jax.Array, text: Sequence[TextFeatures]) -> jax.Array:
    """x [B,H,W,C] noisy input, t [B] in [0,1], text: one TextFeatures per LLM -> [B,H,W,C]."""
    cfg = self.config
    if len(text) != self.num_llms:
      raise ValueError(f"LIDiT was built for {self.num_llms} LLM(s), got features of {len(text)}")
    kw = dict(dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
    t_emb = layers.TimestepEmbedder(cfg.width, name="t_embedder", **kw)(t)

    tokens, masks, conds, prefix_lens = [], [], [], []
    for i, feats in enumerate(text):
      full, mask = feats.with_prefix()
      refined, c = refiner_lib.TokenRefiner(
          cfg.width, cfg.refiner_depth, cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attention,
          name=f"token_refiner_{i}", **kw)(full, mask, t_emb)
      tokens.append(refined)
      masks.append(mask)
      conds.append(c)
      prefix_lens.append(feats.prefix.shape[0])
    if self.num_llms > 1:
      tokens = refiner_lib.CollaborativeRefiner(
          cfg.num_heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attention,
          name="collaborative_refiner", **kw)(tokens, masks, conds)
    text_tokens, text_mask = refiner_lib.drop_instruction_tokens(tokens, masks, prefix_lens)
    text_tokens = layers.constrain(text_tokens, ("batch", "text_length", "embed"))
    return dit_lib.DiT(
        patch_size=cfg.patch_size, channels=cfg.channels, width=cfg.width, depth=cfg.depth,
        num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qk_norm=cfg.qk_norm,
        pos_kernel_size=cfg.pos_kernel_size, scan_layers=cfg.scan_layers, remat=cfg.remat,
        attention=cfg.attention, name="dit", **kw)(x, t_emb, text_tokens, text_mask)


def build_model(config: ml_collections.ConfigDict, num_llms: int) -> LIDiT:
  """The LIDiT of a run's config (its config.model) for `num_llms` LLM branches."""
  return LIDiT(ModelConfig(**config.model.to_dict()), num_llms=num_llms)


def abstract_params(model: LIDiT, llm_widths: Sequence[int],
                    latent_shape: tuple[int, int, int]) -> Any:
  """The model's parameters as boxed ShapeDtypeStructs (logical axis names kept), from
  jax.eval_shape: nothing is computed or allocated. Only the LLMs' widths shape them."""
  text = [TextFeatures(jax.ShapeDtypeStruct((4, width), jnp.float32),
                       jax.ShapeDtypeStruct((1, 8, width), jnp.float32),
                       jax.ShapeDtypeStruct((1, 8), jnp.bool_)) for width in llm_widths]
  return jax.eval_shape(
      lambda x, t, txt: model.init(jax.random.key(0), x, t, txt)["params"],
      jax.ShapeDtypeStruct((1,) + tuple(latent_shape), jnp.float32),
      jax.ShapeDtypeStruct((1,), jnp.float32), text)
