"""Analytic model FLOPs against XLA's own count of the compiled computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from li_dit.models import lidit
from li_dit.models import llm
from li_dit.training import flops

# Unrolled blocks: XLA's cost analysis counts a scanned (while-loop) body once, not per layer.
MODEL = lidit.ModelConfig(patch_size=2, channels=3, width=256, depth=2, num_heads=4,
                          pos_kernel_size=1, scan_layers=False)
LLM = llm.LLMConfig(vocab_size=512, hidden_size=192, intermediate_size=512, num_layers=4,
                    num_heads=6, num_kv_heads=2, head_dim=32, rms_norm_eps=1e-6)
PREFIX, ROW, BATCH, IMAGE = 12, 20, 2, 32


def _xla_flops(fn, *args) -> float:
  cost = jax.jit(fn).lower(*args).compile().cost_analysis()
  return float(cost["flops"])


def _model_inputs(num_llms):
  model = lidit.LIDiT(MODEL, num_llms=num_llms)
  text = [lidit.TextFeatures(jnp.zeros((PREFIX, LLM.hidden_size)),
                             jnp.zeros((BATCH, ROW, LLM.hidden_size)),
                             jnp.ones((BATCH, ROW), bool)) for _ in range(num_llms)]
  x, t = jnp.zeros((BATCH, IMAGE, IMAGE, 3)), jnp.zeros((BATCH,))
  params = model.init(jax.random.key(0), x, t, text)["params"]
  return model, params, x, t, text


@pytest.mark.parametrize("num_llms", [1, 2])
def test_model_forward_flops_match_xla(num_llms):
  model, params, x, t, text = _model_inputs(num_llms)
  xla = _xla_flops(lambda p, x, t, tx: model.apply({"params": p}, x, t, tx), params, x, t, text)
  shapes = [flops.TextShape(PREFIX, ROW, LLM, -1)] * num_llms
  ours = sum(flops.model_forward_flops(MODEL, IMAGE, shapes).values()) * BATCH
  print(f"{num_llms} LLM(s): analytic / XLA = {ours / xla:.4f}")
  # XLA also counts norms, activations and softmax, which the analytic count leaves out.
  assert 0.95 <= ours / xla <= 1.0


def test_backward_is_twice_the_forward():
  """The train step counts the trainable model 3x (forward + backward): check that on XLA."""
  model, params, x, t, text = _model_inputs(1)
  apply = lambda p, x, t, tx: model.apply({"params": p}, x, t, tx)
  forward = _xla_flops(apply, params, x, t, text)
  both = _xla_flops(jax.grad(lambda p, *a: jnp.sum(apply(p, *a))), params, x, t, text)
  assert 2.9 <= both / forward <= 3.1


def test_llm_forward_flops_match_xla():
  module = llm.DecoderLLM(LLM, layer=-2)
  tokens = jnp.zeros((BATCH, ROW), jnp.int32)
  mask = jnp.ones((BATCH, ROW), bool)
  params = module.init(jax.random.key(0), tokens, mask)["params"]
  kv = jnp.zeros((1, PREFIX, LLM.num_kv_heads, LLM.head_dim))
  prefix_kv = tuple((kv, kv) for _ in range(llm.blocks_for_layer(LLM.num_layers, -2)))
  xla = _xla_flops(lambda p, tok, m, pkv: module.apply({"params": p}, tok, m, prefix_kv=pkv),
                   params, tokens, mask, prefix_kv)
  ours = flops.llm_forward_flops(flops.TextShape(PREFIX, ROW, LLM, -2)) * BATCH
  print(f"LLM: analytic / XLA = {ours / xla:.4f}")
  assert 0.95 <= ours / xla <= 1.0


def test_train_step_flops_parts():
  shapes = [flops.TextShape(PREFIX, ROW, LLM, -3)]
  online = flops.train_step_flops(MODEL, IMAGE, shapes, batch_size=8, online=True)
  cached = flops.train_step_flops(MODEL, IMAGE, shapes, batch_size=8, online=False)
  forward = flops.model_forward_flops(MODEL, IMAGE, shapes)
  assert online["dit"] == cached["dit"] == 3 * 8 * forward["dit"]
  assert cached["llms"] == 0 < online["llms"] == 8 * flops.llm_forward_flops(shapes[0])
  assert online["total"] == online["dit"] + online["refiners"] + online["llms"]


def test_cpu_peak_is_measured():
  peak, source = flops.peak_flops()
  assert np.isfinite(peak) and peak > 1e9
  assert "measured" in source
