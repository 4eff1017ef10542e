"""From captions to the per-LLM `TextFeatures` the model reads, online or from a cached table.

online  The train step runs each frozen LLM on the batch's token ids (the data workers
        tokenize). The default at scale: nothing to precompute or store.
cached  Features of every caption a finite source can produce are computed once (and stored in
        the workdir); the data workers emit caption ids and the train step gathers rows of the
        table. For small runs, where the LLM forward would dominate the step.

Either way the instruction prefix is encoded once per LLM and shared by every prompt, and the
classifier-free-guidance null condition is the empty prompt "" through the same path.

`TextConditioner` is a run's frozen text side: on the host it tokenizes, encodes prompts and
builds the cached table; on the device it gives the frozen arrays and the pure functions the
jitted step and the generator call. The data workers' transforms are li_dit.text.transforms, the
stored tables li_dit.text.feature_cache.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from li_dit.models.lidit import TextFeatures
from li_dit.text import encoders as encoders_lib
from li_dit.text import feature_cache
from li_dit.text import transforms

ONLINE, CACHED = "online", "cached"


def _is_abstract(tree: Any) -> bool:
  return any(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree_util.tree_leaves(tree))


class TextConditioner:
  """The frozen text side of a run: its LLMs, their shared prefixes and, if cached, the table.

  `frozen` is a pytree of arrays (LLM weights, prefix states, tables) passed into jitted
  functions as an argument, never closed over, so it is sharded like anything else and not
  baked into the compiled program as a constant.
  """

  def __init__(self, encoders: Mapping[str, encoders_lib.PromptEncoder], mode: str,
               batch_size: int = 64):
    if mode not in (ONLINE, CACHED):
      raise ValueError(f"text mode {mode!r} is not one of {(ONLINE, CACHED)}")
    self.encoders = dict(encoders)
    self.names = tuple(self.encoders)
    self.mode = mode
    self._batch_size = batch_size
    self._encode = jax.jit(self.encode_tokens)
    # Planned encoders (ShapeDtypeStruct weights, to compile ahead of time) get abstract prefixes.
    self.prefixes = {
        n: (jax.eval_shape(e.compute_prefix, e.params) if _is_abstract(e.params)
            else jax.jit(e.compute_prefix)(e.params))
        for n, e in self.encoders.items()}
    self.captions: tuple[str, ...] = ()
    self.tables: dict[str, tuple[jax.Array, jax.Array]] = {}

  # -- host side --------------------------------------------------------------------------------
  def tokenize(self, prompts: Sequence[str]) -> dict[str, np.ndarray]:
    """Prompts -> {"tokens/<llm>": [B,L], "mask/<llm>": [B,L]} for every LLM."""
    out = {}
    for name, enc in self.encoders.items():
      t = enc.tokenize(list(prompts))
      out[f"tokens/{name}"], out[f"mask/{name}"] = t.tokens, t.mask
    return out

  def data_transform(self):
    """The picklable caption transform the data workers apply in this mode."""
    if self.mode == ONLINE:
      return transforms.TokenizeCaptions(
          {n: (e.tokenizer, e.layout) for n, e in self.encoders.items()})
    return transforms.CaptionIds(self.captions)

  def encode_prompts(self, prompts: Sequence[str]) -> list[TextFeatures]:
    """Runs the LLMs on `prompts` now (online, in batches): one TextFeatures per LLM, [B,...]."""
    chunks = []
    for start in range(0, len(prompts), self._batch_size):
      part = list(prompts[start:start + self._batch_size])
      pad = self._batch_size - len(part) if start else 0  # One compiled shape after the first.
      tokens = self.tokenize(part + [""] * pad)
      feats = self._encode(self.llm_state(), tokens)
      chunks.append([TextFeatures(f.prefix, f.tokens[:len(part)], f.mask[:len(part)])
                     for f in feats])
    return [TextFeatures(chunks[0][i].prefix,
                         jnp.concatenate([c[i].tokens for c in chunks]),
                         jnp.concatenate([c[i].mask for c in chunks])) for i in range(len(self.names))]

  def build_table(self, captions: Sequence[str], cache_dir: str | None = None) -> None:
    """Computes (or loads from `cache_dir`) the features of every caption plus "" (cached mode)."""
    captions = tuple(sorted(set(captions) | {""}))
    self.captions = captions
    for name, enc in self.encoders.items():
      path = None
      if cache_dir:  # Local or gs://.
        path = feature_cache.table_path(cache_dir, name, enc, captions)
        table = feature_cache.read_table(path)
        if table is not None:
          self.tables[name] = table
          logging.info("text features of %d captions for %s loaded from %s", len(captions),
                       name, path)
          continue
      feats = TextConditioner(
          {name: enc}, ONLINE, self._batch_size).encode_prompts(captions)[0]
      self.tables[name] = (feats.tokens, feats.mask)
      if path:
        feature_cache.write_table(path, feats.tokens, feats.mask)

  # -- device side ------------------------------------------------------------------------------
  def frozen(self) -> dict[str, Any]:
    """The arrays the jitted text path needs, as a pytree."""
    if self.mode == ONLINE:
      return self.llm_state()
    if not self.tables:
      raise RuntimeError("cached text mode: call build_table() first")
    return {n: {"prefix": self.prefixes[n].features, "table": self.tables[n]} for n in self.names}

  def frozen_logical_specs(self) -> dict[str, Any]:
    """Logical PartitionSpecs of `frozen()`, leaf for leaf.

    The LLM weights carry their axis names, so a mesh shards them like the model's own
    (over fsdp and tensor); the instruction prefixes and cached tables are replicated.
    """
    frozen = self.frozen()
    specs = jax.tree_util.tree_map(lambda _: PartitionSpec(), frozen)
    if self.mode == ONLINE:
      for name, enc in self.encoders.items():
        specs[name]["params"] = enc.logical_specs()
    return specs

  def features(self, frozen: Mapping[str, Any], text_batch: Mapping[str, jax.Array]
               ) -> list[TextFeatures]:
    """Pure and jit-able: a batch's text inputs -> one TextFeatures per LLM (no gradient)."""
    if self.mode == ONLINE:
      return self.encode_tokens(frozen, text_batch)
    ids = text_batch["caption_id"]
    return [TextFeatures(frozen[n]["prefix"], frozen[n]["table"][0][ids],
                         frozen[n]["table"][1][ids]) for n in self.names]

  def llm_state(self) -> dict[str, Any]:
    """Each LLM's weights and encoded instruction prefix (in any mode: generation encodes any
    prompt), as a pytree."""
    return {n: {"params": e.params, "prefix": self.prefixes[n]} for n, e in self.encoders.items()}

  def encode_tokens(self, llm_state: Mapping[str, Any], text_batch: Mapping[str, jax.Array]
                    ) -> list[TextFeatures]:
    """Pure and jit-able: token rows {"tokens/<llm>", "mask/<llm>"} [B,L] -> one TextFeatures
    per LLM (no gradient)."""
    out = []
    for name, enc in self.encoders.items():
      state = llm_state[name]
      feats = enc.encode(state["params"], state["prefix"], text_batch[f"tokens/{name}"],
                         text_batch[f"mask/{name}"])
      out.append(TextFeatures(state["prefix"].features, feats, text_batch[f"mask/{name}"]))
    return out
