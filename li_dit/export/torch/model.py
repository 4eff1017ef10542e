"""LI-DiT in PyTorch: the token refiners, the collaborative refiner, the DiT and the sampler.

A standalone module: it needs only torch, safetensors and the standard library (no jax, no flax,
nothing else of li_dit), so this one file can be copied next to a model exported by
`tools/export_torch.py` and used anywhere PyTorch runs:

  model = LIDiT.from_pretrained("OUT")     # OUT/config.json + OUT/model.safetensors
  velocity = model(x, t, [TextFeatures(prefix, tokens, mask), ...])

It computes what `li_dit.models.lidit.LIDiT` computes, operation for operation (float32 outputs
equal the JAX model's within 1e-4, tests/test_torch_export.py), with one difference of layout:
images and latents are NCHW [B,C,H,W] here (PyTorch's and diffusers' convention), NHWC in JAX.
Text features are as in JAX: per LLM, the instruction prefix [P,Dllm] shared by every prompt,
the prompt rows [B,L,Dllm] and their mask [B,L] (True on valid tokens).

The parameters are stored under the names of this module's `state_dict` with PyTorch layouts
(Linear weights [out, in], Conv2d weights [out, in, kh, kw]); `load_pretrained_weights` checks
every tensor's presence and shape, and names the ones that do not fit, before copying any.

Shapes: B batch, C channels, H x W image (or latent) size, p patch size, h x w = H/p x W/p
tokens, T = h*w, D width, P prefix tokens, L prompt-row tokens, S text tokens.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Callable, NamedTuple, Sequence

import safetensors
import torch
import torch.nn.functional as F
from torch import nn

FORMAT_VERSION = 1
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
SAMPLERS = ("euler", "heun")

_EPS = 1e-6  # Of every LayerNorm and RMSNorm, as in li_dit.models.layers.
# What jax.nn.dot_product_attention puts in place of masked logits (-0.7 x the float32 max,
# finite): a query whose keys are all masked attends to all of them uniformly, as in JAX.
_MASKED_LOGIT = -0.7 * torch.finfo(torch.float32).max


class ExportError(ValueError):
  """An exported model that cannot be loaded: unknown format, missing or mis-shaped tensors."""


@dataclasses.dataclass(frozen=True)
class Architecture:
  """The sizes of an exported model (config.json's "architecture").

  llm_widths: Dllm of each LLM branch, in branch order; two or more add the collaborative
  refiner. The other fields are `li_dit.models.lidit.ModelConfig`'s.
  """
  patch_size: int
  channels: int
  width: int
  depth: int
  num_heads: int
  mlp_ratio: float
  qk_norm: bool
  pos_kernel_size: int
  refiner_depth: int
  llm_widths: tuple[int, ...]

  @property
  def mlp_hidden(self) -> int:
    return int(self.width * self.mlp_ratio)


class TextFeatures(NamedTuple):
  """One LLM's features for a batch of prompts: prefix [P,Dllm] (shared by every prompt),
  tokens [B,L,Dllm] and mask [B,L] bool (True on valid tokens)."""
  prefix: torch.Tensor
  tokens: torch.Tensor
  mask: torch.Tensor

  def with_prefix(self) -> tuple[torch.Tensor, torch.Tensor]:
    """Features [B,P+L,Dllm] and mask [B,P+L] of the full sequences (the prefix is valid)."""
    batch, prefix_len = self.tokens.shape[0], self.prefix.shape[0]
    prefix = self.prefix.to(self.tokens.dtype).expand(batch, *self.prefix.shape)
    ones = torch.ones(batch, prefix_len, dtype=torch.bool, device=self.mask.device)
    return torch.cat([prefix, self.tokens], dim=1), torch.cat([ones, self.mask.bool()], dim=1)


# -- building blocks (li_dit/models/layers.py) ----------------------------------------------------
def layer_norm(x: torch.Tensor) -> torch.Tensor:
  """Parameter-free LayerNorm over the last axis, in float32 (adaLN gives shift and scale)."""
  return F.layer_norm(x.float(), x.shape[-1:], eps=_EPS).to(x.dtype)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
  """adaLN: x [B,T,D] * (1 + scale [B,D]) + shift [B,D]."""
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
  """Mean of x [B,T,D] over valid tokens (mask [B,T]) -> [B,D] float32."""
  m = mask.float()[..., None]
  return (x.float() * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0,
                       scale: float = 1000.0) -> torch.Tensor:
  """Sinusoidal embedding of t [B] in [0, 1] (scaled to [0, `scale`]) -> [B, dim] float32."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_period)
                    * torch.arange(half, dtype=torch.float32, device=t.device) / half)
  args = (t.float() * scale)[:, None] * freqs[None]
  emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
  return F.pad(emb, (0, dim % 2))


