"""Rectified flow, timestep sampling, the ODE samplers with CFG, and a tiny overfit."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from li_dit.diffusion import flow
from li_dit.diffusion import samplers
from li_dit.models import lidit


def test_interpolation_endpoints_and_velocity():
  x0 = jax.random.normal(jax.random.key(0), (3, 4, 4, 2))
  noise = jax.random.normal(jax.random.key(1), x0.shape)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.zeros(3)), x0)
  np.testing.assert_allclose(flow.interpolate(x0, noise, jnp.ones(3)), noise)
  t = jnp.array([0.1, 0.5, 0.9])
  dt = 1e-3
  numeric = (flow.interpolate(x0, noise, t + dt) - flow.interpolate(x0, noise, t)) / dt
  np.testing.assert_allclose(numeric, flow.velocity_target(x0, noise), atol=1e-2)
  assert flow.flow_loss(flow.velocity_target(x0, noise), x0, noise).shape == (3,)
  np.testing.assert_allclose(flow.flow_loss(flow.velocity_target(x0, noise), x0, noise), 0.0)


def test_logit_normal_time_and_resolution_shift():
  t = flow.sample_time(jax.random.key(0), 100_000, mean=0.5, std=0.8)
  assert float(t.min()) > 0.0 and float(t.max()) < 1.0
  logits = np.log(t / (1 - t))
  assert abs(logits.mean() - 0.5) < 0.01 and abs(logits.std() - 0.8) < 0.01
  shifted = flow.sample_time(jax.random.key(0), 100_000, mean=0.5, std=0.8, shift=3.0)
  assert float(shifted.mean()) > float(t.mean())  # Shift moves t towards the noise end.
  grid = jnp.linspace(0, 1, 11)
  np.testing.assert_allclose(flow.shift_time(grid, 1.0), grid)
  assert bool(jnp.all(jnp.diff(flow.shift_time(grid, 3.0)) > 0))
  np.testing.assert_allclose(flow.shift_time(jnp.array([0.0, 1.0]), 3.0), [0.0, 1.0])
  assert flow.resolution_shift(64 * 64, 32 * 32) == pytest.approx(2.0)
  assert flow.resolution_shift(32 * 32, 32 * 32, base_shift=3.0) == pytest.approx(3.0)


def _point_mass_denoiser(target_cond, target_uncond):
  """The exact velocity field of a single data point: v(x, t) = (x - x0) / t.

  The first half of the batch flows to target_cond, the second half to target_uncond.
  """
  def denoise(x, t):
    half = x.shape[0] // 2
    x0 = jnp.concatenate([jnp.broadcast_to(target_cond, x[:half].shape),
                          jnp.broadcast_to(target_uncond, x[half:].shape)])
    return (x - x0) / t.reshape(-1, 1, 1, 1)
  return denoise


@pytest.mark.parametrize("sampler", samplers.SAMPLERS)
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_samplers_reach_the_data_point(sampler, shift):
  target = jnp.full((1, 4, 4, 3), 0.25)
  noise = jax.random.normal(jax.random.key(0), (2, 4, 4, 3))
  out = samplers.sample(_point_mass_denoiser(target, target), noise, steps=5, cfg_scale=1.0,
                        sampler=sampler, shift=shift)
  np.testing.assert_allclose(out, jnp.broadcast_to(target, out.shape), atol=1e-5)


def test_classifier_free_guidance_extrapolates():
  cond, uncond = jnp.full((1, 2, 2, 1), 1.0), jnp.full((1, 2, 2, 1), -1.0)
  noise = jax.random.normal(jax.random.key(0), (1, 2, 2, 1))
  denoise = _point_mass_denoiser(cond, uncond)
  at_1 = samplers.sample(denoise, noise, steps=8, cfg_scale=1.0, sampler="euler")
  np.testing.assert_allclose(at_1, cond, atol=1e-5)  # Scale 1: the conditional model.
  at_0 = samplers.sample(denoise, noise, steps=8, cfg_scale=0.0, sampler="euler")
  np.testing.assert_allclose(at_0, uncond, atol=1e-5)
  at_3 = samplers.sample(denoise, noise, steps=8, cfg_scale=3.0, sampler="euler")
  np.testing.assert_allclose(at_3, uncond + 3.0 * (cond - uncond), atol=1e-4)
  with pytest.raises(ValueError, match="unknown sampler"):
    samplers.sample(denoise, noise, 2, 1.0, sampler="ddim")


def test_heun_is_second_order():
  """On a curved field Heun's error shrinks ~4x per halving of the step, Euler's ~2x."""
  def denoise(x, t):  # dx/dt = x * cos(t): exact x(0) = x(1) * exp(-sin(1)).
    return x * jnp.cos(t).reshape(-1, 1, 1, 1)
  x1 = jnp.ones((1, 1, 1, 1))
  exact = float(jnp.exp(-jnp.sin(1.0)))
  err = {s: [abs(float(samplers.sample(denoise, x1, n, 1.0, s)[0, 0, 0, 0]) - exact)
             for n in (8, 16)] for s in samplers.SAMPLERS}
  assert 1.6 < err["euler"][0] / err["euler"][1] < 2.4
  assert err["heun"][0] / err["heun"][1] > 3.0
  assert err["heun"][1] < err["euler"][1] / 4


@pytest.mark.slow
def test_tiny_overfit_drives_the_flow_loss_down():
  cfg = lidit.ModelConfig(patch_size=2, channels=3, width=32, depth=2, num_heads=2,
                          scan_layers=False)
  model = lidit.LIDiT(cfg, num_llms=1)
  k = jax.random.split(jax.random.key(0), 4)
  x0 = jnp.tanh(jax.random.normal(k[0], (4, 8, 8, 3)))
  text = [lidit.TextFeatures(jax.random.normal(k[1], (3, 16)),
                             jax.random.normal(k[2], (4, 5, 16)), jnp.ones((4, 5), bool))]
  params = model.init(k[3], x0, jnp.zeros(4), text)["params"]
  params = jax.tree_util.tree_map(lambda p: p.value if hasattr(p, "value") else p, params,
                                  is_leaf=lambda p: hasattr(p, "value"))
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, rng):
    r_t, r_n = jax.random.split(rng)
    t = flow.sample_time(r_t, 4)
    noise = jax.random.normal(r_n, x0.shape)

    def loss_fn(p):
      v = model.apply({"params": p}, flow.interpolate(x0, noise, t), t, text)
      return jnp.mean(flow.flow_loss(v, x0, noise))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state, loss

  losses = []
  for i in range(300):
    params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    losses.append(float(loss))
  first, last = np.mean(losses[:20]), np.mean(losses[-20:])
  assert last < 0.5 * first, (first, last)
