"""The training loop, the body of `python -m li_dit.train`: the run's workdir, the frozen text
side and image space, the jitted step on its mesh (li_dit.training.plan), the data, metrics,
sample grids and checkpoints, resumed from the latest checkpoint and stopped by SIGTERM after a
step (`Preemption`).
"""
from __future__ import annotations

import collections
import contextlib
import json
import os
import signal
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from li_dit import config_lib
from li_dit.data import latent_datasets
from li_dit.data import pipeline
from li_dit.data import sources
from li_dit.diffusion import image_space
from li_dit.generation import generator as generator_lib
from li_dit.io import checkpoints
from li_dit.parallel import sharding
from li_dit.text import conditioning
from li_dit.text import encoders as encoders_lib
from li_dit.training import flops as flops_lib
from li_dit.training import goodput as goodput_lib
from li_dit.training import metrics as metrics_lib
from li_dit.training import nonfinite as nonfinite_lib
from li_dit.training import plan as plan_lib
from li_dit.training import run_card
from li_dit.training import step as step_lib


class Preemption:
  """SIGTERM (e.g. a preemption notice) -> stop after a step, never mid-step.

  One process: a handler sets a flag the loop reads after each step. Several: JAX's preemption
  sync manager (started by jax.distributed.initialize) catches SIGTERM on any of them and has all
  agree on the step to stop after, so they save that checkpoint together.
  """

  def __init__(self):
    self._requested = False
    if jax.process_count() == 1:
      signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del frame
    logging.warning("signal %d: checkpointing after the current step, then exiting", signum)
    self._requested = True

  def stop_after(self, step: int) -> bool:
    """Call once after each step, on every process."""
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested


