"""The linguistic token refiner and the collaborative refiner of LI-DiT (paper Sec. 3.2-3.3).

A decoder-only LLM's features are causal: token i never sees tokens after it, which biases the
prompt representation towards its end (the paper's "positional bias"). The token refiner fixes
this with bidirectional self-attention, gated by a condition built from the timestep and the
pooled LLM features. With several LLMs, the collaborative refiner lets each branch read the
others through cross-attention before the branches are concatenated for the DiT.

Instruction tokens (the fixed usage-guidance prefix) are kept through both refiners, so refined
prompt tokens can attend to them, and are dropped only by `drop_instruction_tokens`.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from li_dit.models import layers


class TokenRefiner(nn.Module):
  """Input projection + `depth` blocks of gated bidirectional self-attention and FFN.

  The gates are zero-initialised functions of c = t_emb + MLP(masked_mean(features)), so at
  initialisation the refiner is its input projection.
  """
  width: int
  depth: int = 2
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  attention: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, mask: jax.Array,
               t_emb: jax.Array) -> tuple[jax.Array, jax.Array]:
    """features [B,S,Dllm] (instruction prefix included), mask [B,S] bool, t_emb [B,width].

    Returns:
      tokens [B,S,width] and the condition c [B,width] (reused by the collaborative refiner).
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # LLM hidden states carry a few huge outlier channels; normalise before projecting so the
    # refiner and the pooled condition see features of unit scale whatever the LLM.
    features = layers.RMSNorm(name="input_norm", scale_axes=("embed_in",), **kw)(features)
    x = layers.Dense(self.width, ("embed_in", "embed"), name="input_proj", **kw)(features)
    x = layers.constrain(x, ("batch", "text_length", "embed"))
    pooled = layers.masked_mean(features, mask)
    c = t_emb + layers.Dense(self.width, ("embed_in", "embed"), name="pool_proj", **kw)(pooled)
    for i in range(self.depth):
      x = _GatedBlock(self.num_heads, self.mlp_ratio, self.qk_norm, self.attention,
                      name=f"block_{i}", **kw)(x, mask, c)
    return x, c


class _GatedBlock(nn.Module):
  """x + gate_a * SelfAttn(LN(x)); x + gate_m * FFN(LN(x)), gates from c (zero-initialised)."""
  num_heads: int
  mlp_ratio: float
  qk_norm: bool
  attention: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array, c: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    gate_attn, gate_mlp = layers.AdaLNModulation(2, width, name="gates", **kw)(c)
    # Bidirectional: every valid token attends to every valid token, no causal mask.
    h = layers.Attention(self.num_heads, self.qk_norm, self.attention, name="attn", **kw)(
        layers.layer_norm(x), kv_mask=mask)
    x = x + gate_attn[:, None, :] * h
    h = layers.MLP(int(width * self.mlp_ratio), name="mlp", **kw)(layers.layer_norm(x))
    return x + gate_mlp[:, None, :] * h


class CollaborativeRefiner(nn.Module):
  """One block per branch: cross-attention to the other branches, then FFN, with adaLN.

  Every branch's update reads the other branches' tokens from before this block, so the result
  does not depend on the order of the branches.
  """
  num_heads: int = 8
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  attention: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: Sequence[jax.Array], masks: Sequence[jax.Array],
               conds: Sequence[jax.Array]) -> list[jax.Array]:
    """tokens: per branch [B,S_i,D]; masks: per branch [B,S_i]; conds: per branch c_i [B,D]."""
    if len(tokens) < 2:
      raise ValueError(f"the collaborative refiner needs two or more branches, got {len(tokens)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    refined = []
    for i, (x, c) in enumerate(zip(tokens, conds)):
      others = jnp.concatenate([t for j, t in enumerate(tokens) if j != i], axis=1)
      others_mask = jnp.concatenate([m for j, m in enumerate(masks) if j != i], axis=1)
      width = x.shape[-1]
      (shift_a, scale_a, gate_a, shift_m, scale_m, gate_m) = layers.AdaLNModulation(
          6, width, name=f"branch_{i}_adaln", **kw)(c)
      h = layers.Attention(self.num_heads, self.qk_norm, self.attention,
                           name=f"branch_{i}_cross_attn", **kw)(
          layers.modulate(layers.layer_norm(x), shift_a, scale_a), kv_mask=others_mask,
          context=layers.layer_norm(others))
      x = x + gate_a[:, None, :] * h
      h = layers.MLP(int(width * self.mlp_ratio), name=f"branch_{i}_mlp", **kw)(
          layers.modulate(layers.layer_norm(x), shift_m, scale_m))
      refined.append(x + gate_m[:, None, :] * h)
    return refined


def drop_instruction_tokens(tokens: Sequence[jax.Array], masks: Sequence[jax.Array],
                            prefix_lens: Sequence[int]) -> tuple[jax.Array, jax.Array]:
  """Drops each branch's instruction prefix and concatenates branches along the sequence.

  tokens[i] [B,P_i+L_i,D], masks[i] [B,P_i+L_i] -> ([B,sum L_i,D], [B,sum L_i]).
  The prefix has a fixed length per LLM, so this is a static slice.
  """
  kept = [t[:, p:] for t, p in zip(tokens, prefix_lens)]
  kept_masks = [m[:, p:] for m, p in zip(masks, prefix_lens)]
  return jnp.concatenate(kept, axis=1), jnp.concatenate(kept_masks, axis=1)
