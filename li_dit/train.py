r"""Trains LI-DiT with rectified flow.

  python -m li_dit.train --config configs/demo.py --workdir workdirs/demo [--config.a.b=v ...]

A run lives in its workdir: checkpoints/ (orbax: params, EMA, optimizer and data-iterator state,
config), metrics.jsonl (one JSON object per logged step), tensorboard/, samples/step_<N>.png and
config.json. Starting the same command again resumes from the latest checkpoint: the same step
count and the same data order as an uninterrupted run. SIGTERM (e.g. a preemption notice) saves
a checkpoint at the current step before exiting.
"""
from __future__ import annotations

import os
import signal
import sys
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from li_dit import config_lib
from li_dit import flops as flops_lib
from li_dit import generate
from li_dit import metrics as metrics_lib
from li_dit import optim
from li_dit.data import pipeline
from li_dit.diffusion import flow
from li_dit.io import checkpoints
from li_dit.parallel import sharding
from li_dit.text import conditioning

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created, or resumed).")
flags.mark_flags_as_required(["config", "workdir"])


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any


def make_train_step(model, conditioner: conditioning.TextConditioner, tx, schedule,
                    config: ml_collections.ConfigDict, shift: float):
  """The one train step: (state, frozen text arrays, batch) -> (state, metrics)."""
  base_rng = jax.random.key(config.seed)

  def train_step(state: TrainState, frozen: Any, batch: dict[str, jax.Array]):
    # The step's randomness is a function of the step alone, so a resumed run draws the same.
    rng_t, rng_noise = jax.random.split(jax.random.fold_in(base_rng, state.step))
    x0 = batch["image"].astype(jnp.float32) / 127.5 - 1.0
    text = conditioner.features(frozen, batch)
    t = flow.sample_time(rng_t, x0.shape[0], config.flow.t_mean, config.flow.t_std, shift)
    noise = jax.random.normal(rng_noise, x0.shape, jnp.float32)
    x_t = flow.interpolate(x0, noise, t)

    def loss_fn(params):
      v = model.apply({"params": params}, x_t, t, text)
      return jnp.mean(flow.flow_loss(v, x0, noise))

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = jax.tree_util.tree_map(jnp.add, state.params, updates)
    new_state = TrainState(
        step=state.step + 1, params=params,
        ema_params=optim.ema_update(state.ema_params, params, state.step, config.optim.ema_decay),
        opt_state=opt_state)
    metrics = {"loss": loss, "grad_norm": _global_norm(grads), "lr": schedule(state.step),
               "truncated_captions": jnp.sum(batch["truncated"])}
    return new_state, metrics

  return train_step


def _global_norm(tree: Any) -> jax.Array:
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32)))
                      for x in jax.tree_util.tree_leaves(tree)))


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (never mid-step)."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: checkpointing after the current step, then exiting", signum)
    self.requested = True


