"""Frozen LLMs from GGUF files (llama.cpp's format): config, parameters and tokenizer.

Tensors are dequantized one at a time with the `gguf` package and go straight into `DecoderLLM`'s
parameter tree, so host memory holds at most one float32 tensor beyond the loaded parameters.
Only the blocks that feed the requested feature layer are read.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
import tempfile
from typing import Any

import gguf
import jax.numpy as jnp
import numpy as np
import transformers

from li_dit.io import hf
from li_dit.models import llm

Params = dict[str, Any]

_REQUIRED = object()
_HEADER_PREFETCH = 1 << 20
# GGUF metadata value types (gguf.GGUFValueType) -> struct formats; 8 is a string, 9 an array.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9

SUPPORTED_ARCHITECTURES = ("llama", "gemma3")

# Gemma-3 settings GGUF files do not carry; llama.cpp and transformers both assume these.
_GEMMA3_LOCAL_ROPE_THETA = 10000.0
_GEMMA3_SLIDING_PATTERN = 6  # Every 6th layer attends globally, the others in a window.


class GGUFFile:
  """The metadata and tensor table of a GGUF file; tensor data is memory-mapped on demand.

  `gguf.GGUFReader` builds an object per element of every metadata array, which takes ~17 s on
  Gemma-3's 262k-token vocabulary. Loading needs only scalar metadata and the tensor table, so
  arrays of strings are skipped and kept as their length (the tokenizer is built separately).

  Attributes:
    fields: metadata key -> value (scalars, strings, numpy arrays; string arrays as their length).
    tensors: tensor name -> (ggml type, numpy-order shape, absolute byte offset).
  """

  def __init__(self, path: str):
    self.path = path
    with open(path, "rb") as f:
      blob = f.read(_HEADER_PREFETCH)
      self._file = f
      self._buffer, self._buffer_start = blob, 0
      if blob[:4] != b"GGUF":
        raise ValueError(f"{path} is not a GGUF file (no GGUF magic bytes).")
      version, num_tensors, num_fields = struct.unpack_from("<IQQ", blob, 4)
      if version not in (2, 3):
        raise ValueError(f"{path} is GGUF version {version}; versions 2 and 3 are supported.")
      self._pos = 24
      self.fields: dict[str, Any] = {}
      for _ in range(num_fields):
        key = self._string()
        self.fields[key] = self._value(self._unpack("<I")[0])
      table = []
      for _ in range(num_tensors):
        name = self._string()
        (num_dims,) = self._unpack("<I")
        dims = self._unpack(f"<{num_dims}Q")
        ggml_type, offset = self._unpack("<IQ")
        table.append((name, ggml_type, tuple(reversed(dims)), offset))
      alignment = self.fields.get("general.alignment", 32)
      data_start = -(-self._pos // alignment) * alignment
    self.tensors = {name: (gguf.GGMLQuantizationType(kind), shape, data_start + offset)
                    for name, kind, shape, offset in table}

  def get(self, key: str, default: Any = _REQUIRED) -> Any:
    if key in self.fields:
      return self.fields[key]
    if default is _REQUIRED:
      raise ValueError(f"GGUF metadata key {key!r} is missing from {self.path}.")
    return default

  def dequantize(self, name: str) -> np.ndarray:
    """Tensor `name` as float32 in PyTorch's layout ([out, in] for matrices)."""
    kind, shape, offset = self.tensors[name]
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    num_bytes = int(np.prod(shape)) * type_size // block_size
    raw = np.memmap(self.path, np.uint8, mode="r", offset=offset, shape=(num_bytes,))
    byte_shape = gguf.quants.quant_shape_to_byte_shape(shape, kind)
    return np.asarray(gguf.quants.dequantize(raw.reshape(byte_shape), kind),
                      np.float32).reshape(shape)

  # -- parsing -----------------------------------------------------------------------------------
  def _read(self, n: int) -> bytes:
    end = self._pos + n
    if end > self._buffer_start + len(self._buffer):  # Refill: keep the unread tail.
      self._file.seek(self._pos)
      self._buffer = self._file.read(max(n, _HEADER_PREFETCH))
      self._buffer_start = self._pos
      if len(self._buffer) < n:
        raise ValueError(f"{self.path} is truncated (in its header).")
    start = self._pos - self._buffer_start
    self._pos = end
    return self._buffer[start:start + n]

  def _unpack(self, fmt: str) -> tuple:
    return struct.unpack(fmt, self._read(struct.calcsize(fmt)))

  def _string(self) -> str:
    (length,) = self._unpack("<Q")
    return self._read(length).decode("utf-8", errors="replace")

  def _value(self, kind: int) -> Any:
    if kind == _GGUF_STRING:
      return self._string()
    if kind == _GGUF_ARRAY:
      item_kind, count = self._unpack("<IQ")
      if item_kind == _GGUF_STRING:
        for _ in range(count):  # Skipped: only their number is kept.
          (length,) = self._unpack("<Q")
          self._read(length)
        return count
      if item_kind == _GGUF_ARRAY:
        raise ValueError(f"{self.path}: nested metadata arrays are not supported.")
      fmt = _GGUF_SCALARS[item_kind]
      return np.frombuffer(self._read(struct.calcsize(fmt) * count), np.dtype(fmt))
    (value,) = self._unpack(_GGUF_SCALARS[kind])
    return value


