"""Frozen decoder-only LLMs used as prompt encoders (LLaMA architecture first).

The prompt features are a hidden state of the LLM in Hugging Face `hidden_states[layer]` indexing
(LI-DiT uses layer -3: the output of the third-to-last block, before the final norm). Only the
blocks that feed that layer exist in the module, so later blocks are never computed or loaded.

Because the LLM is causal, the features of a fixed instruction prefix do not depend on what
follows it. `DecoderLLM` can return the per-block keys/values of a sequence (`return_kv`) and take
them back as `prefix_kv`, so the prefix is encoded once and every prompt batch only runs its own
tokens.

Shapes: B batch, T tokens, P prefix tokens, D hidden size, H query heads, G key/value heads,
K head dim, F MLP hidden size.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from li_dit.models import layers

# Per-block (keys, values), each [1,P,G,K] after RoPE, for a prefix encoded with batch size 1.
PrefixKV = tuple[tuple[jax.Array, jax.Array], ...]


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Architecture of a decoder-only LLM; `family` selects the variant (only "llama" so far)."""
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rope_theta: float
  rms_norm_eps: float
  family: str = "llama"


def blocks_for_layer(num_layers: int, layer: int) -> int:
  """How many blocks to run for Hugging Face `hidden_states[layer]`.

  `hidden_states` has num_layers + 1 entries: [0] is the token embedding, [i] the output of block
  i - 1 and [num_layers] (= [-1]) the last block's output after the final norm.
  """
  if not -(num_layers + 1) <= layer <= num_layers:
    raise ValueError(f"LLM feature layer {layer} is out of range for a {num_layers}-block model: "
                     f"valid layers are {-(num_layers + 1)}..{num_layers}.")
  return layer if layer >= 0 else num_layers + 1 + layer


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding of x [B,T,H,K] at positions [T], computed in float32.

  Rotate-half convention (HF LLaMA): dimension i is paired with i + K/2, not with its neighbour.
  """
  k = x.shape[-1]
  inv_freq = 1.0 / theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
  angles = jnp.asarray(positions, jnp.float32)[:, None] * inv_freq[None, :]  # [T,K/2]
  cos = jnp.cos(angles)[None, :, None, :]
  sin = jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(jnp.asarray(x, jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return jnp.asarray(rotated, x.dtype)


def causal_mask(mask: jax.Array, prefix_len: int) -> jax.Array:
  """[B,1,T,P+T] attention mask: every prefix key, plus own keys that are earlier and not padding.

  A padded query still sees the valid keys before it (or the prefix), so its row is finite;
  with right padding it never influences a valid token.
  """
  b, t = mask.shape
  causal = jnp.arange(t)[:, None] >= jnp.arange(t)[None, :]  # [T,T]
  own = causal[None] & mask[:, None, :]
  prefix = jnp.ones((b, t, prefix_len), dtype=bool)
  return jnp.concatenate([prefix, own], axis=-1)[:, None]


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, attending to optional prefix keys first."""
  config: LLMConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               prefix_kv: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B,T,D], positions [T], mask [B,1,T,P+T] -> ([B,T,D], own (k, v) each [B,T,G,K])."""
    cfg = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.Dense((cfg.num_heads, cfg.head_dim), ("embed", "heads", "head_dim"), name="q",
                     **kw)(x)
    k = layers.Dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                     name="k", **kw)(x)
    v = layers.Dense((cfg.num_kv_heads, cfg.head_dim), ("embed", "kv_heads", "head_dim"),
                     name="v", **kw)(x)
    q = layers.constrain(rope(q, positions, cfg.rope_theta),
                         ("batch", "length", "heads", "head_dim"))
    k = rope(k, positions, cfg.rope_theta)
    keys, values = k, v
    if prefix_kv is not None:
      # The prefix was encoded once with batch 1; broadcasting is free until the concatenation.
      pk, pv = (jnp.broadcast_to(jnp.asarray(a, k.dtype), (x.shape[0],) + a.shape[1:])
                for a in prefix_kv)
      keys = jnp.concatenate([pk, k], axis=1)
      values = jnp.concatenate([pv, v], axis=1)
    out = layers.dot_product_attention(q, keys, values, mask)
    out = layers.constrain(out, ("batch", "length", "heads", "head_dim"))
    out = layers.Dense(cfg.hidden_size, ("heads", "head_dim", "embed"), in_axes=2, name="o",
                       **kw)(out)
    return out, (k, v)


class GatedMLP(nn.Module):
  """SwiGLU MLP: down(silu(gate(x)) * up(x)), D -> F -> D."""
  config: LLMConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> [B,T,D]."""
    cfg = self.config
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="gate", **kw)(x)
    up = layers.Dense(cfg.intermediate_size, ("embed", "mlp"), name="up", **kw)(x)
    h = layers.constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return layers.Dense(cfg.hidden_size, ("mlp", "embed"), name="down", **kw)(h)


