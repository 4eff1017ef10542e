"""Frozen LLMs from Hugging Face directories: config.json, safetensors weights, tokenizer.

`load_hf_llm` reads one tensor at a time straight from the safetensors files (one file or many,
with their index) into device arrays of the configured dtype and sharding, so host memory never
holds more than the tensor being placed. Only the blocks feeding the requested feature layer are
read. The language model of a LLaVA-style checkpoint (weights under a `language_model.` prefix)
loads the same way.

The parameter tree mirrors Hugging Face's names (`li_dit.models.llm`), so this module's names
(`hf_name`) are also the lingua franca of the GGUF loader.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import transformers
from flax import traverse_util

from li_dit.models import llm

Params = dict[str, Any]

# Hugging Face model_type -> LLMConfig family.
FAMILIES = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "gemma": "gemma",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}
SUPPORTED = ("llama (LLaMA 2/3/3.1/3.2)", "mistral", "qwen2 (Qwen1.5/2/2.5)", "gemma", "gemma2",
             "gemma3", "llava (its language model)")
# Where the decoder's weights sit in a checkpoint: causal LM, bare model, LLaVA (old and new).
WEIGHT_PREFIXES = ("model.", "", "language_model.model.", "model.language_model.")

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_pytorch_tanh": "gelu_tanh",
                "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh"}
_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16,
                       "BF16": ml_dtypes.bfloat16}
_READ_CHUNK = 32 << 20  # Bytes converted at a time when the file dtype differs from the target.


# -- configuration ---------------------------------------------------------------------------------
def read_hf_config(directory: str) -> llm.LLMConfig:
  """The LLMConfig of a Hugging Face model directory (its config.json), without its weights."""
  path = os.path.join(directory, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{directory} is not a Hugging Face model directory: no config.json.")
  # AutoConfig brings legacy keys (rope_scaling, rope_theta, rope_local_base_freq) into the
  # current form; remote code is never run.
  config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
  return llm_config_from_hf(config, source=path)


def llm_config_from_hf(config: transformers.PretrainedConfig, source: str = "config"
                       ) -> llm.LLMConfig:
  """A transformers config (a causal LM, or a multimodal one with a text_config) -> LLMConfig."""
  if getattr(config, "text_config", None) is not None:  # LLaVA, Gemma-3 multimodal, ...
    config = config.text_config
  family = FAMILIES.get(config.model_type)
  if family is None:
    raise ValueError(f"{source}: model_type {config.model_type!r} is not supported; supported "
                     f"architectures: {', '.join(SUPPORTED)}.")
  if getattr(config, "use_bidirectional_attention", False):
    raise ValueError(f"{source}: bidirectional {config.model_type} models are not supported.")
  heads = config.num_attention_heads
  head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
  act_name = getattr(config, "hidden_activation", None) or config.hidden_act
  if act_name not in _ACTIVATIONS:
    raise ValueError(f"{source}: activation {act_name!r} is not supported; supported: "
                     f"{', '.join(sorted(_ACTIVATIONS))}.")
  gemma = family.startswith("gemma")
  rope_full, rope_local = _rope_parameters(config, source)
  theta, scaling = _rope(rope_full, source)
  local_theta = None
  if rope_local is not None:
    local_theta, local_scaling = _rope(rope_local, source)
    if local_scaling is not None:
      raise ValueError(f"{source}: RoPE scaling on sliding-window layers is not supported.")
  window = getattr(config, "sliding_window", None)
  hf_layer_types = getattr(config, "layer_types", None) or ()
  kinds = {"sliding_attention": llm.SLIDING, "full_attention": llm.FULL}
  if any(kind not in kinds for kind in hf_layer_types):
    raise ValueError(f"{source}: layer_types {hf_layer_types} are not supported; supported: "
                     f"{', '.join(kinds)}.")
  layer_types = tuple(kinds[kind] for kind in hf_layer_types)
  if family == "mistral" and window is not None:
    layer_types = (llm.SLIDING,) * config.num_hidden_layers  # Every Mistral layer slides.
  if llm.SLIDING not in layer_types:
    layer_types, window = (), None
  attention_bias = bool(getattr(config, "attention_bias", False))
  query_pre_attn_scalar = getattr(config, "query_pre_attn_scalar", None)
  return llm.LLMConfig(
      family=family,
      vocab_size=config.vocab_size,
      hidden_size=config.hidden_size,
      intermediate_size=config.intermediate_size,
      num_layers=config.num_hidden_layers,
      num_heads=heads,
      num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
      head_dim=head_dim,
      rms_norm_eps=float(config.rms_norm_eps),
      rope_theta=theta,
      rope_scaling=scaling,
      local_rope_theta=local_theta,
      activation=_ACTIVATIONS[act_name],
      qkv_bias=family == "qwen2" or attention_bias,
      o_bias=family != "qwen2" and attention_bias,
      mlp_bias=bool(getattr(config, "mlp_bias", False)),
      norm_plus_one=gemma,
      embed_scale=gemma,
      sandwich_norms=family in ("gemma2", "gemma3"),
      qk_norm=family == "gemma3",
      attn_softcap=getattr(config, "attn_logit_softcapping", None),
      query_scale=query_pre_attn_scalar ** -0.5 if query_pre_attn_scalar else None,
      sliding_window=window,
      layer_types=layer_types)


def _rope_parameters(config, source: str) -> tuple[Mapping[str, Any], Mapping[str, Any] | None]:
  """(full-attention RoPE parameters, sliding-layer ones or None) in transformers 5's form."""
  params = getattr(config, "rope_parameters", None)
  if params is None:
    raise ValueError(f"{source}: no RoPE parameters in the config.")
  if "full_attention" in params or "sliding_attention" in params:
    return params.get("full_attention") or params["sliding_attention"], params.get(
        "sliding_attention")
  return params, None


