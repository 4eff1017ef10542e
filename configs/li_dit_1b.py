r"""LI-DiT-1B (paper Table 7: depth 28, width 1152, 16 heads) with LLaMA3-8B and Qwen1.5-7B as
prompt encoders, fused by the collaborative refiner, in the latent space of a 16-channel 8x VAE.

  python tools/run_card.py --config configs/li_dit_1b.py     # what the run will do, no weights
  python tools/rehearse.py --config configs/li_dit_1b.py     # its code path end to end, shrunk
  python -m li_dit.train --config configs/li_dit_1b.py --workdir gs://BUCKET/li_dit_1b \
      --config.text.llms.llama3.path=/path/to/Meta-Llama-3-8B-Instruct \
      --config.text.llms.qwen15.path=/path/to/Qwen1.5-7B-Chat \
      --config.vae.path=/path/to/FLUX.1-schnell \
      --config.input.source=tfds --config.input.tfds_name=NAME --config.input.data_dir=gs://...

Stage 1 of the paper's schedule: 256px images (32x32x16 latents, 256 image tokens), global batch
2048. Every size is in pixels (input.image_size, input.buckets, flow.base_size); this 256px stage
is the base of the resolution shift (shift 1.0, median training t 0.5); LI-DiT-10B's 512px and
1024px stages get 2.0 and 4.0. The frozen models are named by their published checkpoints, so the
run plans (tools/run_card.py, tools/aot_compile.py) on any machine; training needs their folders.
"""
import ml_collections as mlc

from li_dit import config_lib

# (height, width) in pixels of about 256^2 each, multiples of 16 (VAE 8x, patch 2): square,
# about 4:3 and 3:4, 7:4 and 4:7. Each image goes to the bucket of closest aspect ratio.
BUCKETS_256 = ((256, 256), (288, 224), (224, 288), (336, 192), (192, 336))


def buckets(size: int) -> tuple[tuple[int, int], ...]:
  """BUCKETS_256 scaled to `size` pixels (a multiple of 256)."""
  return tuple((h * size // 256, w * size // 256) for h, w in BUCKETS_256)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  del arg
  config = config_lib.default_config()
  config.total_steps = 500_000
  config.input.update(image_size=256, buckets=buckets(256), batch_size=2048)
  config.text.encode = "online"
  config.text.llms.llama3 = config_lib.llm_config(
      "Meta-Llama-3-8B-Instruct", layer=-3, max_tokens=128, hidden_size=4096)
  config.text.llms.qwen15 = config_lib.llm_config(
      "Qwen1.5-7B-Chat", layer=-3, max_tokens=128, hidden_size=4096)
  # FLUX.1's VAE (16 channels, 8x); the name plans the run, training needs the folder.
  config.vae.update(path="FLUX.1-schnell", dtype="bfloat16")
  # Splash attention: the TPU flash-attention kernel (interpreted, slowly, off TPU; use
  # --config.model.attention=xla there).
  config.model.update(patch_size=2, channels=16, width=1152, depth=28, num_heads=16,
                      dtype="bfloat16", scan_layers=True, attention="splash")
  config.flow.base_size = 256
  config.optim.update(lr=1e-4, warmup_steps=1000, weight_decay=0.03)
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  return config
