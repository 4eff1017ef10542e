r"""Samples images from a trained LI-DiT run.

  python -m li_dit.sample --workdir W --prompt "a red circle to the left of a blue square" \
      [--prompt ...] --out grid.png [--steps 20 --cfg 4.0 --seed 0 --ema --sampler heun] \
      [--size HxW] [--mesh data=D,fsdp=F,tensor=T]

Defaults for steps, cfg and sampler come from the run's config (`config.sample`). With several
prompts the images form one grid, in prompt order, row-major. --size: any (height x width, in
pixels) bucket the run trained on (default: its square image size). --mesh: the devices to sample
on (default: the run's mesh fitted to the devices present); parameters, LLMs and VAE are loaded
straight into their shards, so a run larger than one device samples as it trained.
"""
from __future__ import annotations

from absl import app, flags

from li_dit import cli
from li_dit import config_lib
from li_dit.generation import generator as generator_lib
from li_dit.generation import load
from li_dit.io import checkpoints

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
_SIZE = flags.DEFINE_string("size", None, "HxW in pixels, a bucket the run trained on "
                            "(default: its square image size).")
_MESH = flags.DEFINE_string("mesh", None, "data=D,fsdp=F,tensor=T (default: the run's mesh "
                            "fitted to the devices present).")
flags.mark_flags_as_required(["workdir", "prompt", "out"])


def parse_size(text: str | None, generator: generator_lib.Generator) -> tuple[int, int] | None:
  """--size "HxW" -> (H, W), one of the run's trained sizes; ConfigError naming them."""
  if text is None:
    return None
  height, _, width = text.lower().partition("x")
  if not (height.isdigit() and width.isdigit()):
    raise config_lib.ConfigError(f"--size={text!r}: expected HxW in pixels, e.g. 256x256")
  size = (int(height), int(width))
  if size not in generator.sizes:
    raise config_lib.ConfigError(
        f"--size={text}: the run trained on {', '.join(f'{h}x{w}' for h, w in generator.sizes)}")
  return size


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  with cli.one_line_failures("li_dit.sample", config_lib.ConfigError,
                             checkpoints.CheckpointError):
    mesh = load.parse_mesh(_MESH.value) if _MESH.value else None
    config, generator, params, step = load.load_run(_WORKDIR.value, _STEP.value, _EMA.value,
                                                    mesh)
    size = parse_size(_SIZE.value, generator)
    prompts = [p for p in _PROMPTS.value for _ in range(_NUM.value)]
    images = generator(params, prompts, seed=_SEED.value,
                       steps=_STEPS.value or config.sample.steps,
                       cfg_scale=config.sample.cfg if _CFG.value is None else _CFG.value,
                       sampler=_SAMPLER.value or config.sample.sampler, size=size)
    generator_lib.save_grid(images, _OUT.value, columns=_NUM.value if _NUM.value > 1 else None,
                            scale=_SCALE.value)
  print(f"wrote {len(images)} image(s) of {images.shape[1]}x{images.shape[2]} from step {step} "
        f"of {_WORKDIR.value} to {_OUT.value} (mesh {dict(generator.mesh.shape)})")


if __name__ == "__main__":
  app.run(main)
