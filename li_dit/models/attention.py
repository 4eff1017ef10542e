"""Softmax attention with key-padding masks, by XLA or by the TPU splash-attention kernel.

Both take and return the [B,T,H,K] layout of `layers.Attention` and give the same outputs
(tests/test_attention.py checks values and gradients, the kernel in Pallas interpret mode on CPU).

"splash" runs `jax.experimental.pallas.ops.tpu.splash_attention`: a flash-attention kernel that
never materialises the [B,H,T,S] logits, which at 1024px (4096 image tokens) would be the
largest activation of the model. Key padding becomes segment ids (query ids 1, key ids 1 where
valid and 0 where padded), so the static mask is full and every block is computed. Under a mesh
the kernel runs inside `jax.shard_map`, each device on its own batch rows and heads (the
kernel is a custom call XLA cannot partition); without a mesh it runs on whole arrays. It is
compiled for TPU and interpreted elsewhere (slow, for checking only).
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask
from jax.sharding import PartitionSpec

from li_dit.parallel import sharding

IMPLEMENTATIONS = ("xla", "splash")

# The kernel's tile sizes: sequences are padded up to a multiple of the tile; 128 is the TPU
# lane width, 512 the tile that keeps long sequences efficient.
_MIN_BLOCK, _MAX_BLOCK = 128, 512


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array,
                          kv_mask: jax.Array | None = None,
                          implementation: str = "xla") -> jax.Array:
  """Softmax(q k^T / sqrt(K)) v over valid keys.

  Args:
    q: [B,T,H,K] queries. k, v: [B,S,H,K] keys and values.
    kv_mask: [B,S] bool, True for valid keys, or None (all valid). Padded queries are not
      masked: they attend to the valid keys and their outputs are ignored downstream.
    implementation: "xla" or "splash".
  Returns:
    [B,T,H,K] in q's dtype.
  """
  if implementation == "xla":
    mask = None if kv_mask is None else kv_mask[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")
  if implementation == "splash":
    if kv_mask is None:
      kv_mask = jnp.ones(k.shape[:2], bool)
    return _splash_attention(q, k, v, kv_mask)
  raise ValueError(f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}")


def _round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def _block(length: int) -> int:
  return min(_MAX_BLOCK, _round_up(length, _MIN_BLOCK))


def _splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_mask: jax.Array
                      ) -> jax.Array:
  """The splash kernel on [B,T,H,K] inputs; see the module docstring."""
  batch, q_len, heads, head_dim = q.shape
  kv_len = k.shape[1]
  block_q, block_kv = _block(q_len), _block(kv_len)
  q_pad, kv_pad = _round_up(q_len, block_q) - q_len, _round_up(kv_len, block_kv) - kv_len

  # The kernel wants [B,H,T,K] and unscaled logits; padded keys get segment id 0.
  def heads_major(x, pad):
    return jnp.pad(x, ((0, 0), (0, pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
  q_heads = heads_major(q * jnp.asarray(head_dim ** -0.5, q.dtype), q_pad)
  k_heads, v_heads = heads_major(k, kv_pad), heads_major(v, kv_pad)
  q_segments = jnp.ones((batch, q_len + q_pad), jnp.int32)
  kv_segments = jnp.pad(kv_mask, ((0, 0), (0, kv_pad))).astype(jnp.int32)

  mesh = jax.sharding.get_abstract_mesh()
  platform = (mesh.abstract_device.platform if not mesh.empty and mesh.abstract_device
              else jax.default_backend())
  kernel_fn = functools.partial(_run_kernel, block_q=block_q, block_kv=block_kv,
                                interpret=platform != "tpu")
  if mesh.empty:
    out = kernel_fn(q_heads, k_heads, v_heads, q_segments, kv_segments)
  else:
    batch_axes = sharding.dividing_axes(nn.logical_to_mesh_axes(("batch",))[0], batch, mesh)
    head_axes = sharding.dividing_axes(nn.logical_to_mesh_axes(("heads",))[0], heads, mesh)
    qkv_spec = PartitionSpec(batch_axes, head_axes, None, None)
    segment_spec = PartitionSpec(batch_axes, None)
    out = jax.shard_map(kernel_fn, mesh=mesh,
                        in_specs=(qkv_spec,) * 3 + (segment_spec,) * 2, out_specs=qkv_spec,
                        check_vma=False)(q_heads, k_heads, v_heads, q_segments, kv_segments)
  return out.transpose(0, 2, 1, 3)[:, :q_len]


def _run_kernel(q: jax.Array, k: jax.Array, v: jax.Array, q_segments: jax.Array,
                kv_segments: jax.Array, *, block_q: int, block_kv: int,
                interpret: bool) -> jax.Array:
  """q [b,h,T,K], k/v [b,h,S,K], segments [b,T], [b,S] (one device's share) -> [b,h,T,K]."""
  heads, q_len, kv_len = q.shape[1], q.shape[2], k.shape[2]
  sizes = splash.BlockSizes(
      block_q=block_q, block_kv=block_kv, block_kv_compute=block_kv,
      block_q_dkv=block_q, block_kv_dkv=block_kv, block_kv_dkv_compute=block_kv,
      block_q_dq=block_q, block_kv_dq=block_kv)
  mask = splash_mask.MultiHeadMask([splash_mask.FullMask((q_len, kv_len))] * heads)
  kernel = splash.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                                  interpret=interpret)
  per_example = lambda q1, k1, v1, sq, skv: kernel(q1, k1, v1,
                                                   segment_ids=splash.SegmentIds(sq, skv))
  return jax.vmap(per_example)(q, k, v, q_segments, kv_segments)
