"""Training and sampling in the latent space of a frozen VAE (li_dit.diffusion.image_space), on a
tiny random FLUX-layout VAE made offline (tests/vae_fixtures.py): the image space against diffusers,
the config errors raised before anything is loaded or compiled, and configs/demo.py:latent_smoke end
to end through `python -m li_dit.train` and `python -m li_dit.sample`."""
import json
import os
import shutil
import subprocess
import sys

import diffusers
import jax
import ml_collections
import numpy as np
import pytest
import torch
from ml_collections import config_flags
from PIL import Image

import smoke_runs
import vae_fixtures
from li_dit import config_lib
from li_dit.diffusion import image_space
from li_dit.text import encoders
from li_dit.training import loop

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 4  # The run is for the latent path, not for learning.


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> str:
  return vae_fixtures.save_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae") / "vae"))


def _latent_smoke(vae_path: str) -> ml_collections.ConfigDict:
  path = os.path.join(REPO, "configs", "demo.py")
  config = config_flags.config_flags._LoadConfigModule("demo.py", path).get_config(  # pylint: disable=protected-access
      "latent_smoke")
  config.vae.path = vae_path
  return config


def test_image_space_matches_diffusers(vae_folder):
  """x0 = (mean - shift) * scale of the images in [-1, 1]; decode inverts the normalisation."""
  config = _latent_smoke(vae_folder)
  config.vae.sample_latents = False
  space = image_space.from_config(config)
  images = np.random.default_rng(0).integers(0, 256, (2, 16, 24, 3), np.uint8)
  x0 = jax.jit(space.encode)(space.frozen(), images, jax.random.key(0))
  decoded = jax.jit(space.decode)(space.frozen(), x0)

  model = diffusers.AutoencoderKL.from_pretrained(vae_folder).eval()
  scale, shift = model.config.scaling_factor, model.config.shift_factor
  with torch.no_grad():
    pixels = torch.from_numpy(images.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1.0)
    latent = (model.encode(pixels).latent_dist.mean - shift) * scale
    expected_image = model.decode(latent / scale + shift).sample
  assert x0.shape == (2, 4, 6, 16) and space.latent_shape(16, 24) == (4, 6, 16)
  np.testing.assert_allclose(x0, latent.permute(0, 2, 3, 1).numpy(), rtol=0, atol=1e-4)
  assert decoded.shape == (2, 16, 24, 3)
  np.testing.assert_allclose(decoded, expected_image.permute(0, 2, 3, 1).numpy(), rtol=0,
                             atol=1e-4)

  config.vae.sample_latents = True
  sampled = image_space.from_config(config)
  draws = [sampled.encode(sampled.frozen(), images, jax.random.key(k)) for k in (0, 0, 1)]
  np.testing.assert_array_equal(draws[0], draws[1])  # A function of the key (resume is exact).
  assert np.abs(draws[0] - draws[2]).max() > 0 and np.abs(draws[0] - x0).max() > 0


def _misfit_vae(vae_folder, tmp_path):
  """A copy of the VAE whose config.json asks for two ResnetBlocks per level."""
  folder = tmp_path / "misfit"
  folder.mkdir()
  with open(os.path.join(vae_folder, "config.json")) as f:
    fields = json.load(f)
  (folder / "config.json").write_text(json.dumps({**fields, "layers_per_block": 2}))
  os.symlink(os.path.join(vae_folder, "diffusion_pytorch_model.safetensors"),
             folder / "diffusion_pytorch_model.safetensors")
  return str(folder)


@pytest.mark.parametrize("case,message", [
    ("channels", "config.model.channels: 4 does not match latent_channels=16 of the VAE in "
                 "config.vae.path="),
    ("image_size", "config.input.image_size: 36 is not divisible by f * model.patch_size = "
                   "4 * 2 = 8"),
    ("buckets", "config.input.buckets: (32, 20) has a side not divisible by f * "
                "model.patch_size = 4 * 2 = 8"),
    ("missing", "config.vae.path: /nonexistent/vae is not a diffusers VAE folder"),
    ("misfit", "config.vae.path: Tensor "),  # ... (shape ...) is missing from the checkpoint
    ("pixels", "config.model.channels: 16 in pixel space (config.vae.path is empty)"),
])
def test_config_errors_come_before_loading_anything(vae_folder, tmp_path, monkeypatch, case,
                                                    message):
  config = _latent_smoke(vae_folder)
  if case == "channels":
    config.model.channels = 4
  elif case == "image_size":
    config.input.image_size = 36
  elif case == "buckets":
    config.input.buckets = ((32, 20),)
  elif case == "missing":
    config.vae.path = "/nonexistent/vae"
  elif case == "misfit":
    config.vae.path = _misfit_vae(vae_folder, tmp_path)
  else:
    config.vae.path = ""

  def no_llms(*args, **kwargs):
    raise AssertionError("an LLM was loaded before the VAE config was checked")
  monkeypatch.setattr(encoders, "build_encoders", no_llms)
  with pytest.raises(config_lib.ConfigError) as error:
    loop.train(config, str(tmp_path / "run"))
  assert str(error.value).startswith(message), error.value


def _train(workdir: str, vae_folder: str) -> None:
  result = subprocess.run(
      [sys.executable, "-m", "li_dit.train", "--config", "configs/demo.py:latent_smoke",
       "--workdir", workdir, "--config.log_every=1", f"--config.vae.path={vae_folder}",
       f"--config.total_steps={STEPS}", f"--config.checkpoint_every={STEPS // 2}",
       f"--config.sample_every={STEPS}", "--config.optim.warmup_steps=1"],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def latent_run(vae_folder, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("latent_run"))
  _train(workdir, vae_folder)
  return workdir


@pytest.mark.slow
def test_latent_smoke_trains_end_to_end(latent_run):
  losses = smoke_runs.losses(latent_run)
  assert len(losses) == STEPS and np.all(np.isfinite(losses))
  assert sorted(os.listdir(os.path.join(latent_run, "checkpoints"))) == [str(STEPS // 2),
                                                                         str(STEPS)]
  # The checkpoint holds the DiT side only: the VAE, like the LLMs, is not the run's to save.
  names = smoke_runs.params(latent_run, STEPS)
  assert not any("encoder" in k or "decoder" in k for k in names), sorted(names)[:5]
  # The sample grid decodes: 4 prompts of 32x32 pixels, a 2x2 grid upscaled 4 times.
  grid = Image.open(os.path.join(latent_run, "samples", f"step_{STEPS}.png"))
  assert grid.size == (256, 256) and grid.mode == "RGB"


@pytest.mark.slow
def test_sample_cli_decodes_to_pixels(latent_run, tmp_path):
  out = tmp_path / "image.png"
  result = subprocess.run(
      [sys.executable, "-m", "li_dit.sample", "--workdir", latent_run, "--prompt",
       "a red circle", "--out", str(out), "--steps", "2", "--scale", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  image = np.asarray(Image.open(out))
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8


@pytest.mark.slow
def test_resume_draws_the_same_latents(latent_run, vae_folder, tmp_path):
  """A run resumed from its middle checkpoint logs the losses of the uninterrupted one: the
  latent draws, like the flow's noise, are a function of the step."""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(latent_run, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", str(STEPS)))
  _train(workdir, vae_folder)
  # The resumed run replaces what the copy logged after its checkpoint: each step once, the
  # second half recomputed.
  losses = smoke_runs.losses(workdir)
  np.testing.assert_array_equal(losses, smoke_runs.losses(latent_run))
