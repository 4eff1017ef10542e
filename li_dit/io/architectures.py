"""Published LLM and VAE architectures by checkpoint name, to plan runs without the weights.

`tools/aot_compile.py`, `tools/run_card.py` and `tools/param_count.py` size a run whose frozen
models live on another machine (a TPU VM, a bucket): the shapes come from the model's Hugging Face
or diffusers config.json, copied here for the checkpoints the configs name. A name that is a real
path is always read from its files instead.
"""
from __future__ import annotations

import os

import transformers

from li_dit.io import diffusers_vae
from li_dit.io import hf
from li_dit.models import llm
from li_dit.models import vae

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


# diffusers AutoencoderKL config.json fields of published 16-channel, 8x VAEs (the SD3 / FLUX
# layout), by the name of their pipeline folder (the VAE is its vae/ subfolder).
_SD3_LAYOUT = dict(block_out_channels=[128, 256, 512, 512], layers_per_block=2,
                   latent_channels=16, norm_num_groups=32, sample_size=1024,
                   down_block_types=["DownEncoderBlock2D"] * 4,
                   up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False,
                   use_post_quant_conv=False)
VAE_CONFIGS: dict[str, dict] = {
    # FLUX.1's VAE (the same weights in -schnell, Apache-2.0, and -dev).
    "FLUX.1-schnell": dict(_SD3_LAYOUT, scaling_factor=0.3611, shift_factor=0.1159),
    "FLUX.1-dev": dict(_SD3_LAYOUT, scaling_factor=0.3611, shift_factor=0.1159),
    "stable-diffusion-3-medium-diffusers": dict(_SD3_LAYOUT, scaling_factor=1.5305,
                                                shift_factor=0.0609),
}


def known_vae_config(path: str) -> vae.VAEConfig:
  """The VAEConfig of a published VAE named by `path`'s last component (a pipeline folder's name,
  or that name followed by /vae).

  Raises ValueError listing the known names when there is none.
  """
  parts = os.path.normpath(path).split(os.sep)
  name = parts[-2] if parts[-1] == "vae" and len(parts) > 1 else parts[-1]
  if name not in VAE_CONFIGS:
    raise ValueError(f"VAE {path!r} is neither on disk nor a known architecture; known: "
                     f"{', '.join(sorted(VAE_CONFIGS))}.")
  return diffusers_vae.vae_config_from_diffusers(
      VAE_CONFIGS[name], source=f"li_dit.io.architectures[{name!r}]")