class RMSNorm(nn.Module):
  """Root-mean-square norm over the last axis with a learned scale, computed in float32."""

  def __init__(self, dim: int):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(dim))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x32 = x.float()
    y = x32 * torch.rsqrt(x32.square().mean(dim=-1, keepdim=True) + _EPS)
    return (y * self.weight.float()).to(self.weight.dtype)


class MLP(nn.Module):
  """Two-layer GELU (tanh) MLP: D -> hidden -> D."""

  def __init__(self, width: int, hidden: int):
    super().__init__()
    self.fc1 = nn.Linear(width, hidden)
    self.fc2 = nn.Linear(hidden, width)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
  """t [B] -> [B,D]: sinusoidal embedding (256 frequencies), then a SiLU MLP."""
  frequency_dim = 256

  def __init__(self, width: int):
    super().__init__()
    self.fc1 = nn.Linear(self.frequency_dim, width)
    self.fc2 = nn.Linear(width, width)

  def forward(self, t: torch.Tensor) -> torch.Tensor:
    emb = timestep_embedding(t, self.frequency_dim).to(self.fc1.weight.dtype)
    return self.fc2(F.silu(self.fc1(emb)))


class AdaLNModulation(nn.Module):
  """SiLU -> Linear from the condition c [B,D] to `count` vectors [B,D]."""

  def __init__(self, count: int, width: int):
    super().__init__()
    self.count = count
    self.proj = nn.Linear(width, count * width)

  def forward(self, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
    out = self.proj(F.silu(c))
    return out.view(c.shape[0], self.count, -1).unbind(dim=1)


def dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                          kv_mask: torch.Tensor | None) -> torch.Tensor:
  """softmax(q k^T / sqrt(K)) v over valid keys: q [B,T,H,K], k/v [B,S,H,K], kv_mask [B,S]
  bool or None -> [B,T,H,K]."""
  bias = None
  if kv_mask is not None:
    bias = torch.zeros(kv_mask.shape, dtype=q.dtype, device=q.device)
    bias = bias.masked_fill(~kv_mask.bool(), _MASKED_LOGIT)[:, None, None, :]
  out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=bias)
  return out.transpose(1, 2)


class Attention(nn.Module):
  """Multi-head self-attention (fused `qkv`) or cross-attention (`q`, `kv`), QK RMSNorm."""

  def __init__(self, width: int, num_heads: int, qk_norm: bool, cross: bool):
    super().__init__()
    if width % num_heads:
      raise ValueError(f"width {width} is not divisible by num_heads {num_heads}")
    self.num_heads, self.head_dim, self.qk_norm = num_heads, width // num_heads, qk_norm
    if cross:
      self.q = nn.Linear(width, width)
      self.kv = nn.Linear(width, 2 * width)
    else:
      self.qkv = nn.Linear(width, 3 * width)
    if qk_norm:
      self.q_norm = RMSNorm(self.head_dim)
      self.k_norm = RMSNorm(self.head_dim)
    self.out = nn.Linear(width, width)

  def forward(self, x: torch.Tensor, kv_mask: torch.Tensor | None = None,
              context: torch.Tensor | None = None) -> torch.Tensor:
    """x [B,T,D], context [B,S,D] (None: self-attention), kv_mask [B,S] -> [B,T,D]."""
    heads = (self.num_heads, self.head_dim)
    if context is None:
      q, k, v = self.qkv(x).view(*x.shape[:2], 3, *heads).unbind(dim=2)
    else:
      q = self.q(x).view(*x.shape[:2], *heads)
      k, v = self.kv(context).view(*context.shape[:2], 2, *heads).unbind(dim=2)
    if self.qk_norm:
      q, k = self.q_norm(q), self.k_norm(k)
    return self.out(dot_product_attention(q, k, v, kv_mask).flatten(2))


