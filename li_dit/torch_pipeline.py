r"""Text-to-image in PyTorch with a model exported by tools/export_torch.py.

  python -m li_dit.torch_pipeline --model OUT --prompt "a red circle to the left of a blue square" \
      [--prompt ...] --out image.png [--steps N --cfg S --sampler euler|heun --seed K \
      --noise NOISE.npy --size PIXELS]

What `li_dit.sample` computes, in PyTorch and without jax: every LLM of OUT/config.json runs in
transformers (a GGUF file, a packaged registry name or a Hugging Face folder) on the same [system
prompt + instruction | prompt | template suffix | padding] rows as in training
(`li_dit.text.prompts`: template, token limit, padding and instruction span), its features are
`hidden_states[layer]`; `li_dit.export.torch.model` refines them and denoises with the same sampler,
time shift and classifier-free guidance (the empty prompt is the unconditional half); a latent model
is decoded by the diffusers VAE of config.json. Defaults of steps, cfg, sampler and seed come from
config.json. Several prompts give one PNG with the images side by side, in prompt order.

The initial noise: --seed draws it with torch's generator, which is not JAX's, so the same seed
gives other images than li_dit.sample. For li_dit.sample's images pass its noise with --noise (or
`noise=` of `li_dit.export.torch.pipeline.Pipeline.__call__`): float32 [B,C,h,w] (NCHW), h = w =
size / f (f = 1 in pixel space), i.e. jax.random.normal(jax.random.key(seed), (B,h,w,C)) transposed
to NCHW.
"""
from __future__ import annotations

import argparse
import os
from typing import Sequence

import numpy as np
from PIL import Image

from li_dit import cli
from li_dit.export.torch import model as torch_model
from li_dit.export.torch import pipeline as pipeline_lib


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(prog="python -m li_dit.torch_pipeline",
                                   description=__doc__.split("\n\n")[0])
  parser.add_argument("--model", required=True, help="Folder written by tools/export_torch.py.")
  parser.add_argument("--prompt", required=True, action="append",
                      help="A prompt (repeat for several).")
  parser.add_argument("--out", required=True, help="Output PNG (images side by side).")
  parser.add_argument("--steps", type=int, help="Sampler steps (default: config.json).")
  parser.add_argument("--cfg", type=float, help="Classifier-free guidance scale.")
  parser.add_argument("--sampler", choices=torch_model.SAMPLERS, help="ODE sampler.")
  parser.add_argument("--seed", type=int, help="Seed of torch's noise (not JAX's).")
  parser.add_argument("--noise", help="Initial noise, .npy float32 [B,C,h,w] (overrides --seed).")
  parser.add_argument("--size", type=int, help="Image side in pixels (default: trained size).")
  args = parser.parse_args(argv)
  # A bad --noise file is a ValueError of numpy's naming it.
  with cli.one_line_failures("torch_pipeline", torch_model.ExportError, ValueError):
    pipeline = pipeline_lib.Pipeline(args.model)
    noise = None if args.noise is None else np.load(args.noise)
    images = pipeline(args.prompt, args.steps, args.cfg, args.sampler, args.seed, noise,
                      args.size)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    Image.fromarray(np.concatenate(list(images), axis=1)).save(args.out)
  print(f"torch_pipeline: wrote {len(images)} image(s) from {args.model} to {args.out}")


if __name__ == "__main__":
  main()
