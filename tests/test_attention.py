"""The TPU splash-attention kernel gives XLA attention's outputs and gradients.

On CPU the kernel runs in Pallas interpret mode: the same kernel code (tiling, online softmax,
segment-id masking, its own backward kernels), executed by XLA:CPU.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from li_dit.models import attention, lidit
import smoke_runs


def _inputs(batch, q_len, kv_len, heads, head_dim, valid_fraction, seed=0):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, n, heads, head_dim)), jnp.float32)
             for n in (q_len, kv_len, kv_len))
  mask = rng.random((batch, kv_len)) < valid_fraction
  mask[:, 0] = True  # Every row keeps at least one key.
  return q, k, v, jnp.asarray(mask)


@pytest.mark.parametrize("q_len,kv_len,heads,head_dim,valid", [
    (64, 64, 2, 32, 1.0),     # DiT self-attention on an 8x8 grid, no padding
    (64, 40, 2, 32, 0.6),     # cross-attention to padded text
    (200, 130, 3, 24, 0.7),   # lengths past one 128 tile, odd head count and head dim
])
def test_splash_equals_xla_values_and_gradients(q_len, kv_len, heads, head_dim, valid):
  q, k, v, mask = _inputs(2, q_len, kv_len, heads, head_dim, valid)

  def loss(implementation):
    # A non-linear read-out, so every output element gets its own cotangent.
    return jax.jit(jax.value_and_grad(
        lambda q, k, v: jnp.sum(jnp.sin(attention.dot_product_attention(
            q, k, v, mask, implementation))), argnums=(0, 1, 2)))

  (want, want_grads), (got, got_grads) = loss("xla")(q, k, v), loss("splash")(q, k, v)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  for g, w in zip(got_grads, want_grads):
    np.testing.assert_allclose(g, w, atol=2e-5, rtol=1e-4)

  out_xla = attention.dot_product_attention(q, k, v, mask, "xla")
  out_splash = jax.jit(attention.dot_product_attention, static_argnums=4)(q, k, v, mask, "splash")
  assert float(jnp.max(jnp.abs(out_splash - out_xla))) <= 1e-5


def test_unknown_implementation_is_named():
  q, k, v, mask = _inputs(1, 8, 8, 1, 8, 1.0)
  with pytest.raises(ValueError, match="'flash'"):
    attention.dot_product_attention(q, k, v, mask, "flash")


def _sharded_check() -> None:
  """LI-DiT (two LLM branches: token refiners, collaborative refiner, DiT) on a data=2 x
  tensor=2 mesh of 4 CPU devices: splash inside shard_map vs XLA attention, loss and grads."""
  import flax.linen as nn
  from li_dit.parallel import sharding

  mesh = sharding.make_mesh(dict(data=2, fsdp=1, tensor=2))
  rules = sharding.DEFAULT_RULES
  rng = jax.random.key(0)
  batch, size = 4, 16
  keys = jax.random.split(rng, 8)
  x = jax.random.normal(keys[0], (batch, size, size, 3))
  t = jax.random.uniform(keys[1], (batch,))
  text = []
  for i, (prefix_len, length, width) in enumerate(((5, 12, 24), (3, 9, 16))):
    mask = jnp.arange(length)[None] < jnp.asarray([length, 4, 7, 1])[:, None]
    text.append(lidit.TextFeatures(jax.random.normal(keys[2 + i], (prefix_len, width)),
                                   jax.random.normal(keys[4 + i], (batch, length, width)), mask))
  results = {}
  for implementation in attention.IMPLEMENTATIONS:
    model = lidit.LIDiT(lidit.ModelConfig(
        patch_size=4, width=32, depth=2, num_heads=4, refiner_depth=1,
        attention=implementation), num_llms=2)
    params = nn.unbox(model.init(rng, x, t, text)["params"])
    # Non-zero adaLN gates, so every attention output reaches the loss.
    params = jax.tree_util.tree_map(
        lambda p, k: p + 0.1 * jax.random.normal(k, p.shape),
        params, jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(params), list(
            jax.random.split(keys[6], len(jax.tree_util.tree_leaves(params))))))

    def loss(params):
      return jnp.mean(jnp.square(model.apply({"params": params}, x, t, text)))

    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      # The kernel runs per device inside shard_map (XLA cannot partition the custom call).
      assert ("shard_map" in str(jax.make_jaxpr(loss)(params))) == (implementation == "splash")
      results[implementation] = jax.jit(jax.value_and_grad(loss))(params)
  (want, want_grads), (got, got_grads) = results["xla"], results["splash"]
  assert abs(float(got) - float(want)) <= 1e-5 * abs(float(want)), (got, want)
  flat_want = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(want_grads)])
  flat_got = np.concatenate([np.ravel(g) for g in jax.tree_util.tree_leaves(got_grads)])
  rel = np.linalg.norm(flat_got - flat_want) / np.linalg.norm(flat_want)
  assert rel <= 1e-5, rel
  print(f"SHARDED OK loss {float(want):.6f} grad rel {rel:.2e}")


@pytest.mark.slow  # About 3 minutes: the interpreted kernel in every attention of the model.
def test_splash_inside_shard_map_on_a_4_device_mesh_equals_xla():
  assert "SHARDED OK" in smoke_runs.call_with_devices("test_attention", "_sharded_check", 4)


def test_null_prompt_rows_attend_alike_in_splash_and_xla():
  """Cross-attention to the empty prompt's rows under the "none" template (no suffix): with the
  one valid token every row keeps, splash gives XLA's outputs; with no valid key at all (what
  such rows were) the two disagree, which is why rows never have none."""
  from li_dit.io import gguf as gguf_io  # pylint: disable=g-import-not-at-top
  from li_dit.io import packaged  # pylint: disable=g-import-not-at-top
  from li_dit.text import prompts  # pylint: disable=g-import-not-at-top
  tokenizer = gguf_io.load_gguf_tokenizer(packaged.resolve_llm_path("smollm2-135m-instruct"))
  layout = prompts.build_layout(tokenizer, "none", max_prompt_tokens=16)
  mask = jnp.asarray(prompts.tokenize_prompts(tokenizer, layout, ["", ""]).mask)
  q, k, v, _ = _inputs(2, 64, layout.length, 2, 32, 1.0)
  run = lambda m, impl: np.asarray(jax.jit(
      lambda q, k, v: attention.dot_product_attention(q, k, v, m, impl))(q, k, v))
  assert int(mask.sum()) == 2
  np.testing.assert_allclose(run(mask, "splash"), run(mask, "xla"), rtol=1e-5, atol=1e-6)
  none = jnp.zeros_like(mask)
  assert np.abs(run(none, "splash") - run(none, "xla")).max() > 1e-3
