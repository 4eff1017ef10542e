"""Frozen LLM prompt encoders: tokenizer + prompt layout + truncated LLM, run online.

The fixed prefix (system prompt + instruction) is encoded once by `compute_prefix`; `encode` then
runs only the prompt rows, attending to the cached prefix keys/values. For a causal LLM this is
exact: the prefix features followed by `encode(...)` equal `encode_full(...)` (up to float
rounding; `li_dit.models.lidit.TextFeatures.with_prefix` joins them). `build_encoders` gives the
encoders of a run's config.text, in branch order.

Shapes: B prompts, P prefix tokens, L row tokens, D LLM width, G key/value heads, K head dim.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import transformers

from li_dit.io import gguf as gguf_io
from li_dit.io import architectures, hf, packaged
from li_dit.models import llm
from li_dit.parallel import sharding
from li_dit.text import prompts as prompts_lib

Params = Any

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class PrefixState(NamedTuple):
  """The encoded prefix: features [P,D] and per-block (k, v) [1,P,G,K] (a pytree)."""
  features: jax.Array
  kv: llm.PrefixKV


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
  """What `PromptEncoder` loads.

  Attributes:
    name: short name of this encoder (e.g. "smollm2").
    path: a registry name (`li_dit.io.packaged.PACKAGED_LLMS`), a GGUF file or a Hugging Face
      model directory.
    max_tokens: prompt tokens kept per row (longer prompts are truncated and counted).
    layer: feature layer in Hugging Face `hidden_states` indexing.
    template: prompt template, "paper" or "none" (`li_dit.text.prompts.TEMPLATES`).
    dtype: parameter and compute dtype, "float32" or "bfloat16".
    hidden_size: the LLM's width if known without its files (to plan models); checked on load.
  """
  name: str
  path: str
  max_tokens: int
  layer: int = -3
  template: str = "paper"
  dtype: str = "float32"
  hidden_size: int | None = None


def load_llm(path: str, layer: int, dtype: Any, shardings: Params | None = None
             ) -> tuple[llm.LLMConfig, Params, transformers.PreTrainedTokenizerBase]:
  """(config, params, tokenizer) of the LLM at resolved `path`: a GGUF file or an HF directory."""
  if path.endswith(".gguf"):
    config, params = gguf_io.load_gguf_llm(path, layer=layer, dtype=dtype, shardings=shardings)
    return config, params, gguf_io.load_gguf_tokenizer(path)
  if os.path.isdir(path):
    config, params = hf.load_hf_llm(path, layer=layer, dtype=dtype, shardings=shardings)
    return config, params, hf.load_hf_tokenizer(path)
  raise ValueError(f"Cannot load LLM {path!r}: expected a .gguf file or a Hugging Face model "
                   "directory (config.json + safetensors).")


def read_llm_config(path: str) -> llm.LLMConfig:
  """The architecture of the LLM at resolved `path`, without loading its weights."""
  if path.endswith(".gguf"):
    return gguf_io.read_gguf_config(path)
  if os.path.isdir(path):
    return hf.read_hf_config(path)
  raise ValueError(f"Cannot read LLM {path!r}: expected a .gguf file or a Hugging Face model "
                   "directory.")


def llm_width(config: Mapping[str, Any]) -> int:
  """D of a configured LLM (an EncoderSpec mapping): `hidden_size` if set, else from its files."""
  if config.get("hidden_size") is not None:
    return int(config["hidden_size"])
  return read_llm_config(packaged.resolve_llm_path(config["path"])).hidden_size


class PromptEncoder:
  """One frozen LLM with its tokenizer and prompt layout.

  `encode`, `compute_prefix` and `encode_full` are pure functions of `params` (passed in, never
  closed over) so they can run inside other jitted functions, e.g. the train step.
  """

  def __init__(self, config: Mapping[str, Any] | None = None, *,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None, **kwargs: Any):
    """Builds from a config mapping (e.g. an ml_collections.ConfigDict) and/or keyword fields.

    With a `mesh` (and logical-axis `rules`), each weight goes from the file straight to its
    shards (li_dit.parallel.sharding.divisible_shardings of its axis names): no device ever
    holds a whole 8B LLM. Without one, the weights go to the default device.
    """
    self.spec = EncoderSpec(**{**dict(config.items() if config else ()), **kwargs})
    if self.spec.dtype not in _DTYPES:
      raise ValueError(f"Unknown LLM dtype {self.spec.dtype!r}; valid: {', '.join(_DTYPES)}.")
    self.name = self.spec.name
    self.path = packaged.resolve_llm_path(self.spec.path)
    dtype = _DTYPES[self.spec.dtype]
    self.config = read_llm_config(self.path)
    if self.spec.hidden_size not in (None, self.config.hidden_size):
      raise ValueError(f"LLM {self.name!r} is configured with hidden_size={self.spec.hidden_size}"
                       f" but {self.path} has hidden_size={self.config.hidden_size}.")
    self.module = llm.DecoderLLM(self.config, layer=self.spec.layer, dtype=dtype,
                                 param_dtype=dtype)
    shardings = None
    if mesh is not None:
      abstract = self._abstract_params()
      shardings = sharding.divisible_shardings(nn.get_partition_spec(abstract),
                                               nn.unbox(abstract), mesh, rules)
    _, self.params, self.tokenizer = load_llm(self.path, self.spec.layer, dtype, shardings)
    self.layout = prompts_lib.build_layout(self.tokenizer, self.spec.template,
                                           self.spec.max_tokens)
    self.layout_estimated = False

  @classmethod
  def planned(cls, config: Mapping[str, Any], prefix_len: int, suffix_len: int
              ) -> "PromptEncoder":
    """An encoder of the right shapes without weights, to compile and plan runs.

    `params` are ShapeDtypeStructs. Where the LLM's files are on this machine, its architecture
    and tokenizer come from them (the prompt layout is the real one); else the architecture comes
    from `li_dit.io.architectures` and the layout has `prefix_len` and `suffix_len` template
    tokens (which a tokenizer would decide; `layout_estimated` is then True).
    """
    self = cls.__new__(cls)
    self.spec = EncoderSpec(**dict(config.items()))
    self.name = self.spec.name
    try:
      self.path = packaged.resolve_llm_path(self.spec.path)
      self.config = read_llm_config(self.path)
    except (ValueError, FileNotFoundError):
      self.path = self.spec.path
      self.config = architectures.known_llm_config(self.spec.path)
      self.tokenizer = None
      self.layout = prompts_lib.PromptLayout((0,) * prefix_len, (0,) * suffix_len,
                                             self.spec.max_tokens, pad_id=0)
    else:
      self.tokenizer = (gguf_io.load_gguf_tokenizer(self.path) if self.path.endswith(".gguf")
                        else hf.load_hf_tokenizer(self.path))
      self.layout = prompts_lib.build_layout(self.tokenizer, self.spec.template,
                                             self.spec.max_tokens)
    self.layout_estimated = self.tokenizer is None
    dtype = _DTYPES[self.spec.dtype]
    self.module = llm.DecoderLLM(self.config, layer=self.spec.layer, dtype=dtype,
                                 param_dtype=dtype)
    self.params = nn.unbox(self._abstract_params())
    return self

  @property
  def width(self) -> int:
    """D: the feature width."""
    return self.config.hidden_size

  def cache_key(self) -> dict[str, Any]:
    """JSON-able identity of the features this encoder produces (to key cached features)."""
    stat = os.stat(self.path)
    return dict(path=os.path.realpath(self.path), size=stat.st_size, mtime_ns=stat.st_mtime_ns,
                layer=self.spec.layer, template=self.spec.template,
                max_tokens=self.spec.max_tokens, dtype=self.spec.dtype,
                row_format=prompts_lib.ROW_FORMAT)

  def logical_specs(self) -> Params:
    """Logical PartitionSpecs of `params` (the LLM's axis names: vocab, embed, heads, mlp, ...)."""
    return nn.get_partition_spec(self._abstract_params())

  def _abstract_params(self) -> Params:
    """The module's parameters as boxed ShapeDtypeStructs (with their axis names), no memory."""
    tokens = jnp.zeros((1, 1), jnp.int32)
    return jax.eval_shape(self.module.init, jax.random.key(0), tokens,
                          jnp.ones_like(tokens, bool))["params"]

  def tokenize(self, prompts: Sequence[str]) -> prompts_lib.TokenizedPrompts:
    """Prompt rows: tokens [B,L] int32, mask [B,L] bool (numpy), truncation count."""
    return prompts_lib.tokenize_prompts(self.tokenizer, self.layout, prompts)

  def compute_prefix(self, params: Params) -> PrefixState:
    """Encodes the shared prefix once: features [P,D] and per-block (k, v) [1,P,G,K]."""
    prefix_len = self.layout.prefix_len
    if prefix_len == 0:
      kv = jnp.zeros((1, 0, self.config.num_kv_heads, self.config.head_dim), self.module.dtype)
      num_blocks = llm.blocks_for_layer(self.config.num_layers, self.spec.layer)
      return PrefixState(jnp.zeros((0, self.width), self.module.dtype),
                         tuple((kv, kv) for _ in range(num_blocks)))
    tokens = jnp.asarray([self.layout.prefix_ids], jnp.int32)
    features, kv = self.module.apply({"params": params}, tokens, jnp.ones_like(tokens, bool),
                                     return_kv=True)
    return jax.lax.stop_gradient(PrefixState(features[0], kv))

  def encode(self, params: Params, prefix: PrefixState, tokens: jax.Array, mask: jax.Array
             ) -> jax.Array:
    """Features [B,L,D] of prompt rows tokens/mask [B,L], after the cached prefix."""
    features = self.module.apply({"params": params}, tokens, mask, prefix_kv=prefix.kv)
    return jax.lax.stop_gradient(features)

  def encode_full(self, params: Params, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """Features [B,P+L,D] of [prefix | row] for rows tokens/mask [B,L], without prefix reuse."""
    batch = tokens.shape[0]
    prefix = jnp.broadcast_to(jnp.asarray(self.layout.prefix_ids, jnp.int32),
                              (batch, self.layout.prefix_len))
    full_tokens = jnp.concatenate([prefix, jnp.asarray(tokens, jnp.int32)], axis=1)
    full_mask = jnp.concatenate([jnp.ones_like(prefix, bool), jnp.asarray(mask, bool)], axis=1)
    return jax.lax.stop_gradient(self.module.apply({"params": params}, full_tokens, full_mask))



def build_encoders(text_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh | None = None,
                   rules: Any = None) -> dict[str, PromptEncoder]:
  """One frozen PromptEncoder per configured LLM, in the order of their names; with a mesh,
  their weights are loaded straight into their shards (`PromptEncoder`)."""
  return {name: PromptEncoder(name=name, mesh=mesh, rules=rules,
                              **text_config.llms[name].to_dict())
          for name in sorted(text_config.llms)}
