"""Usage-guidance prompts: system prompt + instruction + user prompt, as fixed-length token rows.

A sequence is [prefix | row]: the prefix (system prompt and instruction, with chat-template tokens)
is the same for every prompt, and a row is the prompt's own tokens, the template's suffix (end of
the user turn, assistant header) and right padding. Because the prompt is tokenized on its own,
the prefix tokens never change, so a causal LLM encodes the prefix once (`PromptEncoder`).
In the full sequence [prefix | row] the instruction span is [0, P); rows start at P.

Shapes: B prompts, P prefix tokens, L row tokens (`PromptLayout.length`).
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jinja2
import numpy as np
import transformers

INSTRUCTION = ("Describe the image by detailing the color, shape, size, texture, quantity, text, "
               "and spatial relationships of the objects:")
SYSTEM_PROMPT = "You are an assistant that describes images in detail for an image generator."
TEMPLATES = ("paper", "none")
# Changes when the same prompt and layout give other rows (2: an empty row holds one pad token),
# so features cached under an older format are not reused.
ROW_FORMAT = 2

# Stands in for the prompt when rendering the chat template, to find where the prompt goes.
_PLACEHOLDER = "<<li_dit_prompt_placeholder>>"


@dataclasses.dataclass(frozen=True)
class PromptLayout:
  """How a prompt becomes token ids.

  Attributes:
    prefix_ids: tokens before every prompt (system prompt + instruction, template tokens).
    suffix_ids: tokens after every prompt (end of the user turn + assistant header).
    max_prompt_tokens: prompt tokens kept per row; longer prompts are truncated (and counted).
    pad_id: id of right padding (masked out; any valid id).
    prompt_lead: text put before a non-empty prompt before tokenizing it. The "paper" template
      separates instruction and prompt with a space; tokenizing it with the prompt (" a cat")
      gives the same tokens as the whole text would ("objects:" | " a" " cat"), where tokenizing
      it with the prefix would leave a lone space token.
  """
  prefix_ids: tuple[int, ...]
  suffix_ids: tuple[int, ...]
  max_prompt_tokens: int
  pad_id: int
  prompt_lead: str = ""

  @property
  def prefix_len(self) -> int:
    """P: the length of the shared prefix (may be 0)."""
    return len(self.prefix_ids)

  @property
  def length(self) -> int:
    """L: the row length, max_prompt_tokens + len(suffix_ids)."""
    return self.max_prompt_tokens + len(self.suffix_ids)


class TokenizedPrompts(NamedTuple):
  """Rows of a batch: tokens [B,L] int32, mask [B,L] bool, how many prompts were truncated."""
  tokens: np.ndarray
  mask: np.ndarray
  num_truncated: int


def build_layout(tokenizer: transformers.PreTrainedTokenizerBase, template: str,
                 max_prompt_tokens: int) -> PromptLayout:
  """The prefix/suffix split of `template` ("paper" or "none") for this tokenizer.

  "paper": system prompt + instruction + prompt, through the tokenizer's chat template when it
  has one (the suffix is then the end of the user turn and the assistant header). "none": just the
  prompt (after the tokenizer's BOS, if it adds one).
  """
  if template not in TEMPLATES:
    raise ValueError(f"Unknown prompt template {template!r}; valid: {', '.join(TEMPLATES)}.")
  if max_prompt_tokens < 1:
    raise ValueError(f"max_prompt_tokens must be positive, got {max_prompt_tokens}.")
  pad_id = _pad_id(tokenizer)
  if template == "none":
    return PromptLayout(_bos_ids(tokenizer), (), max_prompt_tokens, pad_id)
  if tokenizer.chat_template is None:
    prefix = _bos_ids(tokenizer) + _encode(tokenizer, f"{SYSTEM_PROMPT}\n{INSTRUCTION}")
    return PromptLayout(prefix, (), max_prompt_tokens, pad_id, prompt_lead=" ")
  messages = [{"role": "system", "content": SYSTEM_PROMPT},
              {"role": "user", "content": f"{INSTRUCTION} {_PLACEHOLDER}"}]
  try:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  except jinja2.TemplateError:
    # Templates without a system role (Gemma 1 and 2 raise "System role not supported"): the
    # system prompt opens the user turn, as Gemma-3's template does by itself.
    messages = [{"role": "user", "content": f"{SYSTEM_PROMPT}\n\n{INSTRUCTION} {_PLACEHOLDER}"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
  if text.count(" " + _PLACEHOLDER) != 1:
    raise ValueError(f"The chat template does not render the user message verbatim: {text!r}")
  # The rendered text carries the template's special tokens (BOS included when the template
  # writes one), so it is tokenized without adding any.
  head, tail = text.split(" " + _PLACEHOLDER)
  return PromptLayout(_encode(tokenizer, head), _encode(tokenizer, tail), max_prompt_tokens,
                      pad_id, prompt_lead=" ")


def tokenize_prompts(tokenizer: transformers.PreTrainedTokenizerBase, layout: PromptLayout,
                     prompts: Sequence[str]) -> TokenizedPrompts:
  """Rows [prompt ids (truncated to max_prompt_tokens) | suffix ids | padding] of length L.

  Prompts are stripped of surrounding whitespace; an empty prompt (the classifier-free guidance
  null condition) gives just the suffix, or, where the template has none ("none", or a tokenizer
  without a chat template), one valid `pad_id` token (the tokenizer's pad or end-of-text token):
  every row keeps at least one valid token, so cross-attention never averages over padding alone
  (where XLA, splash attention and PyTorch would each give something else).
  """
  texts = [layout.prompt_lead + p.strip() if p.strip() else "" for p in prompts]
  ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
  tokens = np.full((len(prompts), layout.length), layout.pad_id, np.int32)
  mask = np.zeros((len(prompts), layout.length), bool)
  num_truncated = 0
  for i, row in enumerate(ids):
    num_truncated += len(row) > layout.max_prompt_tokens
    row = list(row[:layout.max_prompt_tokens]) + list(layout.suffix_ids) or [layout.pad_id]
    tokens[i, :len(row)] = row
    mask[i, :len(row)] = True
  return TokenizedPrompts(tokens, mask, num_truncated)


def _encode(tokenizer: transformers.PreTrainedTokenizerBase, text: str) -> tuple[int, ...]:
  return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])


def _bos_ids(tokenizer: transformers.PreTrainedTokenizerBase) -> tuple[int, ...]:
  """(BOS,) if the tokenizer adds a BOS to plain text, else ()."""
  ids = tokenizer("", add_special_tokens=True)["input_ids"]
  bos = tokenizer.bos_token_id
  return (bos,) if bos is not None and ids[:1] == [bos] else ()


def _pad_id(tokenizer: transformers.PreTrainedTokenizerBase) -> int:
  for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
    if token_id is not None:
      return token_id
  return 0
