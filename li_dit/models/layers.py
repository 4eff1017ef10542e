"""Building blocks shared by the LLMs, the refiners and the DiT.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and large activations
are constrained with `nn.with_logical_constraint`; `li_dit.parallel.sharding` maps the names to
mesh axes. The names used here:

  params:       embed, mlp, heads, kv_heads, head_dim, vocab, modulation, embed_in, conv_h, conv_w
  activations:  batch, length, text_length, embed, heads, head_dim, mlp

Shapes in docstrings: B batch, T tokens, S text tokens, D width, H heads, K head dim.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from li_dit.models import attention

Dtype = Any
Initializer = Callable[..., jax.Array]

default_kernel_init = nn.initializers.xavier_uniform()


def with_axes(init: Initializer, axes: Sequence[str | None]) -> Initializer:
  """Attaches logical axis names to a parameter initializer."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """Logical sharding constraint on an activation (a no-op outside a mesh context)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Dense(nn.Module):
  """A linear layer over the last axes whose kernel carries logical axis names.

  Attributes:
    features: output feature shape (an int or a tuple, e.g. (heads, head_dim)).
    kernel_axes: logical names of the kernel, input axes first then output axes.
    use_bias: add a bias (its axes are the output axes of the kernel).
  """
  features: int | tuple[int, ...]
  kernel_axes: tuple[str | None, ...]
  use_bias: bool = True
  kernel_init: Initializer = default_kernel_init
  bias_init: Initializer = nn.initializers.zeros_init()
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  in_axes: int = 1  # how many trailing input axes are contracted

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (self.features,) if isinstance(self.features, int) else tuple(self.features)
    in_shape = x.shape[-self.in_axes:]
    kernel = self.param(
        "kernel", with_axes(_fan_aware(self.kernel_init, in_shape, features), self.kernel_axes),
        in_shape + features, self.param_dtype)
    kernel = jnp.asarray(kernel, self.dtype)
    x = jnp.asarray(x, self.dtype)
    contract = tuple(range(x.ndim - self.in_axes, x.ndim))
    y = jax.lax.dot_general(x, kernel, ((contract, tuple(range(self.in_axes))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", with_axes(self.bias_init, self.kernel_axes[self.in_axes:]),
                        features, self.param_dtype)
      y = y + jnp.asarray(bias, self.dtype)
    return y


def _fan_aware(init: Initializer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]):
  """Initialises a multi-axis kernel as if it were the 2-D (fan_in, fan_out) matrix."""
  fan_in, fan_out = math.prod(in_shape), math.prod(out_shape)

  def wrapped(key, shape, dtype=jnp.float32):
    return init(key, (fan_in, fan_out), dtype).reshape(shape)
  return wrapped


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis, computed in float32, with a learned scale.

  `plus_one`: the output is multiplied by (1 + scale), scale initialised to zero (Gemma's
  convention), instead of by scale.
  """
  epsilon: float = 1e-6
  use_scale: bool = True
  scale_axes: tuple[str | None, ...] = ("embed",)
  plus_one: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = jnp.asarray(x, jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.epsilon)
    if self.use_scale:
      init = nn.initializers.zeros_init() if self.plus_one else nn.initializers.ones_init()
      scale = jnp.asarray(self.param("scale", with_axes(init, self.scale_axes), (x.shape[-1],),
                                     self.param_dtype), jnp.float32)
      y = y * (1 + scale if self.plus_one else scale)
    return jnp.asarray(y, self.dtype)


def layer_norm(x: jax.Array, epsilon: float = 1e-6) -> jax.Array:
  """Parameter-free LayerNorm in float32 (adaLN supplies the shift and scale)."""
  x32 = jnp.asarray(x, jnp.float32)
  mean = jnp.mean(x32, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
  return jnp.asarray((x32 - mean) * jax.lax.rsqrt(var + epsilon), x.dtype)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  """adaLN: x [B,T,D] * (1 + scale [B,D]) + shift [B,D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


class MLP(nn.Module):
  """Two-layer GELU (tanh) MLP: D -> hidden -> D."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    d = x.shape[-1]
    h = Dense(self.hidden, ("embed", "mlp"), dtype=self.dtype, param_dtype=self.param_dtype,
              name="fc1")(x)
    h = nn.gelu(h, approximate=True)
    if h.ndim == 3:  # Token activations [B,T,hidden]; a pooled [B,hidden] is small.
      h = constrain(h, ("batch", "length", "mlp"))
    return Dense(d, ("mlp", "embed"), dtype=self.dtype, param_dtype=self.param_dtype,
                 name="fc2")(h)


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0,
                       scale: float = 1000.0) -> jax.Array:
  """Sinusoidal embedding of t in [0, 1] (scaled to [0, `scale`]): [B] -> [B, dim] float32."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = (jnp.asarray(t, jnp.float32) * scale)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


class TimestepEmbedder(nn.Module):
  """t [B] -> [B, width] through a sinusoidal embedding and a SiLU MLP (as in DiT)."""
  width: int
  frequency_dim: int = 256
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, t: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype,
              kernel_init=nn.initializers.normal(0.02))
    h = Dense(self.width, ("embed_in", "embed"), name="fc1", **kw)(
        timestep_embedding(t, self.frequency_dim))
    return Dense(self.width, ("mlp", "embed"), name="fc2", **kw)(nn.silu(h))


def masked_mean(x: jax.Array, mask: jax.Array) -> jax.Array:
  """Mean of x [B,T,D] over valid tokens (mask [B,T] bool) -> [B,D], in float32."""
  m = jnp.asarray(mask, jnp.float32)[..., None]
  total = jnp.sum(jnp.asarray(x, jnp.float32) * m, axis=1)
  return total / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class Attention(nn.Module):
  """Multi-head attention in the [B,T,H,K] layout, self- or cross-, with optional QK RMSNorm.

  Self-attention projects q, k and v with one fused kernel (one large matmul instead of three).
  `context` None means self-attention over x. Key padding is masked with `kv_mask`.
  `implementation`: "xla" or "splash" (li_dit.models.attention).
  """
  num_heads: int
  qk_norm: bool = True
  implementation: str = "xla"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, kv_mask: jax.Array | None = None,
               context: jax.Array | None = None) -> jax.Array:
    """x [B,T,D], context [B,S,Dc] (or None), kv_mask [B,S] bool -> [B,T,D]."""
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {self.num_heads}")
    heads, head_dim = self.num_heads, width // self.num_heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if context is None:
      qkv = Dense((3, heads, head_dim), ("embed", None, "heads", "head_dim"), name="qkv", **kw)(x)
      q, k, v = qkv[..., 0, :, :], qkv[..., 1, :, :], qkv[..., 2, :, :]
    else:
      q = Dense((heads, head_dim), ("embed", "heads", "head_dim"), name="q", **kw)(x)
      kv = Dense((2, heads, head_dim), ("embed", None, "heads", "head_dim"), name="kv",
                 **kw)(context)
      k, v = kv[..., 0, :, :], kv[..., 1, :, :]
    if self.qk_norm:
      norm = dict(scale_axes=("head_dim",), **kw)
      q, k = RMSNorm(name="q_norm", **norm)(q), RMSNorm(name="k_norm", **norm)(k)
    q = constrain(q, ("batch", "length", "heads", "head_dim"))
    out = attention.dot_product_attention(q, k, v, kv_mask, self.implementation)
    return Dense(width, ("heads", "head_dim", "embed"), in_axes=2, name="out", **kw)(out)


class AdaLNModulation(nn.Module):
  """Zero-initialised SiLU -> Dense from the condition c [B,Dc] to `count` vectors [B,D] each.

  Zero initialisation makes every gate 0 (and shift/scale 0) at the start of training, so the
  sub-layers it modulates begin as the identity (adaLN-Zero).
  """
  count: int
  width: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, c: jax.Array) -> tuple[jax.Array, ...]:
    # The largest weight of a DiT block (count x D x D): its input side is sharded over fsdp.
    out = Dense((self.count, self.width), ("embed", None, "modulation"),
                kernel_init=nn.initializers.zeros_init(), dtype=self.dtype,
                param_dtype=self.param_dtype, name="proj")(nn.silu(c))
    return tuple(out[:, i] for i in range(self.count))
