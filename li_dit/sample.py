r"""Samples images from a trained LI-DiT run.

  python -m li_dit.sample --workdir W --prompt "a red circle to the left of a blue square" \
      [--prompt ...] --out grid.png [--steps 20 --cfg 4.0 --seed 0 --ema --sampler heun]

Defaults for steps, cfg and sampler come from the run's config (`config.sample`). With several
prompts the images form one grid, in prompt order, row-major.
"""
from __future__ import annotations

from absl import app, flags

from li_dit import config_lib
from li_dit import generate

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_PROMPTS = flags.DEFINE_multi_string("prompt", None, "A prompt (repeat for several).")
_OUT = flags.DEFINE_string("out", None, "Output PNG (a grid when there are several images).")
_STEPS = flags.DEFINE_integer("steps", None, "Sampler steps (default: the run's config).")
_CFG = flags.DEFINE_float("cfg", None, "Classifier-free guidance scale (default: config).")
_SEED = flags.DEFINE_integer("seed", 0, "Noise seed: the same seed gives the same images.")
_EMA = flags.DEFINE_boolean("ema", True, "Use the EMA parameters (--noema: the raw ones).")
_SAMPLER = flags.DEFINE_enum("sampler", None, ["euler", "heun"], "ODE sampler.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_NUM = flags.DEFINE_integer("num_per_prompt", 1, "Images per prompt.")
_SCALE = flags.DEFINE_integer("scale", 4, "Upscale the grid this many times (nearest).")
flags.mark_flags_as_required(["workdir", "prompt", "out"])


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  config, generator, params, step = generate.load_run(_WORKDIR.value, _STEP.value, _EMA.value)
  prompts = [p for p in _PROMPTS.value for _ in range(_NUM.value)]
  images = generator(params, prompts, seed=_SEED.value,
                     steps=_STEPS.value or config.sample.steps,
                     cfg_scale=config.sample.cfg if _CFG.value is None else _CFG.value,
                     sampler=_SAMPLER.value or config.sample.sampler)
  generate.save_grid(images, _OUT.value, columns=_NUM.value if _NUM.value > 1 else None,
                     scale=_SCALE.value)
  print(f"wrote {len(images)} image(s) from step {step} of {_WORKDIR.value} to {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
