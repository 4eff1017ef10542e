"""AutoencoderKL against diffusers' PyTorch implementation, on tiny random checkpoints.

The fixtures are made here with diffusers (every weight random, norms included, saved as
safetensors) and loaded by `li_dit.io.diffusers_vae`: an SD-style VAE (4 latent channels, quant
convs) and a FLUX-style one (16 channels, no quant convs, a shift factor). Encoder moments and
decoded images must match PyTorch in float32, on non-square images.
"""
import importlib.util
import json
import os
import shutil
from typing import Any, NamedTuple

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import torch

from li_dit.io import diffusers_vae
from li_dit.models import vae

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOLERANCE = 1e-4  # Max abs difference to PyTorch, float32.

CONFIGS = {
    # f = 4; two ResnetBlocks per level, a channel change between levels (conv_shortcut).
    "sd": dict(block_out_channels=(32, 32, 64), layers_per_block=2, latent_channels=4,
               norm_num_groups=16, down_block_types=("DownEncoderBlock2D",) * 3,
               up_block_types=("UpDecoderBlock2D",) * 3),
    # f = 8, as FLUX's: no quant convs, a shift factor.
    "flux": dict(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=16,
                 norm_num_groups=32, down_block_types=("DownEncoderBlock2D",) * 4,
                 up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.3611,
                 shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False),
}
# Image sizes (H, W): non-square and not multiples of f (odd sizes inside the encoder).
IMAGE_SIZES = {"sd": (22, 30), "flux": (36, 20)}

_decode = jax.jit(vae.decode, static_argnames=("vae", "batch_chunk", "tile", "tile_overlap"))
_encode = jax.jit(vae.encode, static_argnames=("vae", "batch_chunk"))


def _randomise(model: torch.nn.Module) -> None:
  """Random weights everywhere (diffusers inits norms to 1 and 0, which hides mistakes)."""
  gen = torch.Generator().manual_seed(0)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=gen)
      scale_of_norm = "norm" in name and name.endswith("weight")
      p.copy_(1.0 + 0.2 * noise if scale_of_norm else 0.1 * noise)


class Checkpoint(NamedTuple):
  model: diffusers.AutoencoderKL  # The PyTorch reference.
  folder: str  # Its diffusers VAE folder.
  config: vae.VAEConfig  # As loaded by li_dit.io.diffusers_vae.
  params: Any


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Checkpoint]:
  out = {}
  for name, fields in CONFIGS.items():
    torch.manual_seed(0)
    model = diffusers.AutoencoderKL(**fields).eval()
    _randomise(model)
    folder = str(tmp_path_factory.mktemp(name) / "vae")
    model.save_pretrained(folder, safe_serialization=True)
    out[name] = Checkpoint(model, folder, *diffusers_vae.load_vae(folder))
  return out


