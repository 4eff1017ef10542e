r"""Evaluates a trained run on a benchmark and writes a JSON report.

  python -m li_dit.evaluate --workdir W --benchmark shapes --out R.json \
      [--samples_per_prompt 4 --steps N --cfg S --seed K --noema --step N --grid G.png] \
      [--mesh data=D,fsdp=F,tensor=T]

shapes: images for every held-out prompt of the synthetic shapes data (prompts never used in
training), scored by li_dit.data.shapes_score for colour, count, shape and position accuracy.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np
from absl import app, flags
from etils import epath

from li_dit import config_lib
from li_dit.data import shapes_score
from li_dit.data.synthetic import shapes
from li_dit.generation import generator as generator_lib
from li_dit.generation import load
from li_dit.io import checkpoints

BENCHMARKS = ("shapes",)

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_BENCHMARK = flags.DEFINE_enum("benchmark", "shapes", BENCHMARKS, "Which benchmark.")
_OUT = flags.DEFINE_string("out", None, "Where to write the JSON report.")
_SAMPLES = flags.DEFINE_integer("samples_per_prompt", 4, "Images per prompt (different noise).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the run's config).")
_CFG = flags.DEFINE_float("cfg", None, "Guidance scale (default: the run's config).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["euler", "heun"], "ODE sampler (default: config).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed.")
_EMA = flags.DEFINE_boolean("ema", True, "Use the EMA parameters.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_BATCH = flags.DEFINE_integer("batch_size", 64, "Images sampled at once.")
_GRID = flags.DEFINE_string("grid", None, "Optional PNG of the first image of every prompt.")
_MESH = flags.DEFINE_string("mesh", None, "data=D,fsdp=F,tensor=T (default: the run's mesh "
                            "fitted to the devices present).")
flags.mark_flags_as_required(["workdir", "out"])


def evaluate_shapes(generator: generator_lib.Generator, params, prompts: list[str],
                    samples_per_prompt: int, seed: int, steps: int, cfg: float, sampler: str,
                    batch_size: int) -> tuple[dict, np.ndarray]:
  """Samples `samples_per_prompt` images per prompt and scores them. Returns (report, images)."""
  captions = [p for p in prompts for _ in range(samples_per_prompt)]
  images = []
  for start in range(0, len(captions), batch_size):
    part = captions[start:start + batch_size]
    padded = part + [part[-1]] * (batch_size - len(part))  # One compiled batch shape.
    images.append(generator(params, padded, seed=seed + start, steps=steps, cfg_scale=cfg,
                            sampler=sampler)[:len(part)])
  images = np.concatenate(images)
  return shapes_score.score_images(images, captions), images


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  try:
    mesh = load.parse_mesh(_MESH.value) if _MESH.value else None
    config, generator, params, step = load.load_run(_WORKDIR.value, _STEP.value, _EMA.value,
                                                        mesh)
  except (config_lib.ConfigError, checkpoints.CheckpointError, ValueError) as e:
    sys.exit(f"li_dit.evaluate: {e}")
  steps = _STEPS.value or config.sample.steps
  cfg = config.sample.cfg if _CFG.value is None else _CFG.value
  sampler = _SAMPLER.value or config.sample.sampler
  prompts = shapes.heldout_captions(config.input.data_seed, config.input.relations)
  start = time.perf_counter()
  report, images = evaluate_shapes(generator, params, prompts, _SAMPLES.value, _SEED.value,
                                   steps, cfg, sampler, _BATCH.value)
  report = {"benchmark": _BENCHMARK.value, "workdir": _WORKDIR.value,
            "checkpoint_step": step, "ema": _EMA.value, "steps": steps, "cfg": cfg,
            "sampler": sampler, "seed": _SEED.value, "num_prompts": len(prompts),
            "samples_per_prompt": _SAMPLES.value, "mesh": dict(generator.mesh.shape),
            "seconds": round(time.perf_counter() - start, 1), **report}
  out = epath.Path(_OUT.value)  # Local or gs://.
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(report, indent=2))
  if _GRID.value:
    generator_lib.save_grid(images[::_SAMPLES.value], _GRID.value, scale=4)
  for key, value in report.items():
    if key.endswith("accuracy"):
      print(f"{key:>24}: {value:.3f}")
  print(f"wrote {_OUT.value} ({len(prompts)} held-out prompts x {_SAMPLES.value} samples, "
        f"step {step})")


if __name__ == "__main__":
  app.run(main)