def train(config: ml_collections.ConfigDict, workdir: str) -> step_lib.TrainState:
  """Runs (or resumes) training to config.total_steps. Returns the final state."""
  config_lib.validate(config)
  is_main = jax.process_index() == 0
  # Local or on an object store (gs://): every file of the run goes through epath.
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  if is_main:
    (epath.Path(workdir) / "config.json").write_text(config_lib.to_json(config))

  mesh = plan_lib.make_mesh(config)
  # Before any LLM is loaded or anything compiled.
  rules = plan_lib.check_batch_divides(config, mesh)
  # A dataset of latents must have been encoded by the config's VAE, at its buckets.
  data_latents = latent_datasets.dataset_metadata(config.input)
  if data_latents is not None:
    latent_datasets.check_dataset(config, data_latents)
  # Pixels, or a frozen VAE (checked against the config before its weights are read).
  space = image_space.from_config(config, mesh, rules)
  # The frozen text side: LLMs (loaded straight into their shards), their instruction prefixes,
  # and (cached mode) the feature table.
  encoders = encoders_lib.build_encoders(config.text, mesh, rules)
  # What the run will do, as tools/run_card.py says it before anything is loaded.
  card = run_card.make(config, encoders, space, mesh.shape)
  if is_main:
    (epath.Path(workdir) / "run_card.json").write_text(json.dumps(card, indent=2))
    print(run_card.describe(card), flush=True)
  conditioner = conditioning.TextConditioner(encoders, config.text.encode)
  if config.text.encode == conditioning.CACHED:
    # Process 0 alone reads and writes the cache file (no two processes write it at once); the
    # others compute the same table.
    conditioner.build_table(sources.source_captions(config.input),
                            cache_dir=os.path.join(workdir, "text_cache") if is_main else None)
  plan = plan_lib.plan_step(config, mesh, conditioner, space)
  frozen = jax.device_put(plan_lib.frozen_arrays(conditioner, space), plan.frozen_shardings)
  model = plan.model

  # Everything opened from here on (checkpoint manager, data iterator and its worker processes,
  # metric files) is closed on every way out: the end, SIGTERM's exit, an exception.
  with contextlib.ExitStack() as opened:
    ckpt = opened.enter_context(checkpoints.Checkpointer(workdir, keep=config.keep_checkpoints,
                                                         keep_every=config.keep_every))
    # The newest checkpoint that restores whole, read straight into the state's shardings (a
    # damaged one is moved aside and the one before it used); nothing allocated twice.
    start, restored = 0, None
    if ckpt.latest_step() is not None:
      abstract = jax.tree_util.tree_map(
          lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
          jax.eval_shape(plan.init_state, jax.random.key(config.seed)), plan.state_shardings)
      start, restored = ckpt.restore_whole({"params": abstract.params,
                                            "ema_params": abstract.ema_params,
                                            "opt_state": abstract.opt_state})
    # grain's iterator state restores only under the number of processes that saved it.
    # Otherwise the data restarts at the global batch step `start + 1` reads: the pipeline is a
    # function of the batch index, so the batches are the same as the saved run would have read.
    saved_by = ckpt.data_process_count(start) if start else None
    restore_iterator = saved_by == jax.process_count()
    dataset = pipeline.make_train_dataset(config.input, conditioner.data_transform(),
                                          jax.process_index(), jax.process_count(),
                                          start_batch=0 if restore_iterator else start)
    data_iter = opened.enter_context(iter(dataset))
    if restored is not None:
      state = step_lib.TrainState(step=jnp.asarray(start, jnp.int32), **restored)
      if restore_iterator:
        ckpt.restore_data(start, data_iter)
    else:
      state = jax.jit(plan.init_state, out_shardings=plan.state_shardings)(
          jax.random.key(config.seed))

    if is_main:
      parts = []
      trees = [("train state", state), ("frozen text side", frozen["text"])]
      if space.vae is not None:
        trees.append(("frozen VAE", frozen["vae"]))
      for what, tree in trees:
        total, per_device = sharding.memory_footprint(tree)
        parts.append(f"{what} {total / 2**20:.1f} MiB ({per_device / 2**20:.1f} MiB on device 0)")
      print(f"mesh {dict(mesh.shape)}: " + ", ".join(parts), flush=True)

    # Records the pipeline skipped, per "skipped/<reason>", through the last logged step of the
    # run (restarts included: the totals travel in the checkpoint).
    skipped = collections.Counter()
    counters = ckpt.restore_counters(start) if start else {}
    skipped.update(_skipped_counts(counters))
    if start:
      if is_main:
        print(f"resumed from step {start} in {workdir}", flush=True)
      if not restore_iterator:
        logging.warning("checkpoint %d holds the data-iterator state of %s processes, this run "
                        "has %d: the data restarts at global batch %d, where the saved run would "
                        "have continued", start, saved_by, jax.process_count(), start)
    elif config.init_from:
      state = initialize_from(config.init_from, state)

    # Sample grids run on the training mesh, the EMA parameters where they are.
    generator = generator_lib.Generator(model, conditioner, space, config, mesh, rules)
    writer = opened.enter_context(metrics_lib.MetricWriter(workdir, enabled=is_main,
                                                           resume_step=start))
    peak, peak_source = flops_lib.peak_flops()
    if is_main:
      parts = card["model_tflops_per_step_by_part"]
      print(f"model FLOPs per step: {card['model_tflops_per_step']:.4g} TFLOP (DiT "
            f"{parts['dit']:.4g}, refiners {parts['refiners']:.4g}, LLMs {parts['llms']:.4g}); "
            f"peak {peak / 1e12:.4g} TFLOP/s ({peak_source})", flush=True)
    progress = metrics_lib.Progress(config.total_steps, start, config.input.batch_size,
                                    card["model_tflops_per_step"] * 1e12, peak, mesh.size)
    preemption = Preemption()
    nonfinite = nonfinite_lib.NonfiniteSteps(config.optim.max_nonfinite_steps,
                                             counters.get(nonfinite_lib.COUNTER, 0))
    timing = opened.enter_context(goodput_lib.Goodput(counters))

    def write_samples(step: int):
      if not config.sample.prompts:
        return
      # Every process runs the sampler (the EMA params are sharded over all of them).
      images = generator(state.ema_params, list(config.sample.prompts), config.sample.seed,
                         config.sample.steps, config.sample.cfg, config.sample.sampler)
      if is_main:
        generator_lib.save_grid(images, os.path.join(workdir, "samples", f"step_{step}.png"),
                                scale=4)

    pending = []  # The metrics of the steps since the last log.

    def write_log(step: int):
      nonlocal pending
      summary = metrics_lib.average(pending)
      summary.update(timing.interval())
      summary.update(progress.update(step, excluded_seconds=summary["time/compile_s"]))
      skipped.update(_skipped_counts(summary))
      summary["skipped_total"] = sum(skipped.values())
      summary[nonfinite_lib.COUNTER] = nonfinite.total
      pending = []
      writer.write(step, summary)
      if is_main:
        print(progress.line(step, summary), flush=True)

    for step in range(start + 1, config.total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        with timing.phase("data_wait"):
          batch = sharding.host_to_global(next(data_iter), mesh, rules)
        with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
          state, metrics = plan.train_step(state, frozen, batch)
      pending.append(metrics)
      nonfinite.observe(step, metrics["nonfinite"])
      last = step == config.total_steps
      stop = preemption.stop_after(step)
      save = step % config.checkpoint_every == 0 or last or stop
      log = step % config.log_every == 0 or last
      if log or save:
        nonfinite.flush()
      if nonfinite.diverged:
        if log:
          write_log(step)
        raise nonfinite_lib.Diverged(nonfinite.message(ckpt.latest_step(), ckpt.manager.directory))
      if save:
        # Steps since the last log count too: the resumed run starts after this step.
        unlogged = _skipped_counts(metrics_lib.average(pending)) if pending else {}
        counters = {**(skipped + collections.Counter(unlogged)),
                    nonfinite_lib.COUNTER: nonfinite.total, **timing.counters()}
        with timing.phase("checkpoint"):
          # The step never keeps a non-finite update; this guards what it cannot see (e.g. a
          # restored or initialized state), so no checkpoint ever holds a non-finite parameter.
          if not nonfinite_lib.state_is_finite(state.params, state.ema_params):
            raise nonfinite_lib.Diverged(
                f"step {step}: the parameters are not finite; nothing saved, the last "
                f"checkpoint is {ckpt.latest_step()} in {ckpt.manager.directory}")
          ckpt.save(step, {"params": state.params, "ema_params": state.ema_params,
                           "opt_state": state.opt_state}, data_iter, config,
                    counters=counters, force=True)
      if config.sample_every and (step % config.sample_every == 0 or last):
        with timing.phase("sample"):
          write_samples(step)
      # After the save and the samples, so the step's log accounts for their time.
      if log:
        write_log(step)
      if stop:
        ckpt.wait()
        logging.warning("stopped at step %d after SIGTERM; checkpoint saved", step)
        sys.exit(143)  # The ExitStack closes the iterator, the writer and the checkpointer.
    ckpt.wait()
  return state


def initialize_from(path: str, state: step_lib.TrainState) -> step_lib.TrainState:
  """`state` with the parameters and EMA of another run's checkpoint (config.init_from: a
  workdir, its latest checkpoint, or <workdir>/checkpoints/<step>), restored into `state`'s
  shardings; the optimizer state stays fresh. Every leaf's shape is checked before anything is
  read: ConfigError naming the parameter and both shapes."""
  workdir, step = checkpoints.parse_checkpoint_path(path)
  abstract = {"params": checkpoints.abstract_like(state.params),
              "ema_params": checkpoints.abstract_like(state.ema_params)}
  try:
    with checkpoints.Checkpointer(workdir, create=False) as source:
      step, restored = source.restore_whole(abstract, step)
  except checkpoints.CheckpointError as e:
    raise config_lib.ConfigError(f"config.init_from={path!r}: {e}") from e
  if jax.process_index() == 0:
    print(f"initialized parameters and EMA from step {step} of {workdir} (config.init_from); "
          "optimizer and data start fresh", flush=True)
  return state.replace(**restored)


def _skipped_counts(summary: dict[str, float]) -> dict[str, float]:
  return {k: v for k, v in summary.items() if k.startswith("skipped/")}
