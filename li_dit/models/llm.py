"""Frozen decoder-only LLMs used as prompt encoders: LLaMA, Mistral, Qwen2, Gemma, Gemma-2, Gemma-3.

One config-driven module covers the families: they differ only in switches of `LLMConfig`
(biases, Gemma's (1 + w) norms and embedding scale, sandwich norms, q/k norms, logit soft-capping,
sliding-window layers with their own RoPE base, RoPE scaling). Parameters keep Hugging Face's
names, shapes and PyTorch's [out, in] layout (a q projection is [H*K, D]), so checkpoints load
tensor by tensor without transposing or reshaping anything on the host.

The prompt features are a hidden state in Hugging Face `hidden_states[layer]` indexing (LI-DiT uses
layer -3: the output of the third-to-last block, before the final norm). Only the blocks that feed
that layer exist in the module, so later blocks are never computed or loaded.

Because the LLM is causal, the features of a fixed instruction prefix do not depend on what
follows it. `DecoderLLM` can return the per-block keys/values of a sequence (`return_kv`) and take
them back as `prefix_kv`, so the prefix is encoded once and every prompt batch only runs its own
tokens.

Shapes: B batch, T tokens, P prefix tokens, D hidden size, H query heads, G key/value heads,
K head dim, F MLP hidden size, V vocabulary.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from li_dit.models import layers

# Per-block (keys, values), each [1,P,G,K] after RoPE, for a prefix encoded with batch size 1.
PrefixKV = tuple[tuple[jax.Array, jax.Array], ...]

FULL, SLIDING = "full", "sliding"
ACTIVATIONS = {"silu": nn.silu, "gelu_tanh": lambda x: nn.gelu(x, approximate=True)}


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling (HF `rope_parameters`): "linear" (positions / factor) or "llama3"."""
  type: str
  factor: float
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192

  def __post_init__(self):
    if self.type not in ("linear", "llama3"):
      raise ValueError(f"RoPE scaling type {self.type!r} is not supported; supported: "
                       "linear, llama3.")


@dataclasses.dataclass(frozen=True)
class LLMConfig:
  """Architecture of a decoder-only LLM.

  Attributes:
    family: the checkpoint's family ("llama", "mistral", "qwen2", "gemma", "gemma2", "gemma3"),
      for messages and records; the switches below decide the computation.
    rope_theta, rope_scaling: RoPE base and scaling of full-attention layers.
    local_rope_theta: RoPE base of sliding-window layers (Gemma-3), None: as full layers.
    activation: MLP gate activation, a key of ACTIVATIONS.
    qkv_bias, o_bias, mlp_bias: which projections have biases (Qwen2: q/k/v only).
    norm_plus_one: RMSNorm multiplies by (1 + w) (Gemma families).
    embed_scale: token embeddings are multiplied by sqrt(hidden_size) (Gemma families).
    sandwich_norms: norms after attention and after the MLP as well (Gemma-2/3).
    qk_norm: RMSNorm over head_dim on queries and keys before RoPE (Gemma-3).
    attn_softcap: attention logits -> c * tanh(logits / c) (Gemma-2).
    query_scale: attention logit scale; None: head_dim ** -0.5.
    sliding_window: window of sliding layers: query i sees keys j with i - window < j <= i.
    layer_types: FULL or SLIDING per layer; empty: all FULL.
  """
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  rms_norm_eps: float
  family: str = "llama"
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  local_rope_theta: float | None = None
  activation: str = "silu"
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  norm_plus_one: bool = False
  embed_scale: bool = False
  sandwich_norms: bool = False
  qk_norm: bool = False
  attn_softcap: float | None = None
  query_scale: float | None = None
  sliding_window: int | None = None
  layer_types: tuple[str, ...] = ()

  def __post_init__(self):
    if self.activation not in ACTIVATIONS:
      raise ValueError(f"Unknown LLM activation {self.activation!r}; known: {sorted(ACTIVATIONS)}.")
    if self.layer_types and len(self.layer_types) != self.num_layers:
      raise ValueError(f"layer_types has {len(self.layer_types)} entries for "
                       f"{self.num_layers} layers.")
    if any(t not in (FULL, SLIDING) for t in self.layer_types):
      raise ValueError(f"layer_types must be {FULL!r} or {SLIDING!r}, got {self.layer_types}.")
    if SLIDING in self.layer_types and not self.sliding_window:
      raise ValueError("Sliding-window layers need a positive sliding_window.")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                       f"num_kv_heads={self.num_kv_heads}.")

  def layer_type(self, i: int) -> str:
    return self.layer_types[i] if self.layer_types else FULL


