r"""LI-DiT-1B (paper Table 7: depth 28, width 1152, 16 heads) with LLaMA3-8B and Qwen1.5-7B as
prompt encoders, fused by the collaborative refiner, in a 16-channel 8x VAE latent space.

  python -m li_dit.train --config configs/li_dit_1b.py --workdir gs://BUCKET/li_dit_1b \
      --config.text.llms.llama3.path=/path/to/Meta-Llama-3-8B-Instruct \
      --config.text.llms.qwen15.path=/path/to/Qwen1.5-7B-Chat

  python tools/param_count.py --config configs/li_dit_1b.py   # the trainable parameters

Stage 1 of the paper's schedule: 256px images (32x32x16 latents), global batch 2048. The input
and latent pieces (image-caption corpora, the VAE) come with later releases; until then the
model and text sides of this config are what it pins down.
"""
import ml_collections as mlc

from li_dit import config_lib


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  del arg
  config = config_lib.default_config()
  config.total_steps = 500_000
  config.input.update(image_size=32, batch_size=2048)  # 256px images -> 32x32 latents.
  config.text.encode = "online"
  config.text.llms.llama3 = config_lib.llm_config(
      "Meta-Llama-3-8B-Instruct", layer=-3, max_tokens=128, hidden_size=4096)
  config.text.llms.qwen15 = config_lib.llm_config(
      "Qwen1.5-7B-Chat", layer=-3, max_tokens=128, hidden_size=4096)
  # Splash attention: the TPU flash-attention kernel (interpreted, slowly, off TPU; use
  # --config.model.attention=xla there).
  config.model.update(patch_size=2, channels=16, width=1152, depth=28, num_heads=16,
                      dtype="bfloat16", scan_layers=True, attention="splash")
  config.flow.base_size = 32
  config.optim.update(lr=1e-4, warmup_steps=1000)
  config.mesh = dict(data=1, fsdp=-1, tensor=1)
  return config
