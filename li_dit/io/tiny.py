"""Tiny random frozen models in the real on-disk layouts, made offline on the spot.

  llm_folder   a Hugging Face causal-LM folder (config.json, model.safetensors, tokenizer.json,
               tokenizer_config.json with a chat template) of a published architecture's family
               (li_dit.io.architectures: LLaMA-3, Qwen2) at a tiny width, saved by transformers
  vae_folder   a diffusers AutoencoderKL folder (config.json, diffusion_pytorch_model.safetensors)
               of a published VAE's layout (16 channels, 8x) at tiny widths, random weights

They let a machine without the real weights run a config's whole code path (tools/rehearse.py):
the same loaders, templates, shardings and programs as on a pod, at a size a CPU runs. The
tokenizer is a byte-level BPE trained here on the prompt template and a few captions, with the
special tokens and chat template of the family.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import flax.linen as nn
import numpy as np
import safetensors.numpy
from flax import traverse_util

from li_dit.io import architectures
from li_dit.io import diffusers_vae
from li_dit.text import prompts

# Chat formats of the families (special tokens, template), as their published tokenizers have.
_CHAT = {
    "llama": dict(
        bos="<|begin_of_text|>", eos="<|eot_id|>",
        special=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                 "<|end_header_id|>", "<|eot_id|>"],
        template=("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + "
                  "message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + "
                  "'<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
                  "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}")),
    "qwen2": dict(
        bos=None, eos="<|im_end|>", special=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        template=("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + "
                  "message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
                  "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")),
}
TINY_LLM = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                vocab_size=512, max_position_embeddings=512)


def _tokenizer(folder: str, family: str, corpus: Sequence[str], vocab_size: int) -> None:
  """A byte-level BPE with the family's special tokens and chat template, saved in `folder`."""
  import tokenizers  # pylint: disable=g-import-not-at-top
  chat = _CHAT[family]
  tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
  tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=chat["special"], show_progress=False,
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(
      [prompts.SYSTEM_PROMPT, prompts.INSTRUCTION, *corpus], trainer)
  if chat["bos"]:  # LLaMA-3 starts plain text with its BOS, as its tokenizer does.
    tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
        single=f"{chat['bos']} $A", special_tokens=[(chat["bos"],
                                                     tokenizer.token_to_id(chat["bos"]))])
  tokenizer.save(os.path.join(folder, "tokenizer.json"))
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": chat["bos"],
               "eos_token": chat["eos"], "pad_token": chat["eos"], "model_max_length": 512,
               "chat_template": chat["template"]}, f, indent=2)


def llm_folder(folder: str, architecture: str, corpus: Sequence[str] = (), seed: int = 0,
               **overrides: int) -> str:
  """Writes a tiny random causal LM of the family of published `architecture` (a name of
  li_dit.io.architectures.HF_CONFIGS) with its tokenizer to `folder`; returns `folder`.

  `overrides` change TINY_LLM (hidden_size, num_hidden_layers, ...). The key/value heads keep
  the published ratio of query to key/value heads where the tiny head count allows it.
  """
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  published = dict(architectures.HF_CONFIGS[architecture])
  family = published.pop("model_type")
  if family not in _CHAT:
    raise ValueError(f"no tiny layout for {architecture!r} ({family}); known: {sorted(_CHAT)}")
  fields = {**TINY_LLM, **overrides}
  ratio = published["num_attention_heads"] // published["num_key_value_heads"]
  fields["num_key_value_heads"] = max(1, fields["num_attention_heads"] // ratio)
  config = transformers.AutoConfig.for_model(
      family, **fields, rms_norm_eps=published["rms_norm_eps"],
      rope_theta=published["rope_theta"], hidden_act=published["hidden_act"],
      tie_word_embeddings=published["tie_word_embeddings"])
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config)
  os.makedirs(folder, exist_ok=True)
  transformers.utils.logging.disable_progress_bar()
  model.save_pretrained(folder, safe_serialization=True)
  _tokenizer(folder, family, corpus, fields["vocab_size"])
  return folder


def vae_folder(folder: str, architecture: str = "FLUX.1-schnell", seed: int = 0,
               block_out_channels: Sequence[int] = (8, 8, 16, 16)) -> str:
  """Writes a random AutoencoderKL with the latent channels, factor and normalisation of the
  published VAE `architecture` (li_dit.io.architectures.VAE_CONFIGS) at tiny widths to `folder`
  as diffusers stores it; returns `folder`."""
  fields = dict(architectures.VAE_CONFIGS[architecture])
  levels = len(fields["block_out_channels"])
  if len(block_out_channels) != levels:
    raise ValueError(f"block_out_channels needs {levels} levels (the factor of {architecture})")
  fields.update(block_out_channels=list(block_out_channels), layers_per_block=1,
                norm_num_groups=min(block_out_channels), sample_size=64)
  config = diffusers_vae.vae_config_from_diffusers(fields, source=f"tiny {architecture}")
  rng = np.random.default_rng(seed)
  tensors = {}
  for path, spec in traverse_util.flatten_dict(
      nn.meta.unbox(diffusers_vae.expected_params(config))).items():
    shape = tuple(spec.shape)
    if path[-1] == "scale":  # GroupNorm scales near 1.
      value = 1.0 + 0.1 * rng.standard_normal(shape)
    elif path[-1] == "bias":
      value = 0.02 * rng.standard_normal(shape)
    else:  # Fan-in scaled, so activations stay of order one through the blocks.
      value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[:-1]))
    name = diffusers_vae.diffusers_name(path)
    tensors[name] = np.ascontiguousarray(
        value.astype(np.float32).reshape(shape).transpose(
            (3, 2, 0, 1) if len(shape) == 4 else tuple(reversed(range(len(shape))))))
  os.makedirs(folder, exist_ok=True)
  safetensors.numpy.save_file(
      tensors, os.path.join(folder, f"{diffusers_vae.WEIGHTS_STEM}.safetensors"))
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump({"_class_name": "AutoencoderKL", **fields}, f, indent=2)
  return folder