def blocks_for_layer(num_layers: int, layer: int) -> int:
  """How many blocks to run for Hugging Face `hidden_states[layer]`.

  `hidden_states` has num_layers + 1 entries: [0] is the token embedding, [i] the output of block
  i - 1 and [num_layers] (= [-1]) the last block's output after the final norm.
  """
  if not -(num_layers + 1) <= layer <= num_layers:
    raise ValueError(f"LLM feature layer {layer} is out of range for a {num_layers}-block model: "
                     f"valid layers are {-(num_layers + 1)}..{num_layers}.")
  return layer if layer >= 0 else num_layers + 1 + layer


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None) -> np.ndarray:
  """Inverse frequencies [K/2] (float32, as Hugging Face computes them)."""
  exponents = np.arange(0, head_dim, 2, dtype=np.int64).astype(np.float32) / np.float32(head_dim)
  inv_freq = (1.0 / np.float32(theta) ** exponents).astype(np.float32)
  if scaling is None:
    return inv_freq
  if scaling.type == "linear":
    return (inv_freq / np.float32(scaling.factor)).astype(np.float32)
  # "llama3": long wavelengths divided by `factor`, short ones kept, a smooth blend in between.
  old_len = scaling.original_max_position_embeddings
  low_freq_wavelen = old_len / scaling.low_freq_factor
  high_freq_wavelen = old_len / scaling.high_freq_factor
  wavelen = 2 * math.pi / inv_freq
  scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
  return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_tables(positions: np.ndarray, inv_freq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """cos and sin [T,K/2] (float32) of positions [T] (static) times inv_freq [K/2].

  Computed on the host while tracing: in the graph they are constants, where a traced cos/sin
  would be fused into (and recomputed by) every elementwise loop that reads it.
  """
  angles = np.asarray(positions, np.float32)[:, None] * inv_freq[None, :]
  return np.cos(angles), np.sin(angles)


def rope(x: jax.Array, cos: np.ndarray, sin: np.ndarray) -> jax.Array:
  """Rotary position embedding of x [B,T,H,K] with tables cos, sin [T,K/2] (`rope_tables`).

  Rotate-half convention (HF): dimension i is paired with i + K/2, not with its neighbour. The
  rotation runs in x's dtype, as in Hugging Face.
  """
  cos = jnp.asarray(cos, x.dtype)[None, :, None, :]
  sin = jnp.asarray(sin, x.dtype)[None, :, None, :]
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_mask(mask: jax.Array, prefix_len: int, window: int | None = None) -> jax.Array:
  """[B,1,T,P+T] attention mask over [prefix keys | own keys].

  Query i (at position P + i) sees every prefix key and its own row's valid keys up to itself;
  with a `window`, only keys less than `window` positions back. A padded query still sees the
  valid keys before it, so its row is finite; with right padding it never influences a valid
  token.
  """
  b, t = mask.shape
  q_pos = prefix_len + jnp.arange(t)[:, None]  # [T,1]
  k_pos = jnp.arange(prefix_len + t)[None, :]  # [1,P+T]
  allowed = k_pos <= q_pos
  if window is not None:
    allowed &= k_pos > q_pos - window
  key_valid = jnp.concatenate([jnp.ones((b, prefix_len), bool), mask.astype(bool)], axis=1)
  return (allowed[None] & key_valid[:, None, :])[:, None]


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, scale: float,
              softcap: float | None = None) -> jax.Array:
  """Grouped-query softmax attention with optional logit soft-capping.

  The R = H/G query heads that share a key head are stacked as rows of one matrix, so both
  products are plain batched matmuls over (B, G) (twice as fast on XLA:CPU as a 5-D einsum).

  Args:
    q: [B,T,H,K]; k, v: [B,S,G,K] with G dividing H (query head h uses key head h // (H/G)).
    mask: boolean [B,1,T,S], True where allowed.
  Returns:
    [B,T,H,K] in q's dtype; logits and softmax in float32.
  """
  b, t, h, d = q.shape
  g = k.shape[2]
  r = h // g
  q = q.reshape(b, t, g, r, d).transpose(0, 2, 3, 1, 4).reshape(b, g, r * t, d)
  logits = jnp.einsum("bgqd,bsgd->bgqs", q, k, preferred_element_type=jnp.float32) * scale
  if softcap is not None:
    logits = softcap * jnp.tanh(logits / softcap)
  logits = logits.reshape(b, g, r, t, -1)
  logits = jnp.where(mask[:, :, None], logits, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, g, r * t, -1)
  out = jnp.einsum("bgqs,bsgd->bgqd", probs, v).reshape(b, g, r, t, d)
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Linear(nn.Module):
  """y = x W^T + b with W [out, in] exactly as PyTorch stores it (HF checkpoints load as they are).

  Multi-axis outputs (a q projection's [H, K]) and inputs (o_proj's [H, K]) are flattened and
  unflattened around one 2-D matmul, which is free (a bitcast): a [H, K, D] weight would make
  XLA:CPU transpose the weight on every call instead.

  Attributes:
    out_shape: output feature axes, e.g. (H, K) for a q projection.
    axes: logical names of W's two axes (out, in).
    num_in_axes: how many trailing axes of x are contracted (2 for o_proj's [H,K] input).
  """
  out_shape: tuple[int, ...]
  axes: tuple[str, str]
  use_bias: bool = False
  num_in_axes: int = 1
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [..., *in_shape] -> [..., *out_shape]."""
    batch_shape = x.shape[:x.ndim - self.num_in_axes]
    x = x.reshape(batch_shape + (math.prod(x.shape[len(batch_shape):]),))
    init = layers.with_axes(nn.initializers.normal(0.02), self.axes)
    w = self.param("weight", init, (math.prod(self.out_shape), x.shape[-1]), self.param_dtype)
    y = jax.lax.dot_general(jnp.asarray(x, self.dtype), jnp.asarray(w, self.dtype),
                            (((x.ndim - 1,), (1,)), ((), ())))
    if self.use_bias:
      bias = self.param("bias", layers.with_axes(nn.initializers.zeros_init(), self.axes[:1]),
                        (w.shape[0],), self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y.reshape(batch_shape + tuple(self.out_shape))


class Attention(nn.Module):
  """Grouped-query self-attention with RoPE, attending to optional prefix keys first."""
  config: LLMConfig
  layer_type: str = FULL
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: np.ndarray, mask: jax.Array,
               prefix_kv: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B,T,D], positions [T] (static), mask [B,1,T,P+T] -> ([B,T,D], own (k, v) each [B,T,G,K])."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    heads, kv_heads = ("heads", "embed"), ("kv_heads", "embed")  # [H*K, D], [G*K, D]
    q = Linear((cfg.num_heads, cfg.head_dim), heads, cfg.qkv_bias, name="q_proj", **kw)(x)
    k = Linear((cfg.num_kv_heads, cfg.head_dim), kv_heads, cfg.qkv_bias, name="k_proj", **kw)(x)
    v = Linear((cfg.num_kv_heads, cfg.head_dim), kv_heads, cfg.qkv_bias, name="v_proj", **kw)(x)
    if cfg.qk_norm:
      norm = dict(epsilon=cfg.rms_norm_eps, plus_one=cfg.norm_plus_one,
                  scale_axes=("head_dim",), **kw)
      q = layers.RMSNorm(name="q_norm", **norm)(q)
      k = layers.RMSNorm(name="k_norm", **norm)(k)
    if self.layer_type == SLIDING and cfg.local_rope_theta is not None:
      inv_freq = rope_frequencies(cfg.head_dim, cfg.local_rope_theta, None)
    else:
      inv_freq = rope_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    cos, sin = rope_tables(positions, inv_freq)
    q = layers.constrain(rope(q, cos, sin), ("batch", "length", "heads", "head_dim"))
    k = rope(k, cos, sin)
    keys, values = k, v
    if prefix_kv is not None:
      # The prefix was encoded once with batch 1; broadcasting is free until the concatenation.
      pk, pv = (jnp.broadcast_to(jnp.asarray(a, k.dtype), (x.shape[0],) + a.shape[1:])
                for a in prefix_kv)
      keys = jnp.concatenate([pk, k], axis=1)
      values = jnp.concatenate([pv, v], axis=1)
    scale = cfg.query_scale if cfg.query_scale is not None else cfg.head_dim ** -0.5
    out = attention(q, keys, values, mask, scale, cfg.attn_softcap)
    out = layers.constrain(out, ("batch", "length", "heads", "head_dim"))
    out = Linear((cfg.hidden_size,), ("embed", "heads"), cfg.o_bias, num_in_axes=2,
                 name="o_proj", **kw)(out)
    return out, (k, v)


class GatedMLP(nn.Module):
  """down(act(gate(x)) * up(x)), D -> F -> D (SwiGLU, or GeGLU for Gemma)."""
  config: LLMConfig
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """x [B,T,D] -> [B,T,D]."""
    cfg = self.config
    kw = dict(use_bias=cfg.mlp_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = Linear((cfg.intermediate_size,), ("mlp", "embed"), name="gate_proj", **kw)(x)
    up = Linear((cfg.intermediate_size,), ("mlp", "embed"), name="up_proj", **kw)(x)
    h = layers.constrain(ACTIVATIONS[cfg.activation](gate) * up, ("batch", "length", "mlp"))
    return Linear((cfg.hidden_size,), ("embed", "mlp"), name="down_proj", **kw)(h)


class Block(nn.Module):
  """Pre-norm block x + attn(norm(x)), x + mlp(norm(x)); sandwich norms wrap both outputs too.

  Norm names follow Hugging Face: without sandwich norms `post_attention_layernorm` is the norm
  before the MLP (LLaMA); with them it follows attention and `pre_feedforward_layernorm` is the
  norm before the MLP (Gemma-2/3).
  """
  config: LLMConfig
  layer_type: str = FULL
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, positions: np.ndarray, mask: jax.Array,
               prefix_kv: tuple[jax.Array, jax.Array] | None
               ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """x [B,T,D] -> ([B,T,D], own (k, v) each [B,T,G,K])."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    norm = lambda name: layers.RMSNorm(cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, name=name,
                                       **kw)
    h, kv = Attention(cfg, self.layer_type, name="self_attn", **kw)(
        norm("input_layernorm")(x), positions, mask, prefix_kv)
    if cfg.sandwich_norms:
      x = x + norm("post_attention_layernorm")(h)
      h = GatedMLP(cfg, name="mlp", **kw)(norm("pre_feedforward_layernorm")(x))
      x = x + norm("post_feedforward_layernorm")(h)
    else:
      x = x + h
      x = x + GatedMLP(cfg, name="mlp", **kw)(norm("post_attention_layernorm")(x))
    return layers.constrain(x, ("batch", "length", "embed")), kv