# -- the refiners (li_dit/models/refiner.py) ------------------------------------------------------
class GatedBlock(nn.Module):
  """x + gate_a * SelfAttn(LN(x)); x + gate_m * FFN(LN(x)), gates from c."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.gates = AdaLNModulation(2, arch.width)
    self.attn = Attention(arch.width, arch.num_heads, arch.qk_norm, cross=False)
    self.mlp = MLP(arch.width, arch.mlp_hidden)

  def forward(self, x: torch.Tensor, mask: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    gate_attn, gate_mlp = self.gates(c)
    x = x + gate_attn[:, None, :] * self.attn(layer_norm(x), kv_mask=mask)
    return x + gate_mlp[:, None, :] * self.mlp(layer_norm(x))


class TokenRefiner(nn.Module):
  """RMSNorm + input projection of one LLM's features, then gated bidirectional blocks."""

  def __init__(self, arch: Architecture, llm_width: int):
    super().__init__()
    self.input_norm = RMSNorm(llm_width)
    self.input_proj = nn.Linear(llm_width, arch.width)
    self.pool_proj = nn.Linear(llm_width, arch.width)
    self.blocks = nn.ModuleList(GatedBlock(arch) for _ in range(arch.refiner_depth))

  def forward(self, features: torch.Tensor, mask: torch.Tensor, t_emb: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """features [B,S,Dllm], mask [B,S], t_emb [B,D] -> tokens [B,S,D], condition c [B,D]."""
    features = self.input_norm(features)
    x = self.input_proj(features)
    c = t_emb + self.pool_proj(masked_mean(features, mask).to(features.dtype))
    for block in self.blocks:
      x = block(x, mask, c)
    return x, c


class CollaborativeBlock(nn.Module):
  """One branch of the collaborative refiner: adaLN cross-attention to the others, then FFN."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.adaln = AdaLNModulation(6, arch.width)
    self.cross_attn = Attention(arch.width, arch.num_heads, arch.qk_norm, cross=True)
    self.mlp = MLP(arch.width, arch.mlp_hidden)

  def forward(self, x: torch.Tensor, c: torch.Tensor, others: torch.Tensor,
              others_mask: torch.Tensor) -> torch.Tensor:
    shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaln(c)
    h = self.cross_attn(modulate(layer_norm(x), shift_a, scale_a), kv_mask=others_mask,
                        context=layer_norm(others))
    x = x + gate_a[:, None, :] * h
    return x + gate_m[:, None, :] * self.mlp(modulate(layer_norm(x), shift_m, scale_m))


class CollaborativeRefiner(nn.Module):
  """Every branch reads the other branches (as they were before this block)."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.branches = nn.ModuleList(CollaborativeBlock(arch) for _ in arch.llm_widths)

  def forward(self, tokens: Sequence[torch.Tensor], masks: Sequence[torch.Tensor],
              conds: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """tokens [B,S_i,D], masks [B,S_i], conds [B,D] per branch -> refined tokens per branch."""
    refined = []
    for i, (branch, x, c) in enumerate(zip(self.branches, tokens, conds)):
      others = torch.cat([t for j, t in enumerate(tokens) if j != i], dim=1)
      others_mask = torch.cat([m for j, m in enumerate(masks) if j != i], dim=1)
      refined.append(branch(x, c, others, others_mask))
    return refined


# -- the DiT (li_dit/models/dit.py) ---------------------------------------------------------------
class PositionResBlock(nn.Module):
  """x + Conv(SiLU(Conv(x))) on the token grid [B,h,w,D]: the positional embedding."""

  def __init__(self, width: int, kernel_size: int):
    super().__init__()
    # "same" pads as JAX's SAME does, also for even kernels (the extra row/column at the end).
    self.conv1 = nn.Conv2d(width, width, kernel_size, padding="same")
    self.conv2 = nn.Conv2d(width, width, kernel_size, padding="same")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    grid = x.permute(0, 3, 1, 2)
    grid = grid + self.conv2(F.silu(self.conv1(grid)))
    return grid.permute(0, 2, 3, 1)


class DiTBlock(nn.Module):
  """Self-attention, cross-attention to the text and MLP, each with adaLN shift/scale/gate."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.adaln = AdaLNModulation(9, arch.width)
    self.self_attn = Attention(arch.width, arch.num_heads, arch.qk_norm, cross=False)
    self.cross_attn = Attention(arch.width, arch.num_heads, arch.qk_norm, cross=True)
    self.mlp = MLP(arch.width, arch.mlp_hidden)

  def forward(self, x: torch.Tensor, c: torch.Tensor, text: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
    """x [B,T,D], c [B,D], text [B,S,D], text_mask [B,S] -> [B,T,D]."""
    (shift_sa, scale_sa, gate_sa, shift_ca, scale_ca, gate_ca, shift_mlp, scale_mlp,
     gate_mlp) = self.adaln(c)
    x = x + gate_sa[:, None, :] * self.self_attn(modulate(layer_norm(x), shift_sa, scale_sa))
    h = self.cross_attn(modulate(layer_norm(x), shift_ca, scale_ca), kv_mask=text_mask,
                        context=text)
    x = x + gate_ca[:, None, :] * h
    return x + gate_mlp[:, None, :] * self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp))


class DiT(nn.Module):
  """Patchify -> positional ResBlock -> blocks -> adaLN final layer -> unpatchify."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.patch_size = arch.patch_size
    patch_dim = arch.patch_size ** 2 * arch.channels
    self.patch_embed = nn.Linear(patch_dim, arch.width)
    self.pos_embed = PositionResBlock(arch.width, arch.pos_kernel_size)
    self.text_pool_mlp = MLP(arch.width, arch.width)
    self.blocks = nn.ModuleList(DiTBlock(arch) for _ in range(arch.depth))
    self.final_adaln = AdaLNModulation(2, arch.width)
    self.final_proj = nn.Linear(arch.width, patch_dim)

  def forward(self, x: torch.Tensor, t_emb: torch.Tensor, text: torch.Tensor,
              text_mask: torch.Tensor) -> torch.Tensor:
    """x [B,C,H,W], t_emb [B,D], text [B,S,D], text_mask [B,S] -> [B,C,H,W] float32."""
    b, c, height, width = x.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by the patch size {p}")
    h, w = height // p, width // p
    # Patches flattened in (row, column, channel) order, as li_dit.models.dit.patchify does.
    patches = x.reshape(b, c, h, p, w, p).permute(0, 2, 4, 3, 5, 1).reshape(b, h, w, p * p * c)
    tokens = self.pos_embed(self.patch_embed(patches.to(self.patch_embed.weight.dtype)))
    tokens = tokens.reshape(b, h * w, -1)
    cond = t_emb + self.text_pool_mlp(masked_mean(text, text_mask).to(t_emb.dtype))
    for block in self.blocks:
      tokens = block(tokens, cond, text, text_mask)
    shift, scale = self.final_adaln(cond)
    out = self.final_proj(modulate(layer_norm(tokens), shift, scale)).float()
    return out.reshape(b, h, w, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, height, width)


# -- the whole model ------------------------------------------------------------------------------
class LIDiT(nn.Module):
  """LLM features -> token refiners -> collaborative refiner (2+ LLMs) -> DiT -> velocity."""

  def __init__(self, arch: Architecture):
    super().__init__()
    self.arch = arch
    self.t_embedder = TimestepEmbedder(arch.width)
    self.token_refiners = nn.ModuleList(TokenRefiner(arch, d) for d in arch.llm_widths)
    if len(arch.llm_widths) > 1:
      self.collaborative_refiner = CollaborativeRefiner(arch)
    self.dit = DiT(arch)

  def forward(self, x: torch.Tensor, t: torch.Tensor, text: Sequence[TextFeatures]
              ) -> torch.Tensor:
    """x [B,C,H,W] noisy input, t [B] in [0, 1] (1 = noise), text: one TextFeatures per LLM
    -> predicted velocity [B,C,H,W] float32."""
    if len(text) != len(self.token_refiners):
      raise ValueError(f"this model reads {len(self.token_refiners)} LLM(s), got features of "
                       f"{len(text)}")
    t_emb = self.t_embedder(t)
    tokens, masks, conds = [], [], []
    for refiner, feats in zip(self.token_refiners, text):
      full, mask = feats.with_prefix()  # In the LLM's dtype: input_norm works in float32.
      refined, c = refiner(full, mask, t_emb)
      tokens.append(refined)
      masks.append(mask)
      conds.append(c)
    if len(tokens) > 1:
      tokens = self.collaborative_refiner(tokens, masks, conds)
    # Instruction tokens were kept through both refiners; the DiT reads the prompt part only.
    prefix_lens = [feats.prefix.shape[0] for feats in text]
    text_tokens = torch.cat([branch[:, p:] for branch, p in zip(tokens, prefix_lens)], dim=1)
    text_mask = torch.cat([m[:, p:] for m, p in zip(masks, prefix_lens)], dim=1)
    return self.dit(x, t_emb, text_tokens, text_mask)

  @classmethod
  def from_pretrained(cls, folder: str, dtype: torch.dtype | None = None,
                      device: str | torch.device = "cpu") -> "LIDiT":
    """The model of an exported folder, in `dtype` (default: the stored one), in eval mode."""
    config = read_config(folder)
    with torch.device("meta"):  # No memory for weights that the stored ones replace.
      model = cls(architecture(config))
    load_pretrained_weights(model, os.path.join(folder, WEIGHTS_NAME))
    return model.to(device=device, dtype=dtype).eval().requires_grad_(False)


def from_pretrained(folder: str, dtype: torch.dtype | None = None,
                    device: str | torch.device = "cpu") -> LIDiT:
  """`LIDiT.from_pretrained`."""
  return LIDiT.from_pretrained(folder, dtype, device)


def read_config(folder: str) -> dict:
  """config.json of an exported folder; ExportError if it is missing or of another format."""
  path = os.path.join(folder, CONFIG_NAME)
  if not os.path.isfile(path):
    raise ExportError(f"{folder} is not an exported LI-DiT: no {CONFIG_NAME}")
  with open(path, encoding="utf-8") as f:
    try:
      config = json.load(f)
    except ValueError as e:  # Not JSON, or not UTF-8.
      raise ExportError(f"{path} is damaged: {e}") from e
  version = config.get("format_version") if isinstance(config, dict) else None
  if version != FORMAT_VERSION:
    raise ExportError(f"{path}: format_version {version!r} is not supported; this torch_model "
                      f"reads format_version {FORMAT_VERSION} (export again with this li-dit, "
                      "or use the li-dit that wrote it)")
  return config


def architecture(config: dict) -> Architecture:
  """The Architecture of an exported config.json (its "architecture" and "llms")."""
  fields = dict(config["architecture"])
  fields["llm_widths"] = tuple(int(llm["hidden_size"]) for llm in config["llms"])
  return Architecture(**fields)


def load_pretrained_weights(model: nn.Module, path: str) -> None:
  """Puts the tensors of safetensors file `path` into `model` (as they are: the file's dtype).

  Raises:
    ExportError: naming every tensor the model needs that is missing, every one of another
      shape (with both shapes) and every one the model does not have, before anything is copied.
  """
  if not os.path.isfile(path):
    raise ExportError(f"no weights file {path}")
  expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
  with safetensors.safe_open(path, framework="pt") as f:
    stored = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}
    problems = [f"missing: {', '.join(sorted(set(expected) - set(stored)))}"
                if set(expected) - set(stored) else "",
                f"unexpected: {', '.join(sorted(set(stored) - set(expected)))}"
                if set(stored) - set(expected) else ""]
    problems += [f"{name} has shape {list(stored[name])}, the model needs "
                 f"{list(expected[name])}"
                 for name in sorted(set(expected) & set(stored)) if stored[name] != expected[name]]
    problems = [p for p in problems if p]
    if problems:
      raise ExportError(f"{path} does not fit the model of its config.json: "
                        + "; ".join(problems))
    tensors = {name: f.get_tensor(name) for name in expected}
  dtypes = {str(t.dtype) for t in tensors.values()}
  if len(dtypes) != 1:
    raise ExportError(f"{path} mixes dtypes {sorted(dtypes)}; an export has one")
  model.load_state_dict(tensors, strict=True, assign=True)


# -- sampling (li_dit/diffusion/samplers.py, li_dit/generation/generator.py) ----------------------
# denoise(x [2B,...], t [2B]) -> velocity [2B,...]; the first B rows are conditional.
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def resolution_shift(height: int, width: int, base_size: int, base_shift: float) -> float:
  """The timestep shift of images of height x width pixels: base_shift * sqrt(H W) / base."""
  return base_shift * math.sqrt(height * width / base_size ** 2)


def time_grid(steps: int, shift: float = 1.0) -> torch.Tensor:
  """steps + 1 times from 1 (noise) to 0 (data): uniform, then t' = s t / (1 + (s - 1) t)."""
  t = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32)
  return shift * t / (1 + (shift - 1) * t)


