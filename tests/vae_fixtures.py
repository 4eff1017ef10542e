"""Tiny random diffusers VAEs made offline, for tests that train or sample in latent space."""
import diffusers
import torch

# FLUX's layout (16 latent channels, no quant convs, a shift factor) at a test's size: f = 4,
# 16 channels at every level, so encoding 32x32 images costs milliseconds.
TINY_FLUX = dict(block_out_channels=(16, 16, 16), layers_per_block=1, latent_channels=16,
                 norm_num_groups=8, down_block_types=("DownEncoderBlock2D",) * 3,
                 up_block_types=("UpDecoderBlock2D",) * 3, scaling_factor=0.3611,
                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False)


def save_tiny_vae(folder: str, seed: int = 0, **overrides) -> str:
  """Writes a random AutoencoderKL (TINY_FLUX, with `overrides`; weights drawn from `seed`) to
  `folder` as diffusers does (config.json + diffusion_pytorch_model.safetensors); returns
  `folder`."""
  torch.manual_seed(seed)
  diffusers.AutoencoderKL(**{**TINY_FLUX, **overrides}).save_pretrained(
      folder, safe_serialization=True)
  return folder