def _nchw(x: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def _nhwc(x: torch.Tensor) -> np.ndarray:
  return x.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_from_diffusers(checkpoints, name):
  model, _, config, _ = checkpoints[name]
  fields = CONFIGS[name]
  assert config.block_out_channels == fields["block_out_channels"]
  assert config.latent_channels == fields["latent_channels"]
  assert config.use_quant_conv == (name == "sd") == config.use_post_quant_conv
  assert config.shift_factor == fields.get("shift_factor", 0.0)
  assert config.scaling_factor == model.config.scaling_factor
  assert config.downsampling_factor == 2 ** (len(fields["block_out_channels"]) - 1)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_encode_matches_diffusers(checkpoints, name):
  model, _, config, params = checkpoints[name]
  vae_model = vae.AutoencoderKL(config)
  images = np.random.default_rng(0).uniform(-1, 1, (2, *IMAGE_SIZES[name], 3)).astype(
      np.float32)
  mean, logvar = _encode(vae_model, params, images)
  with torch.no_grad():
    dist = model.encode(_nchw(images)).latent_dist
  f = config.downsampling_factor
  assert mean.shape == (2, IMAGE_SIZES[name][0] // f, IMAGE_SIZES[name][1] // f,
                        config.latent_channels)
  np.testing.assert_allclose(mean, _nhwc(dist.mean), rtol=0, atol=TOLERANCE)
  np.testing.assert_allclose(logvar, _nhwc(dist.logvar), rtol=0, atol=TOLERANCE)
  assert float(np.abs(_nhwc(dist.mean)).max()) > 0.1  # Not trivially small outputs.


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_decode_matches_diffusers(checkpoints, name):
  model, _, config, params = checkpoints[name]
  z = np.random.default_rng(1).normal(size=(2, 6, 4, config.latent_channels)).astype(np.float32)
  images = _decode(vae.AutoencoderKL(config), params, z)
  with torch.no_grad():
    expected = _nhwc(model.decode(_nchw(z)).sample)
  f = config.downsampling_factor
  assert images.shape == (2, 6 * f, 4 * f, 3) and images.dtype == jnp.float32
  np.testing.assert_allclose(images, expected, rtol=0, atol=TOLERANCE)
  assert float(np.abs(expected).max()) > 0.5


def test_latent_normalisation_and_sampling(checkpoints):
  config = checkpoints["flux"].config  # Shift and scale.
  z = np.random.default_rng(6).normal(size=(2, 4, 4, config.latent_channels))
  x = config.normalize(z)
  np.testing.assert_allclose(x, (z - config.shift_factor) * config.scaling_factor, rtol=1e-6)
  np.testing.assert_allclose(config.denormalize(x), z, rtol=1e-5, atol=1e-6)
  mean = jnp.full((4, 32, 32, 4), 0.5)
  draws = vae.sample(jax.random.key(1), mean, jnp.full(mean.shape, np.log(4.0)))
  assert abs(float(draws.mean()) - 0.5) < 0.1 and abs(float(draws.std()) - 2.0) < 0.1
  near_zero_variance = jnp.full(mean.shape, -30.0)
  np.testing.assert_allclose(vae.sample(jax.random.key(1), mean, near_zero_variance), mean,
                             rtol=0, atol=1e-5)


def test_batch_chunks_are_exact(checkpoints):
  torch_model, _, config, params = checkpoints["sd"]
  model = vae.AutoencoderKL(config)
  # Shapes of the parity tests: only the chunked programs are compiled here.
  z = np.random.default_rng(2).normal(size=(5, 6, 4, config.latent_channels)).astype(np.float32)
  chunked = np.asarray(_decode(model, params, z, batch_chunk=2))
  # Bitwise what each chunk gives on its own (the last one padded with a zero image) ...
  padded = np.concatenate([z, np.zeros_like(z[:1])])
  alone = np.concatenate([_decode(model, params, padded[i:i + 2]) for i in (0, 2, 4)])[:5]
  np.testing.assert_array_equal(chunked, alone)
  # ... which is the whole batch's up to the rounding of convolutions blocked for another batch
  # size: the decode parity test's tolerance holds for the chunks.
  with torch.no_grad():
    expected = _nhwc(torch_model.decode(_nchw(z)).sample)
  np.testing.assert_allclose(chunked, expected, rtol=0, atol=TOLERANCE)
  images = np.random.default_rng(3).uniform(-1, 1, (3, *IMAGE_SIZES["sd"], 3)).astype(
      np.float32)
  padded = np.concatenate([images, np.zeros_like(images[:1])])
  alone = [_encode(model, params, padded[i:i + 2]) for i in (0, 2)]
  for got, want in zip(_encode(model, params, images, batch_chunk=2), zip(*alone)):
    np.testing.assert_array_equal(got, np.concatenate(want)[:3])


def test_attention_query_chunks_are_exact():
  rng = np.random.default_rng(4)
  q, k, v = (rng.normal(size=(2, 63, 1, 16)).astype(np.float32) for _ in range(3))
  np.testing.assert_allclose(vae._attend(q, k, v, query_chunk=8),  # Chunks of 8 + padding.
                             vae._attend(q, k, v, query_chunk=64), rtol=0, atol=1e-6)


def test_tile_blending_is_a_partition_of_unity():
  """With a local decoder (nearest x4) tiling must give exactly the untiled output."""
  def local(z):
    return jnp.repeat(jnp.repeat(z[..., :3], 4, axis=1), 4, axis=2)
  z = np.random.default_rng(7).normal(size=(2, 23, 17, 4)).astype(np.float32)
  for tile, overlap in ((8, 2), (8, 0), (6, 5)):
    np.testing.assert_allclose(vae._decode_tiled(local, z, tile, overlap, 4, 3), local(z),
                               rtol=1e-6, atol=1e-6)  # Weighted means of equal values.
  with pytest.raises(ValueError, match="tile_overlap 8"):
    vae._decode_tiled(local, z, 8, 8, 4, 3)


def test_tiled_decode_of_a_large_image(checkpoints):
  model, _, config, params = checkpoints["sd"]
  z = np.random.default_rng(5).normal(size=(1, 48, 40, config.latent_channels)).astype(
      np.float32)
  with torch.no_grad():  # Untiled; ours matches it to TOLERANCE (one compilation fewer).
    whole = _nhwc(model.decode(_nchw(z)).sample)
  # 2 x 2 tiles of 32 latents with 16 of overlap (the tolerance `vae.decode` documents).
  tiled = np.asarray(_decode(vae.AutoencoderKL(config), params, z, tile=32, tile_overlap=16))
  assert tiled.shape == whole.shape
  relative_rms = np.sqrt(np.mean((tiled - whole) ** 2) / np.mean(whole ** 2))
  assert relative_rms < 0.1, relative_rms


def _copy(folder, tmp_path):
  target = str(tmp_path / "vae")
  shutil.copytree(folder, target)
  return target


def _rewrite_weights(folder, edit):
  path = os.path.join(folder, "diffusion_pytorch_model.safetensors")
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def _rewrite_config(folder, **fields):
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  config.update(fields)
  with open(path, "w") as f:
    json.dump(config, f)


def test_loading_errors_name_the_culprit(checkpoints, tmp_path):
  folder = checkpoints["sd"].folder
  with pytest.raises(FileNotFoundError, match="no config.json"):
    diffusers_vae.load_vae(str(tmp_path))

  no_weights = _copy(folder, tmp_path / "no_weights")
  os.remove(os.path.join(no_weights, "diffusion_pytorch_model.safetensors"))
  with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
    diffusers_vae.load_vae(no_weights)

  missing = _copy(folder, tmp_path / "missing")
  _rewrite_weights(missing, lambda t: t.pop("decoder.up_blocks.1.resnets.2.conv2.weight"))
  with pytest.raises(ValueError, match=r"decoder\.up_blocks\.1\.resnets\.2\.conv2\.weight .*"
                                       "missing"):
    diffusers_vae.load_vae(missing)

  misshaped = _copy(folder, tmp_path / "misshaped")
  _rewrite_weights(misshaped, lambda t: t.update(
      {"encoder.conv_in.weight": np.zeros((32, 3, 5, 5), np.float32)}))
  with pytest.raises(ValueError, match=r"encoder\.conv_in\.weight .*\(32, 3, 5, 5\), expected "
                                       r"\(32, 3, 3, 3\)"):
    diffusers_vae.load_vae(misshaped)

  extra = _copy(folder, tmp_path / "extra")
  _rewrite_weights(extra, lambda t: t.update({"encoder.extra.weight": np.zeros(3, np.float32)}))
  with pytest.raises(ValueError, match=r"encoder\.extra\.weight .*not part of"):
    diffusers_vae.load_vae(extra)

  bad_values = (
      (dict(down_block_types=["DownEncoderBlock2D", "AttnDownEncoderBlock2D",
                              "DownEncoderBlock2D"]), "down_block_types .*AttnDownEncoderBlock2D"),
      (dict(act_fn="gelu"), "act_fn 'gelu'"),
      (dict(norm_num_groups=24), "norm_num_groups 24"),
      (dict(latents_mean=[0.0] * 4), "latents_mean"),
      (dict(some_new_option=True), "field some_new_option = True"),
      (dict(_class_name="AutoencoderKLWan"), "AutoencoderKLWan"))
  for fields, message in bad_values:
    bad = _copy(folder, tmp_path / f"bad_{list(fields)[0]}")
    _rewrite_config(bad, **fields)
    with pytest.raises(ValueError, match=message) as error:
      diffusers_vae.load_vae(bad)
    assert "config.json" in str(error.value)


def test_legacy_attention_names_and_pipeline_folders(checkpoints, tmp_path):
  _, folder, config, params = checkpoints["sd"]
  pipeline = tmp_path / "pipeline"
  legacy = _copy(folder, pipeline)  # pipeline/vae, as in a diffusers pipeline folder.

  def to_legacy(tensors):
    for old, new in (("to_q", "query"), ("to_k", "key"), ("to_v", "value"),
                     ("to_out.0", "proj_attn")):
      for kind in ("weight", "bias"):
        tensors[f"encoder.mid_block.attentions.0.{new}.{kind}"] = tensors.pop(
            f"encoder.mid_block.attentions.0.{old}.{kind}")
    key = "decoder.mid_block.attentions.0.to_q.weight"  # As a 1x1 conv kernel.
    tensors[key] = tensors[key][:, :, None, None]

  _rewrite_weights(legacy, to_legacy)
  loaded_config, loaded = diffusers_vae.load_vae(str(pipeline))
  assert loaded_config == config
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  _, half = diffusers_vae.load_vae(str(pipeline), dtype=jnp.bfloat16)
  assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}


def test_bench_vae_runs_at_a_tiny_size(tmp_path, capsys):
  # In this process: a subprocess would spend more time importing torch and diffusers again
  # than benchmarking.
  spec = importlib.util.spec_from_file_location(
      "bench_vae", os.path.join(REPO, "tools", "bench_vae.py"))
  bench_vae = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(bench_vae)
  out = tmp_path / "bench.json"
  bench_vae.main(["--config", "tiny", "--size", "32", "--batch", "1", "--iters", "1",
                  "--json", str(out)])
  result = json.loads(out.read_text())
  assert set(result["images_per_sec"]) == {"encode", "decode"}
  for step in ("encode", "decode"):
    assert set(result["images_per_sec"][step]) == {"ours", "diffusers"}
    assert result["images_per_sec"][step]["ours"] > 0
  assert result["max_abs_diff"]["decode"] < TOLERANCE
  assert "ours/diffusers" in capsys.readouterr().out
