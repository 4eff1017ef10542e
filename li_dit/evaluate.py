r"""Evaluates a trained run on a benchmark and writes a JSON report.

  python -m li_dit.evaluate --workdir W --benchmark shapes --out R.json \
      [--samples_per_prompt 4 --steps N --cfg S --seed K --noema --step N --grid G.png] \
      [--mesh data=D,fsdp=F,tensor=T]

The benchmarks are li_dit.evaluation.benchmarks.BENCHMARKS. shapes: images for every held-out
prompt of the synthetic shapes data (prompts never used in training), scored by
li_dit.evaluation.shapes_score for colour, count, shape and position accuracy.
"""
from __future__ import annotations

import json
import time

from absl import app, flags
from etils import epath

from li_dit import cli
from li_dit import config_lib
from li_dit.evaluation import benchmarks
from li_dit.generation import generator as generator_lib
from li_dit.generation import load
from li_dit.io import checkpoints

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_BENCHMARK = flags.DEFINE_enum("benchmark", "shapes", sorted(benchmarks.BENCHMARKS),
                               "Which benchmark.")
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


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  with cli.one_line_failures("li_dit.evaluate", config_lib.ConfigError,
                             checkpoints.CheckpointError):
    evaluate()


def evaluate() -> None:
  """The flags' run evaluated: the report written, the accuracies printed."""
  mesh = load.parse_mesh(_MESH.value) if _MESH.value else None
  config, generator, params, step = load.load_run(_WORKDIR.value, _STEP.value, _EMA.value, mesh)
  steps = _STEPS.value or config.sample.steps
  cfg = config.sample.cfg if _CFG.value is None else _CFG.value
  sampler = _SAMPLER.value or config.sample.sampler
  benchmark = benchmarks.BENCHMARKS[_BENCHMARK.value]
  prompts = benchmark.prompts(config)
  start = time.perf_counter()
  report, images = benchmarks.evaluate(benchmark, generator, params, prompts, _SAMPLES.value,
                                       _SEED.value, steps, cfg, sampler, _BATCH.value)
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
