"""Prompt layouts and tokenization with SmolLM2-135M-Instruct's real tokenizer and chat template."""
import copy

import numpy as np
import pytest

from li_dit.io import gguf as gguf_io
from li_dit.io import packaged
from li_dit.text import prompts


@pytest.fixture(scope="module")
def tokenizer():
  return gguf_io.load_gguf_tokenizer(packaged.resolve_llm_path("smollm2-135m-instruct"))


@pytest.fixture(scope="module")
def layout(tokenizer):
  return prompts.build_layout(tokenizer, "paper", max_prompt_tokens=8)


def test_paper_layout_splits_the_chat_template(tokenizer, layout):
  prefix = tokenizer.decode(layout.prefix_ids)
  suffix = tokenizer.decode(layout.suffix_ids)
  assert prefix.startswith("<|im_start|>system\n" + prompts.SYSTEM_PROMPT)
  assert prefix.endswith("<|im_start|>user\n" + prompts.INSTRUCTION)
  assert suffix == "<|im_end|>\n<|im_start|>assistant\n"
  assert layout.prefix_len == len(layout.prefix_ids)
  assert layout.length == 8 + len(layout.suffix_ids)


def test_prefix_and_row_tokenize_like_the_whole_text(tokenizer, layout):
  """Tokenizing the prompt on its own gives the same ids as tokenizing the rendered template."""
  prompt = "A red cube on a blue sphere"
  text = tokenizer.apply_chat_template(
      [{"role": "system", "content": prompts.SYSTEM_PROMPT},
       {"role": "user", "content": f"{prompts.INSTRUCTION} {prompt}"}],
      tokenize=False, add_generation_prompt=True)
  whole = tokenizer(text, add_special_tokens=False)["input_ids"]
  row = prompts.tokenize_prompts(tokenizer, layout, [prompt])
  ids = list(layout.prefix_ids) + row.tokens[0][row.mask[0]].tolist()
  assert ids == whole


def test_rows_mask_and_padding(tokenizer, layout):
  out = prompts.tokenize_prompts(tokenizer, layout, ["Two cats", "A dog"])
  assert out.tokens.shape == out.mask.shape == (2, layout.length)
  assert out.tokens.dtype == np.int32 and out.mask.dtype == bool
  for tokens, mask, prompt in zip(out.tokens, out.mask, ["Two cats", "A dog"]):
    ids = tokenizer(" " + prompt, add_special_tokens=False)["input_ids"]
    n = len(ids) + len(layout.suffix_ids)
    assert mask.tolist() == [True] * n + [False] * (layout.length - n)
    assert tokens[:n].tolist() == ids + list(layout.suffix_ids)
    assert (tokens[n:] == layout.pad_id).all()
  assert out.num_truncated == 0


def test_truncation_is_counted(tokenizer, layout):
  long = "a very long prompt about many red and blue and green things on a table"
  out = prompts.tokenize_prompts(tokenizer, layout, [long, "short", long])
  assert out.num_truncated == 2
  assert out.mask[0].all()  # 8 prompt tokens + the suffix fill the row.
  assert out.tokens[0, 8:].tolist() == list(layout.suffix_ids)


def test_empty_prompt_is_only_the_suffix(tokenizer, layout):
  out = prompts.tokenize_prompts(tokenizer, layout, ["", "   "])
  n = len(layout.suffix_ids)
  for tokens, mask in zip(out.tokens, out.mask):
    assert tokens[:n].tolist() == list(layout.suffix_ids)
    assert mask.sum() == n and mask[:n].all()


def test_template_none(tokenizer):
  layout = prompts.build_layout(tokenizer, "none", max_prompt_tokens=6)
  assert layout.prefix_ids == () and layout.suffix_ids == ()  # SmolLM2 adds no BOS.
  assert layout.prefix_len == 0 and layout.length == 6
  out = prompts.tokenize_prompts(tokenizer, layout, ["Two cats"])
  ids = tokenizer("Two cats", add_special_tokens=False)["input_ids"]
  assert out.tokens[0, :len(ids)].tolist() == ids and out.mask[0].sum() == len(ids)


def test_paper_template_without_chat_template(tokenizer):
  plain = copy.deepcopy(tokenizer)
  plain.chat_template = None
  layout = prompts.build_layout(plain, "paper", max_prompt_tokens=8)
  assert plain.decode(layout.prefix_ids) == f"{prompts.SYSTEM_PROMPT}\n{prompts.INSTRUCTION}"
  assert layout.suffix_ids == ()


def test_bad_template(tokenizer):
  with pytest.raises(ValueError, match="'chat'.*valid: paper, none"):
    prompts.build_layout(tokenizer, "chat", max_prompt_tokens=8)


@pytest.mark.parametrize("template, chat", [("none", True), ("paper", False), ("paper", True)])
def test_the_empty_prompt_keeps_a_valid_token(tokenizer, template, chat):
  """The classifier-free guidance null condition never has zero valid tokens: without a template
  suffix ("none", or a tokenizer without a chat template) it is one pad token."""
  plain = copy.deepcopy(tokenizer)
  if not chat:
    plain.chat_template = None
  layout = prompts.build_layout(plain, template, max_prompt_tokens=6)
  out = prompts.tokenize_prompts(plain, layout, ["", "  ", "Two cats"])
  for tokens, mask in zip(out.tokens[:2], out.mask[:2]):
    if layout.suffix_ids:
      assert mask.sum() == len(layout.suffix_ids)
    else:
      assert mask.tolist() == [True] + [False] * (layout.length - 1)
      assert tokens[0] == layout.pad_id
  assert out.mask[2].sum() == len(tokenizer(" Two cats" if template == "paper" else "Two cats",
                                            add_special_tokens=False)["input_ids"]) + len(
                                                layout.suffix_ids)
