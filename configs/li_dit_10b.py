r"""LI-DiT-10B (paper Table 7: depth 48, width 2816, 44 heads), the same text side and latent
space as LI-DiT-1B.

  python tools/run_card.py --config configs/li_dit_10b.py          # the 512px stage
  python tools/rehearse.py --config configs/li_dit_10b.py:1024
  python -m li_dit.train --config configs/li_dit_10b.py --workdir gs://BUCKET/li_dit_10b_512 \
      --config.text.llms.llama3.path=/path/to/Meta-Llama-3-8B-Instruct \
      --config.text.llms.qwen15.path=/path/to/Qwen1.5-7B-Chat --config.vae.path=/path/to/FLUX.1-schnell
  python -m li_dit.train --config configs/li_dit_10b.py:1024 --workdir gs://BUCKET/li_dit_10b_1024 \
      --config.init_from=gs://BUCKET/li_dit_10b_512 ...        # the 1024px stage, from the 512px

512px images (64x64x16 latents, 1024 image tokens, time shift 2.0), global batch 4096,
parameters and optimizer state sharded over `fsdp` with rematerialised blocks.
`--config configs/li_dit_10b.py:1024` is the 1024px stage (128x128x16 latents, 4096 image tokens,
shift 4.0), same batch, started from the 512px run's parameters and EMA by `config.init_from`
(the model has no position table: the same weights run at any resolution).
"""
import importlib.util
import os

import ml_collections as mlc


def _load_sibling(name: str):
  """Imports configs/<name>.py by path, so this file works wherever the repo is."""
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), f"{name}.py")
  spec = importlib.util.spec_from_file_location(f"li_dit_configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """`arg`: None or "512" (the 512px stage), "1024" (the 1024px stage)."""
  resolutions = ("512", "1024")
  resolution = arg or "512"
  if resolution not in resolutions:
    raise ValueError(f"configs/li_dit_10b.py: unknown variant {arg!r}; choose one of "
                     f"{resolutions} or nothing")
  base = _load_sibling("li_dit_1b")
  config = base.get_config()
  size = int(resolution)
  config.input.update(image_size=size, buckets=base.buckets(size), batch_size=4096)
  config.model.update(width=2816, depth=48, num_heads=44, remat="full")
  return config
