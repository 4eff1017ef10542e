r"""Prompt-encoding throughput: our Flax LLM encoder against transformers' PyTorch, same CPU.

  python tools/bench_encode.py [--llm smollm2-135m-instruct] [--batch 32] [--repeats 5] \
      [--max-tokens 64] [--json bench_encode.json]

Both sides encode the same token rows ([instruction prefix | prompt | template suffix], right
padded) of `--batch` prompts in float32 and produce the same features, HF `hidden_states[layer]`
(default -3): PyTorch runs the model truncated to the blocks that feed that layer, without the LM
head. Ours runs twice: on the full rows, like PyTorch, and with the instruction prefix encoded
once and reused (what training and sampling do). Throughput counts the valid tokens of the full
rows in each case, so the prefix-reuse figure is the effective rate for the same output.

Prints a table and writes the figures as JSON. A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from li_dit.io import packaged  # pylint: disable=g-import-not-at-top
from li_dit.text import encoders  # pylint: disable=g-import-not-at-top

# Varied prompts of the kind a text-to-image user writes, short and long.
PROMPTS = (
    "A red cube balanced on a small blue sphere, studio lighting.",
    "Two cats sleeping on a windowsill in the afternoon sun.",
    "A wooden sign that reads 'OPEN' hanging on a green door next to a potted fern.",
    "An astronaut riding a horse across a desert at dusk, cinematic, 35mm film grain.",
    "A bowl of ramen with a soft-boiled egg, steam rising, top-down view.",
    "Three yellow tulips in a glass vase on a white table.",
    "A lighthouse on a rocky cliff during a storm, waves crashing, dramatic clouds.",
    "A child's drawing of a purple dinosaur eating a birthday cake.",
)


def _time(fn, repeats: int) -> float:
  """Median seconds of `repeats` calls after one warm-up call (compilation, caches)."""
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def run(llm: str, batch: int, repeats: int, max_tokens: int, layer: int = -3) -> dict:
  """Measures both implementations; returns the figures (see the module docstring)."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  encoder = encoders.PromptEncoder(name="bench", path=llm, max_tokens=max_tokens, layer=layer)
  prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
  rows = encoder.tokenize(prompts)
  layout = encoder.layout
  prefix = np.broadcast_to(np.asarray(layout.prefix_ids, np.int32), (batch, layout.prefix_len))
  full_tokens = np.concatenate([prefix, rows.tokens], axis=1)
  full_mask = np.concatenate([np.ones_like(prefix, bool), rows.mask], axis=1)
  num_tokens = int(full_mask.sum())

  encode_full = jax.jit(encoder.encode_full)
  encode = jax.jit(encoder.encode)
  compute_prefix = jax.jit(encoder.compute_prefix)
  prefix_state = compute_prefix(encoder.params)
  ours_full = _time(lambda: encode_full(encoder.params, rows.tokens, rows.mask)
                    .block_until_ready(), repeats)
  ours_reuse = _time(lambda: encode(encoder.params, prefix_state, rows.tokens, rows.mask)
                     .block_until_ready(), repeats)
  prefix_once = _time(lambda: jax.block_until_ready(compute_prefix(encoder.params)), repeats)

  path = encoder.path
  kwargs = (dict(gguf_file=os.path.basename(path)) if path.endswith(".gguf") else {})
  model = transformers.AutoModel.from_pretrained(
      os.path.dirname(path) if path.endswith(".gguf") else path, dtype=torch.float32, **kwargs)
  num_blocks = len(model.layers) + 1 + layer if layer < 0 else layer
  # Only the blocks feeding the layer, and no final norm unless the layer asks for it.
  model.layers = model.layers[:num_blocks]
  if num_blocks < model.config.num_hidden_layers:
    model.norm = torch.nn.Identity()
  model.config.num_hidden_layers = num_blocks
  model.eval()
  torch_tokens = torch.tensor(full_tokens, dtype=torch.long)
  torch_mask = torch.tensor(full_mask, dtype=torch.long)

  def torch_encode():
    with torch.no_grad():
      return model(input_ids=torch_tokens, attention_mask=torch_mask).last_hidden_state

  torch_seconds = _time(torch_encode, repeats)
  ours = np.asarray(encode_full(encoder.params, rows.tokens, rows.mask))
  max_diff = float(np.abs(ours - torch_encode().numpy())[full_mask].max())
  return dict(
      llm=llm, layer=layer, batch=batch, prefix_len=layout.prefix_len, row_len=layout.length,
      valid_tokens=num_tokens, torch_threads=torch.get_num_threads(),
      jax_devices=str(jax.devices()), max_abs_diff=max_diff,
      seconds=dict(torch=torch_seconds, ours_full=ours_full, ours_prefix_reuse=ours_reuse,
                   prefix_once=prefix_once),
      tokens_per_sec=dict(torch=num_tokens / torch_seconds, ours_full=num_tokens / ours_full,
                          ours_prefix_reuse=num_tokens / ours_reuse),
      speedup_vs_torch=dict(ours_full=torch_seconds / ours_full,
                            ours_prefix_reuse=torch_seconds / ours_reuse),
      prefix_reuse_saving=1 - ours_reuse / ours_full)


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--llm", default="smollm2-135m-instruct",
                      help=f"registry name ({', '.join(packaged.PACKAGED_LLMS)}), GGUF file or "
                           "Hugging Face directory")
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--max-tokens", type=int, default=64)
  parser.add_argument("--layer", type=int, default=-3)
  parser.add_argument("--json", default="bench_encode.json", help="where to write the figures")
  args = parser.parse_args(argv)
  result = run(args.llm, args.batch, args.repeats, args.max_tokens, args.layer)
  print(f"{args.llm}, hidden_states[{args.layer}], batch {args.batch}, "
        f"{result['valid_tokens']} valid tokens (prefix {result['prefix_len']} + rows of "
        f"{result['row_len']}), float32, max |ours - torch| {result['max_abs_diff']:.3g}")
  print(f"{'implementation':<28}{'seconds':>10}{'tokens/s':>12}{'vs torch':>10}")
  rows = (("transformers (PyTorch)", "torch"), ("li-dit, full rows", "ours_full"),
          ("li-dit, prefix reuse", "ours_prefix_reuse"))
  for label, key in rows:
    speedup = result["speedup_vs_torch"].get(key, 1.0)
    print(f"{label:<28}{result['seconds'][key]:>10.4f}{result['tokens_per_sec'][key]:>12.0f}"
          f"{speedup:>9.2f}x")
  print(f"prefix reuse saves {100 * result['prefix_reuse_saving']:.0f}% of the encoding time "
        f"(the prefix itself, encoded once: {result['seconds']['prefix_once']:.4f} s)")
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
