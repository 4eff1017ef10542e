"""Every LLM family against transformers' PyTorch implementation, on tiny random checkpoints.

The fixtures are made here with transformers (random weights, saved as safetensors) and loaded by
`li_dit.io.hf`; every hidden state of a padded batch must match PyTorch in float32.
"""
import json
import os

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch
import transformers

from li_dit.io import hf
from li_dit.models import llm

TINY = dict(vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

FAMILIES = {
    # LLaMA 3.1/3.2 RoPE scaling; llama3 frequencies are only rescaled below the original
    # context length's wavelengths, so a short original length makes every band differ.
    "llama": lambda: transformers.LlamaConfig(
        **TINY, rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0,
                                     low_freq_factor=1.0, high_freq_factor=4.0,
                                     original_max_position_embeddings=32)),
    "mistral": lambda: transformers.MistralConfig(**TINY, sliding_window=5),
    "qwen2": lambda: transformers.Qwen2Config(**TINY, tie_word_embeddings=True),
    "gemma": lambda: transformers.GemmaConfig(**TINY, head_dim=24),
    "gemma2": lambda: transformers.Gemma2Config(
        **TINY, head_dim=24, sliding_window=5, attn_logit_softcapping=3.0,
        query_pre_attn_scalar=20),
    "gemma3": lambda: transformers.Gemma3TextConfig(
        **{**TINY, "num_hidden_layers": 6}, head_dim=24, sliding_window=5,
        query_pre_attn_scalar=20, sliding_window_pattern=3,
        rope_parameters=dict(full_attention=dict(rope_type="linear", factor=4.0,
                                                 rope_theta=1e6),
                             sliding_attention=dict(rope_type="default", rope_theta=1e4))),
}
# Rows of 12, 7 and 3 valid tokens, right-padded.
LENGTHS = (12, 7, 3)


def _randomise(model: torch.nn.Module, gemma: bool) -> None:
  """Random weights everywhere, norms too (HF inits them to a constant)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      if "norm" in name:
        p.copy_(0.2 * noise + (0.0 if gemma else 1.0))
      else:
        p.copy_(0.08 * noise)


def _make_checkpoint(family: str, directory: str) -> torch.nn.Module:
  config = FAMILIES[family]()
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  _randomise(model, family.startswith("gemma"))
  model.eval()
  # Small shards: every checkpoint here is split over several files with an index.
  model.save_pretrained(directory, max_shard_size="200KB")
  return model


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def checkpoint(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  return request.param, directory, _make_checkpoint(request.param, directory)


def _batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, TINY["vocab_size"], (len(LENGTHS), max(LENGTHS)), dtype=np.int32)
  mask = np.arange(max(LENGTHS))[None, :] < np.array(LENGTHS)[:, None]
  return tokens, mask


def _torch_hidden_states(model, tokens, mask):
  with torch.no_grad():
    out = model(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                output_hidden_states=True)
  return [h.numpy() for h in out.hidden_states]


def test_every_hidden_state_matches_transformers(checkpoint):
  family, directory, model = checkpoint
  assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) >= 2
  tokens, mask = _batch()
  want = _torch_hidden_states(model, tokens, mask)
  num_layers = model.config.num_hidden_layers
  assert len(want) == num_layers + 1
  for layer in range(num_layers + 1):
    config, params = hf.load_hf_llm(directory, layer=layer)
    assert config.family == family
    got = llm.DecoderLLM(config, layer=layer).apply({"params": params}, tokens, mask)
    diff = np.abs(np.asarray(got) - want[layer])[mask].max()
    assert diff <= 1e-4, (family, layer, diff)


def test_prefix_reuse_equals_full_encode_with_sliding_windows(checkpoint):
  """A prefix longer than the sliding window: the reused prefix keys must be windowed too."""
  family, directory, _ = checkpoint
  config, params = hf.load_hf_llm(directory, layer=-3)
  module = llm.DecoderLLM(config, layer=-3)
  tokens, mask = _batch()
  prefix = tokens[:1, :8]
  full = module.apply({"params": params}, np.concatenate(
      [np.repeat(prefix, len(LENGTHS), 0), tokens], 1), np.concatenate(
      [np.ones((len(LENGTHS), 8), bool), mask], 1))
  _, kv = module.apply({"params": params}, prefix, np.ones_like(prefix, bool), return_kv=True)
  rows = module.apply({"params": params}, tokens, mask, prefix_kv=kv)
  np.testing.assert_allclose(np.asarray(rows)[mask], np.asarray(full)[:, 8:][mask], atol=1e-5)


def test_llava_language_model_loads(tmp_path):
  """A LLaVA checkpoint (LLaMA language model beside a vision tower) gives the LLaMA features."""
  text = FAMILIES["llama"]()
  vision = transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=48,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         image_size=16, patch_size=8)
  config = transformers.LlavaConfig(vision_config=vision, text_config=text, image_token_id=3)
  torch.manual_seed(0)
  model = transformers.LlavaForConditionalGeneration(config)
  _randomise(model, gemma=False)
  model.eval()
  model.save_pretrained(str(tmp_path))
  tokens, mask = _batch()
  tokens = np.where(tokens == 3, 4, tokens)  # No image tokens in a text-only prompt.
  with torch.no_grad():
    want = model.model.language_model(
        torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
        output_hidden_states=True).hidden_states[-3].numpy()
  loaded, params = hf.load_hf_llm(str(tmp_path), layer=-3)
  got = llm.DecoderLLM(loaded, layer=-3).apply({"params": params}, tokens, mask)
  assert np.abs(np.asarray(got) - want)[mask].max() <= 1e-4


def test_bfloat16_load_and_sharded_placement(tmp_path):
  """bf16 on disk -> float32 parameters, placed with the given shardings."""
  model = _make_checkpoint("qwen2", str(tmp_path))
  config, params = hf.load_hf_llm(str(tmp_path), layer=2, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("tensor",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(lambda _: replicated,
                           flax.linen.meta.unbox(hf.expected_params(config, 2, jnp.float32)))
  _, placed = hf.load_hf_llm(str(tmp_path), layer=2, shardings=shardings)
  for x in jax.tree.leaves(placed):
    assert x.sharding.mesh == mesh
  del model


def test_missing_and_mismatched_tensors_are_named(tmp_path):
  _make_checkpoint("llama", str(tmp_path))
  files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
  name = "model.layers.1.self_attn.k_proj.weight"
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  shard = tmp_path / index["weight_map"][name]
  tensors = safetensors.numpy.load_file(str(shard))
  tensors[name] = tensors[name][:, :-1]
  safetensors.numpy.save_file(tensors, str(shard), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*"
                                       r"\(32, 63\).*\(32, 64\)"):
    hf.load_hf_llm(str(tmp_path), layer=-1)
  del tensors[name]
  safetensors.numpy.save_file(tensors, str(shard), metadata={"format": "pt"})
  with pytest.raises(ValueError, match=r"k_proj\.weight.*missing"):
    hf.load_hf_llm(str(tmp_path), layer=-1)
  # Only the blocks feeding the layer are read: block 1 is not needed for layer 1.
  hf.load_hf_llm(str(tmp_path), layer=1)
  assert files


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
  transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2).save_pretrained(str(tmp_path))
  with pytest.raises(ValueError, match=r"'gpt2' is not supported.*llama.*qwen2.*gemma3"):
    hf.read_hf_config(str(tmp_path))
