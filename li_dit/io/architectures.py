"""Published LLM architectures by checkpoint name, to plan runs without the weights on disk.

`tools/aot_compile.py` and `tools/param_count.py` size a run whose LLMs live on another machine
(a TPU VM, a bucket): the shapes come from the model's Hugging Face config.json, copied here for
the checkpoints the paper uses. A name that is a real path is always read from its files instead.
"""
from __future__ import annotations

import os

import transformers

from li_dit.io import hf
from li_dit.models import llm

# Hugging Face config.json fields (architecture only) of published checkpoints.
HF_CONFIGS: dict[str, dict] = {
    "Meta-Llama-3-8B-Instruct": dict(
        model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        rms_norm_eps=1e-5, rope_theta=500000.0, hidden_act="silu", tie_word_embeddings=False),
    "Qwen1.5-7B-Chat": dict(
        model_type="qwen2", vocab_size=151936, hidden_size=4096, intermediate_size=11008,
        num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
        rms_norm_eps=1e-6, rope_theta=1000000.0, hidden_act="silu", tie_word_embeddings=False),
}


def known_llm_config(path: str) -> llm.LLMConfig:
  """The LLMConfig of a published checkpoint named by `path`'s last component.

  Raises ValueError listing the known names when there is none.
  """
  name = os.path.basename(os.path.normpath(path))
  if name not in HF_CONFIGS:
    raise ValueError(f"LLM {path!r} is neither on disk nor a known architecture; known: "
                     f"{', '.join(sorted(HF_CONFIGS))}.")
  fields = dict(HF_CONFIGS[name])
  config = transformers.AutoConfig.for_model(fields.pop("model_type"), **fields)
  return hf.llm_config_from_hf(config, source=f"li_dit.io.architectures[{name!r}]")