def _rope(params: Mapping[str, Any], source: str
          ) -> tuple[float, llm.RopeScaling | None]:
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise ValueError(f"{source}: partial rotary embeddings are not supported.")
  kind = params.get("rope_type", "default")
  theta = float(params["rope_theta"])
  if kind == "default":
    return theta, None
  if kind == "linear":
    return theta, llm.RopeScaling("linear", float(params["factor"]))
  if kind == "llama3":
    return theta, llm.RopeScaling(
        "llama3", float(params["factor"]), float(params["low_freq_factor"]),
        float(params["high_freq_factor"]), int(params["original_max_position_embeddings"]))
  raise ValueError(f"{source}: RoPE type {kind!r} is not supported; supported: default, linear, "
                   "llama3.")


# -- parameter names -------------------------------------------------------------------------------
def hf_name(path: tuple[str, ...]) -> str:
  """A DecoderLLM parameter path -> its Hugging Face name without the checkpoint prefix.

  ("layers_3", "self_attn", "q_proj", "weight") -> "layers.3.self_attn.q_proj.weight";
  norms' "scale" and the embedding's "embedding" are HF's "weight".
  """
  parts = list(path)
  if parts[0].startswith("layers_"):
    parts[0:1] = ["layers", parts[0].removeprefix("layers_")]
  if parts[-1] in ("scale", "embedding"):
    parts[-1] = "weight"
  return ".".join(parts)


def expected_params(config: llm.LLMConfig, layer: int, dtype: Any) -> Params:
  """Tree of jax.ShapeDtypeStruct of `DecoderLLM(config, layer)`'s parameters, nothing allocated.

  Leaves keep their logical axis names as nn.Partitioned boxes (for `param_shardings`).
  """
  module = llm.DecoderLLM(config, layer=layer, dtype=dtype, param_dtype=dtype)
  tokens = jnp.zeros((1, 1), jnp.int32)
  return jax.eval_shape(
      lambda: module.init(jax.random.key(0), tokens, jnp.ones((1, 1), bool)))["params"]


def check_params(expected: Params, params: Params) -> None:
  """Raises ValueError naming the first tensor missing from, extra in, or mis-shaped in `params`."""
  want = traverse_util.flatten_dict(nn.meta.unbox(expected), sep="/")
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


def assemble_params(expected: Params, read: Callable[[str, tuple[int, ...], Any], np.ndarray],
                    dtype: Any, shardings: Params | None = None) -> Params:
  """Builds the parameter tree one tensor at a time.

  Args:
    expected: `expected_params(...)`.
    read: (HF name, shape, numpy dtype) -> that tensor as a host array of that shape and dtype;
      it raises an error naming the tensor when it is missing or has another shape.
    dtype: parameter dtype.
    shardings: optional tree (like `expected`) of jax.sharding.Sharding; default: one device.
  Returns:
    plain nested dict of device arrays, exactly the structure of `expected`.
  """
  flat_shardings = traverse_util.flatten_dict(shardings) if shardings is not None else {}
  np_dtype = np.dtype(jnp.dtype(dtype))
  flat = {}
  for path, spec in traverse_util.flatten_dict(nn.meta.unbox(expected)).items():
    host = read(hf_name(path), spec.shape, np_dtype)  # Our shapes are HF's.
    # On a CPU device an aligned host array becomes the parameter without a copy (may_alias);
    # elsewhere the copy is asynchronous and keeps the host array alive until it is done, so
    # waiting for it keeps one tensor in flight, not all of them.
    flat[path] = jax.block_until_ready(
        jax.device_put(host, flat_shardings.get(path), may_alias=True))
    del host
  return traverse_util.unflatten_dict(flat)


