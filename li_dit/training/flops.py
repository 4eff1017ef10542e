"""Analytic model FLOPs of a train step, device peaks and MFU.

Counted analytically, not taken from XLA's cost analysis: the cost analysis misses Pallas kernels
(splash attention on TPU) and counts rematerialised work. These are *model* FLOPs in the MaxText
sense: 2 per multiply-add of every matmul and attention product, the trainable part three times
(forward, and backward for activations and weights), the frozen LLMs once (forward only, no
gradient flows into them), rematerialisation not counted. Norms, activations and softmax are
left out (a few percent at the sizes that matter).
"""
from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp

from li_dit.models import lidit
from li_dit.models import llm as llm_lib
from li_dit.parallel import tpu

@dataclasses.dataclass(frozen=True)
class TextShape:
  """One LLM branch as the model sees it: the shared prefix, a prompt row and the LLM itself."""
  prefix_len: int
  row_len: int
  llm: llm_lib.LLMConfig
  layer: int


def _dense(tokens: int, d_in: int, d_out: int) -> int:
  return 2 * tokens * d_in * d_out


def _attention(queries: int, keys: int, width: int) -> int:
  """Scores (Q K^T) and the weighted sum (P V) over all heads."""
  return 4 * queries * keys * width


def model_forward_flops(model: lidit.ModelConfig, image_size: int,
                        texts: Sequence[TextShape]) -> dict[str, int]:
  """Forward FLOPs of the trainable model for one example: {"refiners", "dit"}."""
  d, p, c = model.width, model.patch_size, model.channels
  ffn = int(d * model.mlp_ratio)
  mlp = lambda n: _dense(n, d, ffn) + _dense(n, ffn, d)
  refiners = _dense(1, 256, d) + _dense(1, d, d)  # timestep embedder
  lengths = [t.prefix_len + t.row_len for t in texts]
  for text, s in zip(texts, lengths):
    refiners += _dense(s, text.llm.hidden_size, d) + _dense(1, text.llm.hidden_size, d)
    refiners += model.refiner_depth * (
        _dense(1, d, 2 * d) + _dense(s, d, 3 * d) + _attention(s, s, d) + _dense(s, d, d)
        + mlp(s))
  if len(texts) > 1:  # collaborative refiner: one block per branch
    for i, s in enumerate(lengths):
      others = sum(lengths) - s
      refiners += (_dense(1, d, 6 * d) + _dense(s, d, d) + _dense(others, d, 2 * d)
                   + _attention(s, others, d) + _dense(s, d, d) + mlp(s))

  tokens = (image_size // p) ** 2
  text_tokens = sum(t.row_len for t in texts)
  k = model.pos_kernel_size
  dit = _dense(tokens, p * p * c, d) + 2 * _dense(tokens, k * k * d, d)  # patchify, position
  dit += 2 * _dense(1, d, d)  # pooled-text MLP
  dit += model.depth * (
      _dense(1, d, 9 * d)  # adaLN
      + _dense(tokens, d, 3 * d) + _attention(tokens, tokens, d) + _dense(tokens, d, d)
      + 2 * _dense(tokens, d, d) + _dense(text_tokens, d, 2 * d)
      + _attention(tokens, text_tokens, d)
      + mlp(tokens))
  dit += _dense(1, d, 2 * d) + _dense(tokens, d, p * p * c)
  return {"refiners": refiners, "dit": dit}


def llm_forward_flops(text: TextShape) -> int:
  """Forward FLOPs of one prompt row through the blocks feeding `text.layer`, after the cached
  prefix (the prefix itself is encoded once per run, not per example)."""
  cfg = text.llm
  rows, keys = text.row_len, text.prefix_len + text.row_len
  q_width, kv_width = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  block = (_dense(rows, cfg.hidden_size, q_width) + 2 * _dense(rows, cfg.hidden_size, kv_width)
           + _attention(rows, keys, q_width) + _dense(rows, q_width, cfg.hidden_size)
           + 3 * _dense(rows, cfg.hidden_size, cfg.intermediate_size))
  return llm_lib.blocks_for_layer(cfg.num_layers, text.layer) * block


def train_step_flops(model: lidit.ModelConfig, image_size: int, texts: Sequence[TextShape],
                     batch_size: int, online: bool) -> dict[str, int]:
  """Model FLOPs of one train step over the global batch, by part, and their "total"."""
  forward = model_forward_flops(model, image_size, texts)
  out = {name: 3 * flops * batch_size for name, flops in forward.items()}
  out["llms"] = sum(llm_forward_flops(t) for t in texts) * batch_size if online else 0
  out["total"] = sum(out.values())
  return out


def measure_matmul_peak(size: int = 2048, repeats: int = 5) -> float:
  """FLOP/s of the best of `repeats` float32 [size, size] matmuls on the default backend."""
  x = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size ** 3 / best


def peak_flops(device: jax.Device | None = None) -> tuple[float, str]:
  """(peak FLOP/s of the devices the step runs on, where the figure comes from).

  TPUs: the bf16 peak per chip (li_dit.parallel.tpu) times the number of chips. Elsewhere (CPU):
  a float32 matmul measured now; forced host devices share the same cores, so this is the
  peak of all of them together.
  """
  device = device or jax.devices()[0]
  if device.platform == "tpu":
    return tpu.chip(device.device_kind).peak_flops * jax.device_count(), device.device_kind
  return measure_matmul_peak(), f"{device.platform}: float32 matmul measured at start-up"
