"""The LI-DiT diffusion transformer backbone (paper Sec. 3.4).

patchify -> ResBlock positional embedding on the token grid -> blocks of
[self-attention -> cross-attention to text -> MLP], each sub-layer modulated by adaLN
shift/scale/gate from c = t_emb + MLP(pooled text) -> adaLN final layer -> unpatchify.

There is no absolute (sin-cos) or rotary position embedding: the convolutions' zero padding
tells tokens where the borders are, so the same weights run at any resolution.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from li_dit.models import layers


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
  """[B,H,W,C] -> [B,H/p,W/p,p*p*C]."""
  b, h, w, c = x.shape
  p = patch_size
  if h % p or w % p:
    raise ValueError(f"image size {h}x{w} is not divisible by the patch size {p}")
  x = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h // p, w // p, p * p * c)


def unpatchify(x: jax.Array, patch_size: int, channels: int) -> jax.Array:
  """[B,h,w,p*p*C] -> [B,h*p,w*p,C] (inverse of `patchify`)."""
  b, h, w, _ = x.shape
  p = patch_size
  x = x.reshape(b, h, w, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, h * p, w * p, channels)


class PositionResBlock(nn.Module):
  """x + Conv(SiLU(Conv(x))) on the [B,h,w,D] token grid: the positional embedding."""
  kernel_size: int = 3
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    width = x.shape[-1]
    k = self.kernel_size
    # Sharded like an MLP: the hidden channels between the two convolutions over `tensor`.
    conv = lambda name, axes: nn.Conv(
        width, (k, k), padding="SAME", dtype=self.dtype, param_dtype=self.param_dtype,
        kernel_init=layers.with_axes(nn.initializers.lecun_normal(), ("conv_h", "conv_w") + axes),
        bias_init=layers.with_axes(nn.initializers.zeros_init(), axes[1:]), name=name)
    hidden = conv("conv1", ("embed", "mlp"))(x)
    return x + conv("conv2", ("mlp", "embed"))(nn.silu(hidden))


class DiTBlock(nn.Module):
  """Self-attention, cross-attention to text and MLP, each with adaLN shift/scale/gate."""
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  attention: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, c: jax.Array, text: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """x [B,T,D], c [B,D], text [B,S,D], text_mask [B,S] -> [B,T,D]."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    width = x.shape[-1]
    (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp,
     gate_mlp) = layers.AdaLNModulation(9, width, name="adaln", **kw)(c)
    attn = dict(qk_norm=self.qk_norm, implementation=self.attention, **kw)
    h = layers.Attention(self.num_heads, name="self_attn", **attn)(
        layers.modulate(layers.layer_norm(x), shift_sa, scale_sa))
    x = x + gate_sa[:, None, :] * h
    h = layers.Attention(self.num_heads, name="cross_attn", **attn)(
        layers.modulate(layers.layer_norm(x), shift_ca, scale_ca), kv_mask=text_mask,
        context=text)
    x = x + gate_ca[:, None, :] * h
    h = layers.MLP(int(width * self.mlp_ratio), name="mlp", **kw)(
        layers.modulate(layers.layer_norm(x), shift_mlp, scale_mlp))
    x = x + gate_mlp[:, None, :] * h
    return layers.constrain(x, ("batch", "length", "embed"))


class _ScannedBlock(DiTBlock):
  """DiTBlock with the (carry, per-layer input) signature of `nn.scan`."""

  def __call__(self, x, c, text, text_mask):  # pytype: disable=signature-mismatch
    return super().__call__(x, c, text, text_mask), None


# What each block keeps for the backward pass. full: only its inputs (recompute the rest);
# save_dots: the weight matmuls' outputs; offload: those too, but in host memory (pinned_host),
# copied back for the backward pass, which frees HBM at the cost of host transfers.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "offload": jax.checkpoint_policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
}


class DiT(nn.Module):
  """The LI-DiT backbone: noisy image + timestep embedding + refined text -> prediction.

  Attributes:
    patch_size, channels: p and the image/latent channels C.
    width, depth, num_heads, mlp_ratio: transformer size (LI-DiT-1B: 1152, 28, 16, 4).
    scan_layers: stack the blocks' parameters on a leading `layers` axis and run them with
      `nn.scan` (one compiled block instead of `depth`, essential for compile time at scale).
    remat: rematerialisation policy of each block (a key of REMAT_POLICIES).
    attention: "xla" or "splash" (li_dit.models.attention).
  """
  patch_size: int
  channels: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float = 4.0
  qk_norm: bool = True
  pos_kernel_size: int = 3
  scan_layers: bool = True
  remat: str = "none"
  attention: str = "xla"
  dtype: layers.Dtype = jnp.float32
  param_dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, t_emb: jax.Array, text: jax.Array,
               text_mask: jax.Array) -> jax.Array:
    """x [B,H,W,C], t_emb [B,D], text [B,S,D], text_mask [B,S] -> [B,H,W,C] (float32)."""
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    tokens = layers.Dense(self.width, ("embed_in", "embed"), name="patch_embed", **kw)(
        patchify(x, p))
    tokens = PositionResBlock(self.pos_kernel_size, name="pos_embed", **kw)(tokens)
    b, h, w, d = tokens.shape
    tokens = layers.constrain(tokens.reshape(b, h * w, d), ("batch", "length", "embed"))

    pooled = layers.masked_mean(text, text_mask)
    c = t_emb + layers.MLP(self.width, name="text_pool_mlp", **kw)(pooled.astype(self.dtype))

    block_kw = dict(num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, qk_norm=self.qk_norm,
                    attention=self.attention, **kw)
    policy = REMAT_POLICIES[self.remat]
    if self.scan_layers:
      block = _ScannedBlock
      if self.remat != "none":
        block = nn.remat(block, policy=policy, prevent_cse=False)
      tokens, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast, nn.broadcast), length=self.depth,
          metadata_params={nn.PARTITION_NAME: "layers"})(name="blocks", **block_kw)(
              tokens, c, text, text_mask)
    else:
      block = DiTBlock if self.remat == "none" else nn.remat(DiTBlock, policy=policy)
      for i in range(self.depth):
        tokens = block(name=f"block_{i}", **block_kw)(tokens, c, text, text_mask)

    shift, scale = layers.AdaLNModulation(2, self.width, name="final_adaln", **kw)(c)
    tokens = layers.modulate(layers.layer_norm(tokens), shift, scale)
    out = layers.Dense(p * p * self.channels, ("embed", "embed_in"),
                       kernel_init=nn.initializers.zeros_init(), name="final_proj", **kw)(tokens)
    out = out.reshape(b, h, w, p * p * self.channels).astype(jnp.float32)
    return unpatchify(out, p, self.channels)