def train(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Runs (or resumes) training to config.total_steps. Returns the final state."""
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))

  mesh = sharding.make_mesh(config.mesh)
  rules = sharding.rules_from_config(config.sharding_rules)
  dp = sharding.data_parallel_size(mesh, rules)
  if config.input.batch_size % dp:
    raise config_lib.ConfigError(
        f"config.input.batch_size={config.input.batch_size} does not divide over the "
        f"{dp} data-parallel devices of mesh {dict(mesh.shape)}")

  # The frozen text side: LLMs, their instruction prefixes, and (cached mode) the feature table.
  encoders = generate.build_encoders(config.text)
  conditioner = conditioning.TextConditioner(encoders, config.text.encode)
  if config.text.encode == conditioning.CACHED:
    conditioner.build_table(pipeline.source_captions(config.input),
                            cache_dir=os.path.join(workdir, "text_cache"))
  frozen = conditioner.frozen()
  frozen_shardings = sharding.divisible_shardings(conditioner.frozen_logical_specs(), frozen,
                                                  mesh, rules)
  frozen = jax.device_put(frozen, frozen_shardings)

  dataset = pipeline.make_train_dataset(config.input, conditioner.data_transform(),
                                        jax.process_index(), jax.process_count())
  data_iter = iter(dataset)

  model = generate.build_model(config, len(encoders))
  shift = generate.time_shift(config)
  tx, schedule = optim.make_optimizer(config.optim, config.total_steps)
  size, channels = config.input.image_size, config.model.channels
  example_text = conditioner.features(conditioner.frozen(), _example_text_batch(conditioner))

  def init_state(rng):
    x = jnp.zeros((1, size, size, channels), jnp.float32)
    params = model.init(rng, x, jnp.zeros((1,)), example_text)["params"]
    # The optimizer state is built from the boxed params, so its moments carry the params'
    # logical axes and are sharded like them (not replicated).
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, ema_params=params,
                      opt_state=tx.init(params))

  # Shapes and shardings without allocating anything, then the real init, sharded at birth.
  abstract = jax.eval_shape(init_state, jax.random.key(config.seed))
  logical_specs = nn.get_partition_spec(abstract)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state_shardings = sharding.logical_to_shardings(logical_specs, mesh, rules)
  state = jax.jit(lambda rng: nn.unbox(init_state(rng)), out_shardings=state_shardings)(
      jax.random.key(config.seed))

  if is_main:
    parts = []
    for what, tree in (("train state", state), ("frozen text side", frozen)):
      total, per_device = sharding.memory_footprint(tree)
      parts.append(f"{what} {total / 2**20:.1f} MiB ({per_device / 2**20:.1f} MiB on device 0)")
    print(f"mesh {dict(mesh.shape)}: " + ", ".join(parts), flush=True)

  ckpt = checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints)
  start = ckpt.latest_step() or 0
  if start:
    restored = ckpt.restore(start, {
        "params": checkpoints.abstract_like(state.params),
        "ema_params": checkpoints.abstract_like(state.ema_params),
        "opt_state": checkpoints.abstract_like(state.opt_state)}, data_iterator=data_iter)
    state = TrainState(step=jnp.asarray(start, jnp.int32), **restored)
    logging.info("resumed from step %d in %s", start, workdir)

  step_fn = make_train_step(model, conditioner, tx, schedule, config, shift)
  batch_shardings = None  # Inferred from the global arrays host_to_global makes.
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    train_step = jax.jit(step_fn, in_shardings=(state_shardings, frozen_shardings, batch_shardings),
                         out_shardings=(state_shardings, None), donate_argnums=(0,))

  generator = generate.Generator(model, conditioner, (size, size, channels), shift)
  sample_text = generator.encode(list(config.sample.prompts)) if config.sample.prompts else None
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  texts = [flops_lib.TextShape(e.layout.prefix_len, e.layout.length, e.config, e.spec.layer)
           for e in encoders.values()]
  step_flops = flops_lib.train_step_flops(model.config, size, texts, config.input.batch_size,
                                          online=config.text.encode == conditioning.ONLINE)
  peak, peak_source = flops_lib.peak_flops()
  if is_main:
    print(f"model FLOPs per step: {step_flops['total'] / 1e12:.4g} TFLOP (DiT "
          f"{step_flops['dit'] / 1e12:.4g}, refiners {step_flops['refiners'] / 1e12:.4g}, "
          f"LLMs {step_flops['llms'] / 1e12:.4g}); peak {peak / 1e12:.4g} TFLOP/s "
          f"({peak_source})", flush=True)
  progress = metrics_lib.Progress(config.total_steps, start, config.input.batch_size,
                                  step_flops["total"], peak, mesh.size)
  preemption = _Preemption()

  def write_samples(step: int):
    if sample_text is None or not is_main:
      return
    images = generator.sample(state.ema_params, sample_text, config.sample.seed,
                              config.sample.steps, config.sample.cfg, config.sample.sampler)
    generate.save_grid(images, os.path.join(workdir, "samples", f"step_{step}.png"), scale=4)

  pending = []
  for step in range(start + 1, config.total_steps + 1):
    with jax.profiler.StepTraceAnnotation("train", step_num=step):
      batch = sharding.host_to_global(next(data_iter), mesh, rules)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        state, metrics = train_step(state, frozen, batch)
    pending.append(metrics)
    last = step == config.total_steps
    if step % config.log_every == 0 or last:
      summary = metrics_lib.average(pending)
      summary.update(progress.update(step))
      pending = []
      writer.write(step, summary)
      if is_main:
        print(progress.line(step, summary), flush=True)
    if step % config.checkpoint_every == 0 or last or preemption.requested:
      ckpt.save(step, {"params": state.params, "ema_params": state.ema_params,
                       "opt_state": state.opt_state}, data_iter, config, force=True)
    if config.sample_every and (step % config.sample_every == 0 or last):
      write_samples(step)
    if preemption.requested:
      ckpt.wait()
      writer.close()
      logging.warning("stopped at step %d after SIGTERM; checkpoint saved", step)
      sys.exit(143)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return state


def _example_text_batch(conditioner: conditioning.TextConditioner) -> dict[str, np.ndarray]:
  """A one-example text batch of the right structure (for shapes at init)."""
  if conditioner.mode == conditioning.ONLINE:
    return conditioner.tokenize([""])
  return {"caption_id": np.zeros((1,), np.int32)}


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax and grain log every save at INFO.
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except config_lib.ConfigError as e:
    sys.exit(f"li_dit.train: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