# -- safetensors -----------------------------------------------------------------------------------
class SafetensorsCheckpoint:
  """The tensors of one or many safetensors files, read one at a time (never memory-mapped whole).

  `stem` names the files: `<stem>.safetensors`, or the shards listed by
  `<stem>.safetensors.index.json` ("model" for transformers, "diffusion_pytorch_model" for
  diffusers).

  Attributes:
    index: tensor name -> (file path, dtype, shape, byte offset, byte length).
  """

  def __init__(self, directory: str, stem: str = "model"):
    files = self._files(directory, stem)
    self.directory = directory
    self.index: dict[str, tuple[str, str, tuple[int, ...], int, int]] = {}
    for path in files:
      with open(path, "rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        try:
          header = json.loads(f.read(header_len))
        except ValueError as e:
          raise ValueError(f"{path} is not a safetensors file (bad header): {e}") from e
      data_start = 8 + header_len
      for name, info in header.items():
        if name == "__metadata__":
          continue
        begin, end = info["data_offsets"]
        self.index[name] = (path, info["dtype"], tuple(info["shape"]), data_start + begin,
                            end - begin)

  @staticmethod
  def _files(directory: str, stem: str) -> list[str]:
    index_path = os.path.join(directory, f"{stem}.safetensors.index.json")
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      missing = [f for f in files if not os.path.exists(os.path.join(directory, f))]
      if missing:
        raise FileNotFoundError(f"{index_path} lists {missing[0]}, which is not in {directory}.")
      return [os.path.join(directory, f) for f in files]
    single = os.path.join(directory, f"{stem}.safetensors")
    if os.path.exists(single):
      return [single]
    raise FileNotFoundError(f"No {stem}.safetensors or {stem}.safetensors.index.json in "
                            f"{directory}.")

  def prefix(self) -> str:
    """Where the decoder's weights sit: the first of WEIGHT_PREFIXES with an embedding."""
    for prefix in WEIGHT_PREFIXES:
      if prefix + "embed_tokens.weight" in self.index:
        return prefix
    raise ValueError(f"{self.directory}: no token embedding under any of the prefixes "
                     f"{[p + 'embed_tokens.weight' for p in WEIGHT_PREFIXES]}.")

  def read(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """Tensor `name` as a new host array of `dtype`, checked against `shape`."""
    if name not in self.index:
      raise ValueError(f"Tensor {name} (expected shape {shape}) is missing from the "
                       f"checkpoint in {self.directory}.")
    path, file_dtype, file_shape, offset, length = self.index[name]
    if file_shape != tuple(shape):
      raise ValueError(f"Tensor {name} in {path} has shape {file_shape}, expected {tuple(shape)}.")
    if file_dtype not in _SAFETENSORS_DTYPES:
      raise ValueError(f"Tensor {name} in {path} has dtype {file_dtype}; supported: "
                       f"{', '.join(_SAFETENSORS_DTYPES)}.")
    source = np.dtype(_SAFETENSORS_DTYPES[file_dtype])
    out = _aligned_empty(math.prod(file_shape), dtype)
    if length != out.size * source.itemsize:
      raise ValueError(f"Tensor {name} in {path}: {length} bytes for shape {file_shape} "
                       f"{file_dtype}.")
    with open(path, "rb") as f:
      f.seek(offset)
      if source == dtype:
        if f.readinto(memoryview(out).cast("B")) != length:
          raise ValueError(f"{path} is truncated (tensor {name}).")
      else:  # Convert in chunks: never a second full-size copy in the file's dtype.
        step = max(1, _READ_CHUNK // source.itemsize)
        for start in range(0, out.size, step):
          count = min(step, out.size - start)
          chunk = np.frombuffer(f.read(count * source.itemsize), source)
          if chunk.size != count:
            raise ValueError(f"{path} is truncated (tensor {name}).")
          out[start:start + count] = chunk
    return out.reshape(file_shape)


def _aligned_empty(size: int, dtype: np.dtype, alignment: int = 4096) -> np.ndarray:
  """An uninitialised 1-D array whose data is `alignment`-aligned, so XLA:CPU can adopt it."""
  itemsize = np.dtype(dtype).itemsize
  buffer = np.empty(size * itemsize + alignment, np.uint8)
  start = -buffer.ctypes.data % alignment
  return buffer[start:start + size * itemsize].view(dtype)


def load_hf_llm(directory: str, layer: int = -3, dtype: Any = jnp.float32,
                shardings: Params | None = None) -> tuple[llm.LLMConfig, Params]:
  """Config and the parameters feeding feature `layer` (as `dtype`) of a model directory.

  Args:
    directory: a Hugging Face model directory (config.json and safetensors files).
    layer: feature layer in HF `hidden_states` indexing.
    dtype: parameter dtype.
    shardings: optional tree of shardings for the parameters (see `assemble_params`).
  """
  config = read_hf_config(directory)
  checkpoint = SafetensorsCheckpoint(directory)
  prefix = checkpoint.prefix()
  expected = expected_params(config, layer, dtype)
  params = assemble_params(expected, lambda name, *a: checkpoint.read(prefix + name, *a), dtype,
                           shardings)
  check_params(expected, params)
  return config, params


def load_hf_tokenizer(directory: str) -> transformers.PreTrainedTokenizerBase:
  """The tokenizer of a model directory, never running remote code."""
  return transformers.AutoTokenizer.from_pretrained(directory, trust_remote_code=False)
