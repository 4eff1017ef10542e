r"""Encodes a file of prompts with a frozen LLM and saves the features, e.g. to compare them.

  python tools/encode_prompts.py --llm PATH --prompts FILE --out FEATS.npz \
      [--layer -3 | --layers all] [--template paper|none] [--max-tokens N] \
      [--dtype float32|bfloat16]

--llm is a registry name (`li_dit.io.packaged.PACKAGED_LLMS`, e.g. smollm2-135m-instruct), a GGUF
file or a Hugging Face model directory. --prompts is UTF-8 text with one prompt per line, or, when
its name ends in .jsonl, one JSON object {"prompt": "..."} per line (an explicit "" is kept: it is
the classifier-free guidance null prompt). Blank lines are skipped and counted. Prompts are
encoded as `li_dit.text.encoders.PromptEncoder` does in training: [prefix | row], where the
prefix (system prompt + instruction of --template) is the same for every prompt and a row is the
prompt's first --max-tokens tokens, the template's suffix and right padding.

Shapes: N prompts, P prefix tokens, L row tokens (--max-tokens + the template's suffix), D the
LLM's width, n its number of blocks. The .npz holds:

  features         [N,P+L,D] float32 with --layer; [N,n+1,P+L,D] with --layers all (axis 1 is
                   Hugging Face `hidden_states` index 0..n: 0 the token embedding, n the last
                   block's output after the final norm). Float32 even with --dtype bfloat16.
                   Features at padding (mask False) are finite but meaningless.
  mask             [N,P+L] bool, True on valid tokens (the prefix is always valid).
  token_ids        [N,P+L] int32.
  prefix_len       scalar P; instruction_span is [0, P) as an int32 pair.
  layer | layers   the --layer given (HF indexing), or [n+1] int32 0..n with --layers all.
  prompts          [N] str, as read; num_truncated: prompts longer than --max-tokens tokens.
  llm, template, max_tokens, dtype   the settings, for the record.

One layer: the prefix is encoded once and each batch of rows attends to its cached keys/values
(as in training), and only the blocks feeding the layer are loaded. --layers all loads every
block and encodes the full sequences in one pass, reading each block's input on the way; its
output holds n+1 times the features of one layer (N * (n+1) * (P+L) * D * 4 bytes).

The summary line gives the counts (truncated prompts included) and the seconds spent loading,
compiling (and encoding the prefix) and encoding; tokens/s is the valid tokens of the saved
sequences per second of encoding.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from li_dit.models import lidit  # noqa: E402
from li_dit.models import llm  # noqa: E402
from li_dit.text import encoders  # noqa: E402
from li_dit.text import prompts as prompts_lib  # noqa: E402

_LLM = flags.DEFINE_string("llm", None, "Registry name, GGUF file or Hugging Face directory.")
_PROMPTS = flags.DEFINE_string("prompts", None, "Prompts: .txt (one per line) or .jsonl.")
_OUT = flags.DEFINE_string("out", None, "Output .npz file.")
_LAYER = flags.DEFINE_integer("layer", None, "Feature layer, HF hidden_states indexing "
                              "(default -3).")
_LAYERS = flags.DEFINE_enum("layers", None, ["all"], "Every hidden state instead of one layer.")
_TEMPLATE = flags.DEFINE_enum("template", "paper", list(prompts_lib.TEMPLATES), "Prompt template.")
_MAX_TOKENS = flags.DEFINE_integer("max-tokens", 128, "Prompt tokens kept per prompt.",
                                   lower_bound=1)
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "Parameter and compute dtype (features are saved as float32).")
flags.mark_flags_as_required(["llm", "prompts", "out"])
flags.mark_flags_as_mutual_exclusive(["layer", "layers"])

DEFAULT_LAYER = -3
# Prompts per compiled call; fewer prompts make one smaller batch, the last batch is padded.
BATCH_SIZE = 32


def read_prompts(path: str) -> tuple[list[str], int]:
  """(prompts, number of blank lines skipped) of a .txt or .jsonl prompts file.

  Raises:
    ValueError: the file cannot be read, is not UTF-8, has a malformed .jsonl line or no prompts.
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise ValueError(f"Cannot read prompts file {path}: {e.strerror}.") from e
  try:
    text = data.decode("utf-8-sig")  # -sig: a leading byte order mark is not part of a prompt.
  except UnicodeDecodeError as e:
    raise ValueError(f"Prompts file {path} is not UTF-8 text: byte 0x{data[e.start]:02x} at "
                     f"offset {e.start} ({e.reason}).") from e
  # Split on line endings only: str.splitlines also splits at characters such as U+2028, which
  # would silently turn one prompt into two.
  lines = text.replace("\r\n", "\n").split("\n")
  if lines[-1] == "":
    lines.pop()  # After the final newline.
  jsonl = path.endswith(".jsonl")
  prompts, blank = [], 0
  for number, line in enumerate(lines, 1):
    if not line.strip():
      blank += 1
    elif jsonl:
      prompts.append(_jsonl_prompt(line, f"{path}:{number}"))
    else:
      prompts.append(line)
  if not prompts:
    raise ValueError(f"Prompts file {path} has no prompts ({len(lines)} line(s), all blank).")
  return prompts, blank