def guided_velocity(denoise: Denoiser, x: torch.Tensor, t: torch.Tensor, cfg_scale: float
                    ) -> torch.Tensor:
  """v_uncond + s (v_cond - v_uncond), both halves as one batch of 2B. x [B,...], t scalar."""
  batch = x.shape[0]
  v = denoise(torch.cat([x, x]), t.expand(2 * batch))
  v_cond, v_uncond = v[:batch], v[batch:]
  return v_uncond + cfg_scale * (v_cond - v_uncond)


@torch.no_grad()
def sample(denoise: Denoiser, noise: torch.Tensor, steps: int, cfg_scale: float,
           sampler: str = "heun", shift: float = 1.0) -> torch.Tensor:
  """Integrates dx/dt = v from t = 1 (x = noise [B,...]) to t = 0; returns x0 float32.

  Heun skips its correction on the last step (t_next = 0): 2 * steps - 1 denoiser calls.
  """
  if sampler not in SAMPLERS:
    raise ValueError(f"unknown sampler {sampler!r}; choose one of {SAMPLERS}")
  ts = time_grid(steps, shift).to(noise.device)
  x = noise.float()
  for i in range(steps):
    t, t_next = ts[i], ts[i + 1]
    v = guided_velocity(denoise, x, t, cfg_scale)
    x_euler = x + (t_next - t) * v
    if sampler == "euler" or i == steps - 1:
      x = x_euler
    else:
      v_next = guided_velocity(denoise, x_euler, t_next, cfg_scale)
      x = x + (t_next - t) * 0.5 * (v + v_next)
  return x


def generate(model: LIDiT, text: Sequence[TextFeatures], null: Sequence[TextFeatures],
             noise: torch.Tensor, steps: int, cfg_scale: float, sampler: str = "heun",
             shift: float = 1.0) -> torch.Tensor:
  """Samples the model's space (pixels or latents) from noise [B,C,H,W].

  text: the prompts' features per LLM ([B,...] rows); null: the empty prompt's ([1,...] rows),
  the unconditional half of classifier-free guidance.
  """
  batch = noise.shape[0]
  both = [TextFeatures(t.prefix, torch.cat([t.tokens, n.tokens.expand(batch, -1, -1)]),
                       torch.cat([t.mask.bool(), n.mask.bool().expand(batch, -1)]))
          for t, n in zip(text, null)]
  return sample(lambda x, t: model(x, t, both), noise, steps, cfg_scale, sampler, shift)


def to_uint8(x: torch.Tensor) -> torch.Tensor:
  """[-1, 1] float images [B,C,H,W] -> uint8 [B,H,W,C] (rounded half to even, as in JAX)."""
  return torch.round((x.float() + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
