"""Gradient accumulation (li_dit.training.step.accumulate): k micro-batches give the whole batch's
mean loss and gradient. The smoke config's train step with it, sharded, is in
tests/test_mesh_layouts.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from li_dit.training import step as step_lib


def _loss(params, x, pair):
  """A row-wise loss of a batched input and a batched pair of inputs (as the step's text rows)."""
  a, b = pair
  h = jnp.tanh(x @ params["w"] + params["b"])
  return jnp.mean(jnp.sum((h - a) ** 2, axis=-1) * b)


@pytest.mark.parametrize("k", [2, 4, 8])
def test_micro_batches_give_the_whole_batch_loss_and_gradient(k):
  rng = np.random.default_rng(0)
  params = {"w": jnp.asarray(rng.standard_normal((5, 3)), jnp.float32),
            "b": jnp.asarray(rng.standard_normal(3), jnp.float32)}
  # Rows of very different losses: a wrong grouping or weighting would show.
  x = jnp.asarray(rng.standard_normal((8, 5)) * np.arange(1, 9)[:, None], jnp.float32)
  pair = (jnp.asarray(rng.standard_normal((8, 3)), jnp.float32),
          jnp.asarray(np.arange(8) % 3, jnp.float32))
  value_and_grad = jax.value_and_grad(_loss)
  want_loss, want_grads = value_and_grad(params, x, pair)
  got_loss, got_grads = jax.jit(step_lib.accumulate, static_argnums=(0, 3))(
      value_and_grad, params, (x, pair), k)
  np.testing.assert_allclose(got_loss, want_loss, rtol=1e-6)
  for name in params:
    np.testing.assert_allclose(got_grads[name], want_grads[name], rtol=1e-5, atol=1e-7)