def read_gguf_config(path: str) -> llm.LLMConfig:
  """The LLMConfig of a GGUF file, without loading its tensors."""
  return gguf_config(GGUFFile(path))


def gguf_config(reader: GGUFFile) -> llm.LLMConfig:
  """Reads the architecture metadata (`<arch>.*` keys) of a GGUF file into an LLMConfig."""
  arch = reader.get("general.architecture")
  if arch not in SUPPORTED_ARCHITECTURES:
    raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: "
                     f"{', '.join(SUPPORTED_ARCHITECTURES)}.")
  hidden = reader.get(f"{arch}.embedding_length")
  heads = reader.get(f"{arch}.attention.head_count")
  head_dim = reader.get(f"{arch}.attention.key_length", hidden // heads)
  if reader.get(f"{arch}.rope.dimension_count", head_dim) != head_dim:
    raise ValueError("GGUF model uses partial rotary embeddings, which DecoderLLM does not.")
  if reader.get(f"{arch}.rope.scaling.type", "none") != "none":
    raise ValueError("GGUF model uses RoPE scaling, which DecoderLLM does not implement.")
  vocab = reader.get(f"{arch}.vocab_size", None)
  if vocab is None:  # Older converters only store the token list.
    vocab = reader.get("tokenizer.ggml.tokens")  # A string array: its length.
  common = dict(
      vocab_size=vocab,
      hidden_size=hidden,
      intermediate_size=reader.get(f"{arch}.feed_forward_length"),
      num_layers=reader.get(f"{arch}.block_count"),
      num_heads=heads,
      num_kv_heads=reader.get(f"{arch}.attention.head_count_kv", heads),
      head_dim=head_dim,
      rope_theta=float(reader.get(f"{arch}.rope.freq_base", 10000.0)),
      rms_norm_eps=float(reader.get(f"{arch}.attention.layer_norm_rms_epsilon")),
      family=arch)
  if arch == "llama":
    return llm.LLMConfig(**common)
  return llm.LLMConfig(  # gemma3
      **common, activation="gelu_tanh", norm_plus_one=True, embed_scale=True,
      sandwich_norms=True, qk_norm=True, local_rope_theta=_GEMMA3_LOCAL_ROPE_THETA,
      sliding_window=reader.get(f"{arch}.attention.sliding_window"),
      layer_types=tuple(llm.FULL if (i + 1) % _GEMMA3_SLIDING_PATTERN == 0 else llm.SLIDING
                        for i in range(common["num_layers"])))


# Hugging Face name (inside `layers.<i>.`) -> GGUF name (inside `blk.<i>.`), without ".weight".
_BLOCK_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_TOP_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm"}


def gguf_name(name: str, config: llm.LLMConfig) -> str:
  """Hugging Face parameter name -> GGUF tensor name, e.g.
  "layers.3.self_attn.q_proj.weight" -> "blk.3.attn_q.weight"."""
  stem, kind = name.rsplit(".", 1)
  if stem in _TOP_NAMES:
    return f"{_TOP_NAMES[stem]}.{kind}"
  _, index, rest = stem.split(".", 2)
  if rest == "post_attention_layernorm":
    # LLaMA's norm before the MLP has this HF name; Gemma-2/3 use it after attention.
    rest_gguf = "post_attention_norm" if config.sandwich_norms else "ffn_norm"
  else:
    rest_gguf = _BLOCK_NAMES[rest]
  return f"blk.{index}.{rest_gguf}.{kind}"


def load_gguf_llm(path: str, layer: int = -3, dtype: Any = jnp.float32,
                  shardings: Params | None = None) -> tuple[llm.LLMConfig, Params]:
  """Loads the config and the parameters feeding feature `layer` (as `dtype`) of a GGUF file.

  Args:
    shardings: optional tree of shardings for the parameters (see `hf.assemble_params`).
  Returns:
    (config, params); params is a plain nested dict of arrays with exactly the structure of
    `DecoderLLM(config, layer).init(...)["params"]`.
  """
  reader = GGUFFile(path)
  config = gguf_config(reader)

  def read(name: str, shape: tuple[int, ...], np_dtype: np.dtype) -> np.ndarray:
    tensor_name = gguf_name(name, config)
    if tensor_name not in reader.tensors:
      raise ValueError(f"GGUF tensor {tensor_name!r} (for {name}, shape {shape}) is missing "
                       f"from {path}.")
    raw = reader.dequantize(tensor_name)
    if tuple(raw.shape) != tuple(shape):
      raise ValueError(f"GGUF tensor {tensor_name} in {path} has shape {tuple(raw.shape)}, "
                       f"expected {tuple(shape)} (for {name}).")
    if config.family == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
      heads = config.num_heads if "q_proj" in name else config.num_kv_heads
      raw = _unpermute_rope_rows(raw, heads)
    if config.norm_plus_one and name.endswith("norm.weight"):
      raw = raw - 1  # llama.cpp stores Gemma's norm weights as 1 + w.
    return np.asarray(raw, np_dtype)

  expected = hf.expected_params(config, layer, dtype)
  params = hf.assemble_params(expected, read, dtype, shardings)
  hf.check_params(expected, params)
  return config, params


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
