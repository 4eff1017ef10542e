r"""Peak host memory of loading a sharded Hugging Face LLM checkpoint with `li_dit.io.hf`.

  python tools/load_memory.py [--dir CKPT] [--hidden 1024 --layers 8 --vocab 32000] \
      [--dtype float32|bfloat16] [--json load_memory.json]

Without --dir, a LLaMA-architecture checkpoint of random weights (a few hundred MB at the
defaults) is written to a temporary directory first, split into 100 MB safetensors files with an
index, as `save_pretrained` would. The load then runs in a fresh process, which reports its
resident memory before loading and its peak (ru_maxrss) after, so nothing of the writing phase
counts. The loader's promise: peak - before <= loaded model + 1.5 x the largest tensor.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SHARD_BYTES = 100 << 20


def write_checkpoint(directory: str, hidden: int, layers: int, vocab: int) -> None:
  """A random LLaMA checkpoint: config.json + float32 safetensors shards + index."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  heads = max(1, hidden // 64)
  config = transformers.LlamaConfig(
      vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4))
  config.save_pretrained(directory)
  head_dim = hidden // heads
  kv = config.num_key_value_heads * head_dim
  shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({
        p + "input_layernorm.weight": (hidden,), p + "post_attention_layernorm.weight": (hidden,),
        p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
        p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
        p + "mlp.gate_proj.weight": (config.intermediate_size, hidden),
        p + "mlp.up_proj.weight": (config.intermediate_size, hidden),
        p + "mlp.down_proj.weight": (hidden, config.intermediate_size)})
  rng = np.random.default_rng(0)
  weight_map, shard, shard_bytes, shards = {}, {}, 0, []

  def flush():
    nonlocal shard, shard_bytes
    if shard:
      shards.append(shard)
      shard, shard_bytes = {}, 0

  for name, shape in shapes.items():
    tensor = rng.standard_normal(shape, dtype=np.float32) * 0.02
    if shard_bytes + tensor.nbytes > _SHARD_BYTES:
      flush()
    shard[name] = tensor
    shard_bytes += tensor.nbytes
  flush()
  total = 0
  for i, tensors in enumerate(shards):
    filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    safetensors.numpy.save_file(tensors, os.path.join(directory, filename),
                                metadata={"format": "pt"})
    for name, tensor in tensors.items():
      weight_map[name] = filename
      total += tensor.nbytes
  with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)


_MEASURE = r"""
import json, resource, sys
import jax, jax.numpy as jnp, numpy as np
from li_dit.io import hf
def rss():
  with open("/proc/self/status") as f:
    return next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
jnp.zeros(1).block_until_ready()  # Start the runtime before measuring.
hf.read_hf_config(sys.argv[1])  # transformers imports its config modules lazily: not tensors.
before = rss()
config, params = hf.load_hf_llm(sys.argv[1], layer=-1, dtype=getattr(jnp, sys.argv[2]))
leaves = jax.block_until_ready(jax.tree.leaves(params))
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps(dict(before=before, peak=peak, after=rss(),
                      model_bytes=sum(x.nbytes for x in leaves),
                      largest_tensor_bytes=max(x.nbytes for x in leaves))))
"""


def measure(directory: str, dtype: str) -> dict:
  """Loads `directory` in a fresh process; returns its memory figures (bytes) and the verdict."""
  proc = subprocess.run([sys.executable, "-c", _MEASURE, directory, dtype], cwd=REPO,
                        capture_output=True, text=True, check=False)
  if proc.returncode:
    raise RuntimeError(f"loading {directory} failed:\n{proc.stderr[-3000:]}")
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  files = [f for f in os.listdir(directory) if f.endswith(".safetensors")]
  result.update(
      checkpoint_bytes=sum(os.path.getsize(os.path.join(directory, f)) for f in files),
      num_files=len(files), dtype=dtype, increase=result["peak"] - result["before"],
      bound=result["model_bytes"] + 1.5 * result["largest_tensor_bytes"])
  result["within_bound"] = result["increase"] <= result["bound"]
  return result


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dir", help="an existing HF checkpoint directory (default: write one)")
  parser.add_argument("--hidden", type=int, default=1024)
  parser.add_argument("--layers", type=int, default=8)
  parser.add_argument("--vocab", type=int, default=32000)
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--json", default="load_memory.json")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    directory = args.dir or tmp
    if not args.dir:
      write_checkpoint(directory, args.hidden, args.layers, args.vocab)
    result = measure(directory, args.dtype)
  mb = lambda n: f"{n / 2**20:8.1f} MB"
  print(f"checkpoint: {mb(result['checkpoint_bytes'])} in {result['num_files']} files, "
        f"loaded as {args.dtype}")
  for label, key in (("resident before loading", "before"), ("peak while loading", "peak"),
                     ("increase", "increase"), ("loaded model", "model_bytes"),
                     ("largest tensor", "largest_tensor_bytes"),
                     ("bound: model + 1.5 x largest", "bound")):
    print(f"  {label:<30}{mb(result[key])}")
  print(f"  increase / bound = {result['increase'] / result['bound']:.3f} -> "
        f"{'within' if result['within_bound'] else 'OVER'} the bound")
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  return result


if __name__ == "__main__":
  main()