def _jsonl_prompt(line: str, where: str) -> str:
  try:
    record = json.loads(line)
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not a JSON object: {e}.") from e
  if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
    raise ValueError(f'{where}: expected an object with a string "prompt", got {line.strip()!r}.')
  return record["prompt"]


def hidden_states(module: llm.DecoderLLM, params: encoders.Params, tokens: jax.Array,
                  mask: jax.Array) -> jax.Array:
  """Every Hugging Face hidden state, [B,n+1,T,D], of tokens/mask [B,T] in one pass.

  `module` must run every block (layer -1). hidden_states[i] for i < n is the input of block i,
  which is where Hugging Face takes it, and [n] the module's output after the final norm; the
  block inputs are read by intercepting the block calls, so no block runs twice.
  """
  states = []

  def capture(next_fun, args, kwargs, context):
    if isinstance(context.module, llm.Block) and context.method_name == "__call__":
      states.append(args[0])  # Block.__call__(x, positions, mask, prefix_kv).
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    last = module.apply({"params": params}, tokens, mask)
  if len(states) != module.config.num_layers:
    raise RuntimeError(f"Captured {len(states)} block inputs of a "
                       f"{module.config.num_layers}-block model.")
  return jnp.stack(states + [last], axis=1)


def encode_prompts(encoder: encoders.PromptEncoder, prompts: list[str], all_layers: bool
                   ) -> tuple[dict[str, np.ndarray], float]:
  """features, mask, token_ids and num_truncated (see the module docstring) of `prompts`.

  With `all_layers` the encoder must have been built with layer -1 (every block and the final
  norm). Also returns the seconds spent before the first batch: compilation (and encoding the
  prefix), so that throughput can be reported without it.
  """
  start = time.perf_counter()
  rows = encoder.tokenize(prompts)
  num = len(prompts)
  prefix_ids = np.broadcast_to(np.asarray(encoder.layout.prefix_ids, np.int32),
                               (num, encoder.layout.prefix_len))
  full_tokens = np.concatenate([prefix_ids, rows.tokens], axis=1)
  full_mask = np.concatenate([np.ones(prefix_ids.shape, bool), rows.mask], axis=1)
  batch = min(BATCH_SIZE, num)
  padded = math.ceil(num / batch) * batch

  def pad(x: np.ndarray, fill: int | bool) -> np.ndarray:
    """x [N,...] -> [padded,...]: the last batch is filled up with all-padding rows, dropped."""
    return np.concatenate([x, np.full((padded - num,) + x.shape[1:], fill, x.dtype)])

  if all_layers:
    def encode_batch(params, tokens, mask):
      return hidden_states(encoder.module, params, tokens, mask).astype(jnp.float32)

    args = (encoder.params,)
    inputs = (pad(full_tokens, encoder.layout.pad_id), pad(full_mask, False))
    layer_axis = (encoder.config.num_layers + 1,)
  else:
    def encode_batch(params, prefix, tokens, mask):
      row_features = encoder.encode(params, prefix, tokens, mask)
      features, _ = lidit.TextFeatures(prefix.features, row_features, mask).with_prefix()
      return features.astype(jnp.float32)

    args = (encoder.params, jax.jit(encoder.compute_prefix)(encoder.params))
    inputs = (pad(rows.tokens, encoder.layout.pad_id), pad(rows.mask, False))
    layer_axis = ()
  compiled = jax.jit(encode_batch).lower(*args, *(x[:batch] for x in inputs)).compile()
  jax.block_until_ready(args)
  setup_seconds = time.perf_counter() - start

  features = np.empty((num,) + layer_axis + full_tokens.shape[1:] + (encoder.width,), np.float32)
  for first in range(0, padded, batch):
    out = np.asarray(compiled(*args, *(x[first:first + batch] for x in inputs)))
    stop = min(first + batch, num)
    features[first:stop] = out[:stop - first]
  return dict(features=features, mask=full_mask, token_ids=full_tokens,
              num_truncated=np.int64(rows.num_truncated)), setup_seconds


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # JAX logs its backend probing at INFO.
  all_layers = _LAYERS.value == "all"
  layer = -1 if all_layers else (DEFAULT_LAYER if _LAYER.value is None else _LAYER.value)
  start = time.perf_counter()
  try:
    prompts, blank = read_prompts(_PROMPTS.value)
    out_dir = os.path.dirname(_OUT.value) or "."
    if not os.path.isdir(out_dir):  # Found out before the slow load, not after encoding.
      raise ValueError(f"The directory of --out {_OUT.value} does not exist.")
    # Raises the loaders' ValueErrors, e.g. a layer out of range (`llm.blocks_for_layer`).
    encoder = encoders.PromptEncoder(name="encode_prompts", path=_LLM.value,
                                     max_tokens=_MAX_TOKENS.value, layer=layer,
                                     template=_TEMPLATE.value, dtype=_DTYPE.value)
  except (OSError, ValueError) as e:
    sys.exit(f"encode_prompts: {e}")
  loaded = time.perf_counter()
  out, compile_seconds = encode_prompts(encoder, prompts, all_layers)
  encode_seconds = time.perf_counter() - loaded - compile_seconds
  num_layers = encoder.config.num_layers
  prefix_len = encoder.layout.prefix_len
  out.update(prefix_len=np.int64(prefix_len), instruction_span=np.array([0, prefix_len], np.int32),
             prompts=np.array(prompts, dtype=str), llm=np.array(encoder.path),
             template=np.array(_TEMPLATE.value), max_tokens=np.int64(_MAX_TOKENS.value),
             dtype=np.array(_DTYPE.value))
  if all_layers:
    out["layers"] = np.arange(num_layers + 1, dtype=np.int32)
  else:
    out["layer"] = np.int64(layer)
  with open(_OUT.value, "wb") as f:  # A file object: np.savez would append .npz to a path.
    np.savez(f, **out)
  valid_tokens = int(out["mask"].sum())
  layers = f"layers 0..{num_layers}" if all_layers else f"layer {layer}"
  print(f"encode_prompts: {len(prompts)} prompts ({blank} blank line(s) skipped), "
        f"{int(out['num_truncated'])} truncated to {_MAX_TOKENS.value} tokens, {layers} of "
        f"{num_layers}, features {out['features'].shape}; load {loaded - start:.1f} s, compile "
        f"{compile_seconds:.1f} s, encode {encode_seconds:.2f} s, "
        f"{valid_tokens / encode_seconds:,.0f} tokens/s -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