class DecoderLLM(nn.Module):
  """A decoder-only LLM truncated at the feature layer (HF `hidden_states[layer]`).

  Parameter names mirror Hugging Face's (`embed_tokens`, `layers_<i>/self_attn/q_proj/weight`,
  `norm`); see `li_dit.io.hf.param_path`.

  Attributes:
    config: the architecture.
    layer: feature layer; only the blocks feeding it are created, and the final norm only when it
      selects the last hidden state.
    dtype: compute dtype (norms, RoPE angles and softmax are float32 regardless).
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
    num_blocks = blocks_for_layer(cfg.num_layers, self.layer)
    prefix_len = 0
    if prefix_kv is not None:
      if len(prefix_kv) != num_blocks:
        raise ValueError(f"prefix_kv has {len(prefix_kv)} blocks, the model runs {num_blocks}.")
      prefix_len = prefix_kv[0][0].shape[1] if num_blocks else 0
    positions = prefix_len + np.arange(tokens.shape[1])  # Static: RoPE tables are constants.
    masks = {FULL: causal_mask(mask, prefix_len),
             SLIDING: causal_mask(mask, prefix_len, cfg.sliding_window)}

    x = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
                 embedding_init=layers.with_axes(nn.initializers.normal(0.02), ("vocab", "embed")),
                 name="embed_tokens")(tokens)
    if cfg.embed_scale:
      # Hugging Face rounds sqrt(D) to the activation dtype before multiplying.
      x = x * jnp.asarray(cfg.hidden_size ** 0.5, x.dtype)
    x = layers.constrain(x, ("batch", "length", "embed"))
    kvs = []
    for i in range(num_blocks):
      kind = cfg.layer_type(i)
      x, kv = Block(cfg, kind, dtype=self.dtype, param_dtype=self.param_dtype,
                    name=f"layers_{i}")(
          x, positions, masks[kind], None if prefix_kv is None else prefix_kv[i])
      kvs.append(kv)
    if num_blocks == cfg.num_layers:
      x = layers.RMSNorm(cfg.rms_norm_eps, plus_one=cfg.norm_plus_one, dtype=self.dtype,
                         param_dtype=self.param_dtype, name="norm")(x)
    return (x, tuple(kvs)) if return_kv else x
