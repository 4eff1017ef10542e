"""Data-worker transforms of captions (picklable: grain sends them to its worker processes).

online  `TokenizeCaptions`: caption -> token ids and mask for every LLM.
cached  `CaptionIds`: caption -> its row in the cached feature table (li_dit.text.feature_cache).

`li_dit.text.conditioning.TextConditioner.data_transform` gives the one of a run's text mode.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np

from li_dit.text import prompts as prompts_lib


class TokenizeCaptions:
  """Data-worker transform (picklable): caption -> token ids and mask for every LLM.

  Returns {"tokens/<llm>": int32 [L], "mask/<llm>": bool [L], "truncated": int32 (0/1: the
  caption was cut to fit at least one LLM's token limit)}.
  """

  def __init__(self, tokenizers: Mapping[str, tuple[Any, prompts_lib.PromptLayout]]):
    self._tokenizers = dict(tokenizers)

  def __call__(self, caption: str) -> dict[str, np.ndarray]:
    out, truncated = {}, 0
    for name, (tokenizer, layout) in self._tokenizers.items():
      t = prompts_lib.tokenize_prompts(tokenizer, layout, [caption])
      out[f"tokens/{name}"] = t.tokens[0]
      out[f"mask/{name}"] = t.mask[0]
      truncated = max(truncated, int(t.num_truncated))
    out["truncated"] = np.int32(truncated)
    return out


class CaptionIds:
  """Data-worker transform (picklable): caption -> its row in the cached feature table."""

  def __init__(self, captions: Sequence[str]):
    self._index = {c: i for i, c in enumerate(captions)}

  def __call__(self, caption: str) -> dict[str, np.ndarray]:
    if caption not in self._index:
      raise KeyError(f"caption {caption!r} is not in the cached feature table; cached text "
                     "features need a source with a fixed caption set (use text.encode=online)")
    return {"caption_id": np.int32(self._index[caption]), "truncated": np.int32(0)}
