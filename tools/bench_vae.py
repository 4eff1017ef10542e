r"""VAE throughput: our Flax AutoencoderKL against diffusers' PyTorch one, same CPU, same run.

  python tools/bench_vae.py [--config sd] [--size 256] [--batch 2] [--iters 3] \
      [--json bench_vae.json]

--config picks the architecture with random weights (speed does not depend on them): sd is SD
1.x/2.x/XL's VAE (4 latent channels, quant convs), flux is SD3/FLUX's (16 channels, no quant
convs), both with levels of 128, 256, 512, 512 channels and 2 ResnetBlocks per level (84M
parameters); tiny is a 2-level 32-channel one for tests. diffusers initialises the model; it
is saved as safetensors and loaded with `li_dit.io.diffusers_vae`, so both sides hold the same
weights and their outputs are compared too.

Both encode --batch images of --size px (the mean latents) and decode those latents, float32.
Ours is jitted whole (compile time reported apart); PyTorch runs under torch.inference_mode with
as many threads as the machine has cores, as XLA:CPU uses. After one warm-up call each, --iters
rounds call the four functions in turn and each figure is the median of its calls: a change of
load on the machine hits both sides alike. The load average before and after is recorded too.
Prints a table and writes the figures as JSON. A benchmark, not a test: nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from li_dit.io import diffusers_vae  # pylint: disable=g-import-not-at-top
from li_dit.models import vae  # pylint: disable=g-import-not-at-top

_RELEASED = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                 down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32)
# diffusers AutoencoderKL arguments.
CONFIGS = {
    "sd": dict(_RELEASED, latent_channels=4, scaling_factor=0.18215),
    "flux": dict(_RELEASED, latent_channels=16, scaling_factor=0.3611, shift_factor=0.1159,
                 use_quant_conv=False, use_post_quant_conv=False),
    "tiny": dict(block_out_channels=(32, 32), layers_per_block=1, norm_num_groups=8,
                 down_block_types=("DownEncoderBlock2D",) * 2,
                 up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4),
}


def _median_seconds(fns: dict[str, Callable[[], Any]], iters: int) -> dict[str, float]:
  """Median seconds of each function over `iters` rounds that call them all in turn, so a change
  of load on the machine during the run hits every figure alike."""
  times = {name: [] for name in fns}
  for _ in range(iters):
    for name, fn in fns.items():
      start = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - start)
  return {name: float(np.median(t)) for name, t in times.items()}


def run(config: str, size: int, batch: int, iters: int) -> dict:
  """Measures both implementations; returns the figures (see the module docstring)."""
  import diffusers  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top

  torch.set_num_threads(os.cpu_count())
  load_before = os.getloadavg()
  torch.manual_seed(0)
  reference = diffusers.AutoencoderKL(**CONFIGS[config]).eval()
  with tempfile.TemporaryDirectory() as tmp:
    reference.save_pretrained(tmp, safe_serialization=True)
    vae_config, params = diffusers_vae.load_vae(tmp)
  model = vae.AutoencoderKL(vae_config)
  images = np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  f = vae_config.downsampling_factor
  latents = jax.ShapeDtypeStruct((batch, size // f, size // f, vae_config.latent_channels),
                                 np.float32)
  start = time.perf_counter()
  encode = jax.jit(lambda p, x: vae.encode(model, p, x)[0]).lower(params, images).compile()
  decode = jax.jit(lambda p, z: vae.decode(model, p, z)).lower(params, latents).compile()
  compile_seconds = time.perf_counter() - start
  # The first calls are the warm-up ones, and give the outputs compared.
  mean = np.array(encode(params, images))  # A writable copy: torch.from_numpy shares it.
  decoded = np.asarray(decode(params, mean))
  torch_images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  torch_mean = torch.from_numpy(mean).permute(0, 3, 1, 2).contiguous()
  torch_encode = torch.inference_mode()(lambda: reference.encode(torch_images).latent_dist.mean)
  torch_decode = torch.inference_mode()(lambda: reference.decode(torch_mean).sample)
  reference_mean, reference_decoded = torch_encode(), torch_decode()
  seconds = _median_seconds({
      ("ours", "encode"): lambda: encode(params, images).block_until_ready(),
      ("diffusers", "encode"): torch_encode,
      ("ours", "decode"): lambda: decode(params, mean).block_until_ready(),
      ("diffusers", "decode"): torch_decode}, iters)
  steps, sides = ("encode", "decode"), ("ours", "diffusers")
  max_abs_diff = dict(
      encode_mean=float(np.abs(mean - reference_mean.permute(0, 2, 3, 1).numpy()).max()),
      decode=float(np.abs(decoded - reference_decoded.permute(0, 2, 3, 1).numpy()).max()))
  return dict(
      config=config, size=size, batch=batch, iters=iters, cores=os.cpu_count(),
      torch_threads=torch.get_num_threads(), jax_devices=str(jax.devices()),
      load_average=dict(before=load_before[0], after=os.getloadavg()[0]),
      compile_seconds=compile_seconds, max_abs_diff=max_abs_diff,
      seconds={side: {step: seconds[side, step] for step in steps} for side in sides},
      images_per_sec={step: {side: batch / seconds[side, step] for side in sides}
                      for step in steps},
      speedup_vs_diffusers={step: seconds["diffusers", step] / seconds["ours", step]
                            for step in steps})


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--config", choices=sorted(CONFIGS), default="sd")
  parser.add_argument("--size", type=int, default=256, help="image height and width (px)")
  parser.add_argument("--batch", type=int, default=2)
  parser.add_argument("--iters", type=int, default=3, help="timed calls per figure")
  parser.add_argument("--json", default="bench_vae.json", help="where to write the figures")
  args = parser.parse_args(argv)
  result = run(args.config, args.size, args.batch, args.iters)
  print(f"{args.config} VAE (random weights), {args.size}x{args.size} px, batch {args.batch}, "
        f"float32, {result['cores']} cores (torch threads {result['torch_threads']}), load "
        f"average {result['load_average']['before']:.2f} -> {result['load_average']['after']:.2f}")
  print(f"{'images/s':<10}{'ours':>10}{'diffusers':>12}{'ours/diffusers':>16}")
  for step in ("encode", "decode"):
    rate = result["images_per_sec"][step]
    print(f"{step:<10}{rate['ours']:>10.2f}{rate['diffusers']:>12.2f}"
          f"{result['speedup_vs_diffusers'][step]:>15.2f}x")
  diff = result["max_abs_diff"]
  print(f"ours compiled in {result['compile_seconds']:.1f} s; max |ours - diffusers|: encode mean "
        f"{diff['encode_mean']:.2g}, decode {diff['decode']:.2g}")
  with open(args.json, "w") as f:
    json.dump(result, f, indent=2)
  print(f"wrote {args.json}")
  return result


if __name__ == "__main__":
  main()
