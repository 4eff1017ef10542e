"""A frozen LLM loaded onto a mesh goes from its file straight into its shards, and encodes
exactly as the single-device one does (the real SmolLM2-135M-Instruct GGUF, 4 CPU devices)."""
import smoke_runs


def _check() -> None:
  import flax.linen as nn
  import jax
  import numpy as np
  from li_dit.parallel import sharding
  from li_dit.text import encoders

  spec = dict(name="smollm2", path="smollm2-135m-instruct", max_tokens=8, dtype="float32")
  mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2))
  sharded = encoders.PromptEncoder(spec, mesh=mesh, rules=sharding.DEFAULT_RULES)
  single = encoders.PromptEncoder(spec)

  leaves = jax.tree_util.tree_leaves(sharded.params)
  total, per_device = sharding.memory_footprint(sharded.params)
  # Every weight is split 4 ways except what the mesh cannot divide (norm scales, the
  # 49152-token vocabulary over tensor); device 0 holds about a quarter.
  assert per_device < 0.3 * total, (per_device, total)
  assert all(isinstance(x.sharding, jax.sharding.NamedSharding) for x in leaves)
  prompts = ["a red circle to the left of a blue square", "two cats"]
  tok = single.tokenize(prompts)
  with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
    got = np.asarray(jax.jit(sharded.encode_full)(sharded.params, tok.tokens, tok.mask))
  want = np.asarray(jax.jit(single.encode_full)(single.params, tok.tokens, tok.mask))
  err = np.max(np.abs(got - want)) / np.max(np.abs(want))
  assert err < 1e-5, err
  print(f"SHARDED LLM OK device 0 holds {per_device / total:.3f} of {total / 2**20:.0f} MiB, "
        f"max rel diff {err:.1e}")


def test_llm_loads_into_shards_and_encodes_like_one_device():
  stdout = smoke_runs.call_with_devices("test_sharded_llm", "_check", 4)
  assert "SHARDED LLM OK" in stdout, stdout
  print(stdout)