class Block(nn.Module):
  """Pre-norm transformer block: x + attn(norm(x)), then + mlp(norm(x))."""
  config: LLMConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: jax.Array, mask: jax.Array,
               prefix_kv: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B,T,D] -> ([B,T,D], own (k, v) each [B,T,G,K])."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = dict(epsilon=self.config.rms_norm_eps, **kw)
    h, kv = Attention(self.config, name="attn", **kw)(
        layers.RMSNorm(name="attn_norm", **norm)(x), positions, mask, prefix_kv)
    x = x + h
    x = x + GatedMLP(self.config, name="mlp", **kw)(layers.RMSNorm(name="mlp_norm", **norm)(x))
    return layers.constrain(x, ("batch", "length", "embed")), kv


class DecoderLLM(nn.Module):
  """A decoder-only LLM truncated at the feature layer (HF `hidden_states[layer]`).

  Attributes:
    config: the architecture.
    layer: feature layer; only the blocks feeding it are created, and the final norm only when it
      selects the last hidden state.
    dtype: compute dtype (norms, RoPE and softmax are float32 regardless).
    param_dtype: parameter dtype.
  """
  config: LLMConfig
  layer: int = -3
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array, prefix_kv: PrefixKV | None = None,
               return_kv: bool = False
               ) -> jax.Array | tuple[jax.Array, PrefixKV]:
    """Encodes right-padded token rows, optionally after a cached prefix.

    Args:
      tokens: [B,T] int32 token ids. With `prefix_kv` they sit at positions P..P+T-1.
      mask: [B,T] bool, True on valid tokens (padding on the right).
      prefix_kv: per-block (k, v) [1,P,G,K] of a prefix (as returned with `return_kv`), seen by
        every token of every row.
      return_kv: also return the per-block (k, v) [B,T,G,K] of these tokens, after RoPE.
    Returns:
      features [B,T,D] in `dtype` (padded rows are finite but meaningless), and with
      `return_kv` the per-block (k, v) tuple.
    """
    cfg = self.config
    if cfg.family != "llama":
      raise ValueError(f"DecoderLLM supports the 'llama' family, not {cfg.family!r}.")
    num_blocks = blocks_for_layer(cfg.num_layers, self.layer)
    prefix_len = 0
    if prefix_kv is not None:
      if len(prefix_kv) != num_blocks:
        raise ValueError(f"prefix_kv has {len(prefix_kv)} blocks, the model runs {num_blocks}.")
      prefix_len = prefix_kv[0][0].shape[1] if num_blocks else 0
    positions = prefix_len + jnp.arange(tokens.shape[1])
    attn_mask = causal_mask(mask, prefix_len)

    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=layers.with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                 name="embed")(tokens)
    x = layers.constrain(x, ("batch", "length", "embed"))
    kvs = []
    for i in range(num_blocks):
      x, kv = Block(cfg, dtype=self.dtype, param_dtype=self.param_dtype, name=f"block_{i}")(
          x, positions, attn_mask, None if prefix_kv is None else prefix_kv[i])
      kvs.append(kv)
    if num_blocks == cfg.num_layers:
      x = layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                         name="final_norm")(x)
    return (x, tuple(kvs)) if return_kv else x
