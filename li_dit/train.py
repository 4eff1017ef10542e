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
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from li_dit import config_lib
from li_dit import flops as flops_lib
from li_dit import generate
from li_dit import metrics as metrics_lib
from li_dit import step as step_lib
from li_dit.data import pipeline
from li_dit.io import checkpoints
from li_dit.parallel import sharding
from li_dit.text import conditioning

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created, or resumed).")
flags.mark_flags_as_required(["config", "workdir"])


class _Preemption:
  """Turns SIGTERM into a flag the loop checks after each step (never mid-step)."""

  def __init__(self):
    self.requested = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: checkpointing after the current step, then exiting", signum)
    self.requested = True


def train(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Runs (or resumes) training to config.total_steps. Returns the final state."""
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  os.makedirs(workdir, exist_ok=True)
  if is_main:
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config_lib.to_json(config))

  mesh = sharding.make_mesh(config.mesh)
  step_lib.check_batch_divides(config, mesh)  # Before any LLM is loaded or anything compiled.
  # The frozen text side: LLMs, their instruction prefixes, and (cached mode) the feature table.
  encoders = generate.build_encoders(config.text)
  conditioner = conditioning.TextConditioner(encoders, config.text.encode)
  if config.text.encode == conditioning.CACHED:
    conditioner.build_table(pipeline.source_captions(config.input),
                            cache_dir=os.path.join(workdir, "text_cache"))
  plan = step_lib.plan_step(config, mesh, conditioner)
  frozen = jax.device_put(conditioner.frozen(), plan.frozen_shardings)
  model, rules = plan.model, plan.rules
  size, channels = config.input.image_size, config.model.channels

  dataset = pipeline.make_train_dataset(config.input, conditioner.data_transform(),
                                        jax.process_index(), jax.process_count())
  data_iter = iter(dataset)
  state = jax.jit(plan.init_state, out_shardings=plan.state_shardings)(
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
    state = step_lib.TrainState(step=jnp.asarray(start, jnp.int32), **restored)
    logging.info("resumed from step %d in %s", start, workdir)

  generator = generate.Generator(model, conditioner, (size, size, channels),
                                 generate.time_shift(config))
  sample_text = generator.encode(list(config.sample.prompts)) if config.sample.prompts else None
  writer = metrics_lib.MetricWriter(workdir, enabled=is_main)
  step_flops = step_lib.train_step_flops(config, conditioner)
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
        state, metrics = plan.train_step(state, frozen, batch)
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
