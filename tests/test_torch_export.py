"""The PyTorch export: tools/export_torch.py on smoke-trained runs, li_dit/export/torch/model.py
against the JAX model (float32, the same inputs), li_dit.torch_pipeline against li_dit.sample (the
same prompts and initial noise), the standalone module in a fresh virtual environment without jax,
and the errors of a wrong step, format, or file.

One trained run per config, shared by the module's tests: the default suite trains the one-LLM
smoke config for 4 steps; the two-LLM and latent runs, the pipelines and the fresh environment
are slow.
"""
import json
import os
import shutil
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.torch
import torch

import vae_fixtures
from li_dit.export.torch import exporter
from li_dit.export.torch import model as torch_model
from li_dit.generation import load
from li_dit.models import lidit

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(REPO, "tools", "export_torch.py")
STEPS = 4  # Checkpoints at 2 and 4: enough to pick a step, and weights that left their init.
PROMPTS = ["a red circle to the left of a blue square", "two purple squares", "a green triangle"]
# The bound of the issue: the PyTorch denoiser's float32 output against the JAX model's.
PARITY_ATOL = 1e-4


def _train(workdir: str, variant: str, *overrides: str) -> str:
  result = subprocess.run(
      [sys.executable, "-m", "li_dit.train", "--config", f"configs/demo.py:{variant}",
       "--workdir", workdir, f"--config.total_steps={STEPS}",
       f"--config.checkpoint_every={STEPS // 2}", "--config.sample_every=0",
       "--config.optim.warmup_steps=1", *overrides],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir


def _export_cli(workdir: str, out: str, *flags: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, TOOL, "--workdir", workdir, "--out", out, *flags],
                        cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory) -> str:
  return _train(str(tmp_path_factory.mktemp("smoke_run")), "smoke")


@pytest.fixture(scope="module")
def smoke_export(smoke_run, tmp_path_factory) -> str:
  out = str(tmp_path_factory.mktemp("smoke_export"))
  result = _export_cli(smoke_run, out)
  assert result.returncode == 0, result.stderr[-3000:]
  assert f"step {STEPS} of {smoke_run} (params, float32)" in result.stdout
  return out


@pytest.fixture(scope="module")
def two_llm_export(tmp_path_factory) -> tuple[str, str]:
  """(workdir, export folder) of the two-LLM smoke config."""
  workdir = _train(str(tmp_path_factory.mktemp("two_llm_run")), "two_llms_smoke")
  out = str(tmp_path_factory.mktemp("two_llm_export"))
  exporter.export(workdir, out)
  return workdir, out


@pytest.fixture(scope="module")
def latent_export(tmp_path_factory) -> tuple[str, str]:
  vae = vae_fixtures.save_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae") / "vae"))
  workdir = _train(str(tmp_path_factory.mktemp("latent_run")), "latent_smoke",
                   f"--config.vae.path={vae}")
  out = str(tmp_path_factory.mktemp("latent_export"))
  exporter.export(workdir, out)
  return workdir, out


# -- the denoiser against the JAX model -----------------------------------------------------------
def _inputs(widths, size: int, channels: int, seed: int = 0):
  """x NHWC [3,size,size,C], t [3] and per LLM (prefix, tokens, mask) with padding: rows of
  9, 4 and 1 valid tokens, prefixes of different lengths, features of LLM-like scale."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((3, size, size, channels)).astype(np.float32)
  t = np.array([0.9, 0.5, 0.1], np.float32)
  feats = []
  for i, width in enumerate(widths):
    mask = np.arange(9)[None, :] < np.array([9, 4, 1])[:, None]
    feats.append(((3 * rng.standard_normal((5 + i, width))).astype(np.float32),
                  (3 * rng.standard_normal((3, 9, width))).astype(np.float32), mask))
  return x, t, feats


def _jax_velocity(model: lidit.LIDiT, params, x, t, feats) -> np.ndarray:
  text = [lidit.TextFeatures(*(jnp.asarray(a) for a in f)) for f in feats]
  return np.asarray(jax.jit(model.apply)({"params": params}, x, t, text))


def _torch_velocity(model: torch_model.LIDiT, x, t, feats) -> np.ndarray:
  """The torch model on the same inputs, NHWC in and out like the JAX model's."""
  text = [torch_model.TextFeatures(*(torch.from_numpy(a) for a in f)) for f in feats]
  with torch.no_grad():
    out = model(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(t), text)
  return out.float().permute(0, 2, 3, 1).numpy()


def _parity(workdir: str, out: str) -> float:
  """max |torch - JAX| of the exported denoiser and of the checkpoint it came from."""
  config, params, _ = exporter.restore_params(workdir, None, ema=False)
  model = torch_model.LIDiT.from_pretrained(out)
  arch = model.arch
  # Any size the patch divides: the model has no fixed resolution. A 4x4 token grid.
  x, t, feats = _inputs(arch.llm_widths, 4 * arch.patch_size, arch.channels)
  want = _jax_velocity(lidit.build_model(config, len(arch.llm_widths)), params, x, t, feats)
  got = _torch_velocity(model, x, t, feats)
  assert np.abs(want).max() > 0.05  # Trained weights: the output is no longer zero.
  return float(np.abs(got - want).max())


def test_export_writes_weights_config_and_card(smoke_run, smoke_export):
  with open(os.path.join(smoke_export, "config.json")) as f:
    config = json.load(f)
  assert config["format_version"] == torch_model.FORMAT_VERSION
  assert config["llms"] == [dict(name="smollm2", path="smollm2-135m-instruct", layer=-3,
                                 template="paper", max_tokens=16, dtype="float32",
                                 hidden_size=576)]
  assert config["vae"] is None and config["image_size"] == 32
  assert config["objective"]["name"] == "rectified_flow"
  assert config["sampler"] == dict(sampler="euler", steps=4, cfg=4.0, seed=0, shift_base_size=32,
                                   shift_base=1.0)
  assert config["source"] == dict(workdir=smoke_run, step=STEPS, params="params")
  with safetensors.safe_open(os.path.join(smoke_export, "model.safetensors"), "pt") as f:
    # PyTorch layouts: Linear [out, in]; Conv2d [out, in, kh, kw]; one tensor per DiT block.
    assert f.get_slice("dit.blocks.1.self_attn.qkv.weight").get_shape() == [3 * 64, 64]
    assert f.get_slice("dit.blocks.1.self_attn.out.weight").get_shape() == [64, 64]
    assert f.get_slice("dit.pos_embed.conv1.weight").get_shape() == [64, 64, 5, 5]
    assert f.get_slice("token_refiners.0.input_proj.weight").get_shape() == [64, 576]
    assert "dit.blocks.2.adaln.proj.weight" not in f.keys()
  with open(os.path.join(smoke_export, "README.md")) as f:
    assert "python -m li_dit.torch_pipeline --model" in f.read()


def test_denoiser_matches_jax_one_llm(smoke_run, smoke_export):
  diff = _parity(smoke_run, smoke_export)
  print(f"one LLM (configs/demo.py:smoke): max |torch - JAX| = {diff:.3g}")
  assert diff <= PARITY_ATOL


@pytest.mark.slow
def test_denoiser_matches_jax_two_llms(two_llm_export):
  """configs/demo.py:two_llms_smoke, SmolLM2 and Gemma-3 fused by the collaborative refiner:
  trained, and exported."""
  workdir, _ = two_llm_export
  with open(os.path.join(workdir, "config.json")) as f:
    assert sorted(json.load(f)["text"]["llms"]) == ["gemma3", "smollm2"]
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    losses = [json.loads(line)["loss"] for line in f]
  assert losses and all(np.isfinite(losses))
  diff = _parity(*two_llm_export)
  print(f"two LLMs (configs/demo.py:two_llms_smoke): max |torch - JAX| = {diff:.3g}")
  assert diff <= PARITY_ATOL


@pytest.mark.parametrize("scan_layers,llm_widths,pos_kernel_size", [
    (True, (24, 40), 3), (False, (24, 40, 16), 4)])
def test_random_weights_match_jax(scan_layers, llm_widths, pos_kernel_size):
  """Every weight random (no zero-initialised gate hides a path): scanned and unrolled DiT
  blocks, two and three LLM branches, an even positional kernel (SAME padding)."""
  arch = torch_model.Architecture(patch_size=2, channels=3, width=32, depth=2, num_heads=2,
                                  mlp_ratio=4.0, qk_norm=True, pos_kernel_size=pos_kernel_size,
                                  refiner_depth=2, llm_widths=llm_widths)
  model = lidit.LIDiT(lidit.ModelConfig(
      patch_size=2, channels=3, width=32, depth=2, num_heads=2, pos_kernel_size=pos_kernel_size,
      scan_layers=scan_layers), num_llms=len(llm_widths))
  x, t, feats = _inputs(llm_widths, 8, 3)
  text = [lidit.TextFeatures(*(jnp.asarray(a) for a in f)) for f in feats]
  shapes = jax.eval_shape(lambda: nn.unbox(model.init(jax.random.key(0), x, t, text)["params"]))
  leaves, tree = jax.tree_util.tree_flatten(shapes)
  rng = np.random.default_rng(1)
  params = jax.tree_util.tree_unflatten(
      tree, [(0.1 * rng.standard_normal(leaf.shape)).astype(np.float32) for leaf in leaves])
  torch_lidit = torch_model.LIDiT(arch)
  torch_lidit.load_state_dict({k: torch.from_numpy(v)
                               for k, v in exporter.torch_state_dict(params).items()})
  want = _jax_velocity(model, params, x, t, feats)
  diff = float(np.abs(_torch_velocity(torch_lidit, x, t, feats) - want).max())
  print(f"random weights, {len(llm_widths)} LLMs: max |torch - JAX| = {diff:.3g} "
        f"(outputs up to {np.abs(want).max():.3g})")
  assert np.abs(want).max() > 1 and diff <= PARITY_ATOL


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_sampler_matches_jax(sampler):
  """Time grid, shift, CFG and the Euler/Heun steps on a denoiser whose halves differ."""
  from li_dit.diffusion import samplers
  noise = np.random.default_rng(0).standard_normal((2, 3, 4, 4)).astype(np.float32)
  sign = np.array([1.0, 1.0, -0.5, -0.5], np.float32)[:, None, None, None]  # cond, uncond rows

  def jax_denoise(x, t):
    return jnp.tanh(x) * sign + t[:, None, None, None] * x

  def torch_denoise(x, t):
    return torch.tanh(x) * torch.from_numpy(sign) + t[:, None, None, None] * x
  want = samplers.sample(jax_denoise, jnp.asarray(noise), 5, 3.0, sampler, shift=1.7)
  got = torch_model.sample(torch_denoise, torch.from_numpy(noise), 5, 3.0, sampler, shift=1.7)
  np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-5)


def test_torch_side_does_not_import_jax():
  code = ("import sys; import li_dit.export.torch.model, li_dit.export.torch.pipeline, "
          "li_dit.torch_pipeline; "
          "print(sorted(m for m in ('jax', 'flax', 'jaxlib') if m in sys.modules))")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.strip() == "[]"


def test_ema_and_step_choose_what_is_exported(smoke_run, tmp_path):
  config = exporter.export(smoke_run, str(tmp_path), step=STEPS // 2, ema=True)
  assert config["source"] == dict(workdir=smoke_run, step=STEPS // 2, params="ema_params")
  _, ema, _ = exporter.restore_params(smoke_run, STEPS // 2, ema=True)
  want = exporter.torch_state_dict(ema)
  got = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
  assert got.keys() == want.keys()
  for name, value in want.items():
    np.testing.assert_array_equal(got[name].numpy(), value, err_msg=name)


def test_bfloat16_export_loads_and_runs(smoke_run, smoke_export, tmp_path):
  exporter.export(smoke_run, str(tmp_path), dtype="bfloat16")
  model = torch_model.LIDiT.from_pretrained(str(tmp_path))
  assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
  x, t, feats = _inputs(model.arch.llm_widths, 16, 3)
  got = _torch_velocity(model, x, t, feats)
  want = _torch_velocity(torch_model.LIDiT.from_pretrained(smoke_export), x, t, feats)
  print(f"bfloat16 export: max |bf16 - f32| = {np.abs(got - want).max():.3g} "
        f"(outputs up to {np.abs(want).max():.3g})")
  assert got.dtype == np.float32 and np.abs(got - want).max() <= 0.05 * np.abs(want).max()


# -- clear errors ----------------------------------------------------------------------------------
def test_missing_step_names_the_available_ones(smoke_run, tmp_path):
  result = _export_cli(smoke_run, str(tmp_path / "out"), "--step", "3")
  assert result.returncode != 0
  assert "export_torch: no checkpoint for step 3 in " in result.stderr, result.stderr[-2000:]
  assert f"available steps: [{STEPS // 2}, {STEPS}]" in result.stderr
  assert not os.path.exists(tmp_path / "out")
  with pytest.raises(Exception, match="no checkpoints in /nonexistent/run"):
    exporter.export("/nonexistent/run", str(tmp_path / "out"))


def _copy(export: str, tmp_path) -> str:
  folder = str(tmp_path / "copy")
  shutil.copytree(export, folder)
  return folder


def test_unknown_format_version_is_named(smoke_export, tmp_path):
  folder = _copy(smoke_export, tmp_path)
  path = os.path.join(folder, "config.json")
  with open(path) as f:
    config = json.load(f)
  with open(path, "w") as f:
    json.dump({**config, "format_version": 99}, f)
  with pytest.raises(torch_model.ExportError, match="format_version 99 is not supported"):
    torch_model.LIDiT.from_pretrained(folder)


def test_missing_and_misshaped_tensors_are_named(smoke_export, tmp_path):
  folder = _copy(smoke_export, tmp_path)
  path = os.path.join(folder, "model.safetensors")
  tensors = safetensors.torch.load_file(path)
  del tensors["dit.blocks.1.cross_attn.k_norm.weight"]
  tensors["token_refiners.0.pool_proj.weight"] = torch.zeros(64, 512)
  safetensors.torch.save_file(tensors, path)
  with pytest.raises(torch_model.ExportError) as error:
    torch_model.LIDiT.from_pretrained(folder)
  message = str(error.value)
  assert "missing: dit.blocks.1.cross_attn.k_norm.weight" in message, message
  assert ("token_refiners.0.pool_proj.weight has shape [64, 512], the model needs [64, 576]"
          in message), message


# -- the whole pipeline against li_dit.sample ------------------------------------------------------
def _psnr(a: np.ndarray, b: np.ndarray) -> float:
  mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
  return float("inf") if mse == 0 else float(10 * np.log10(255.0 ** 2 / mse))


def _pipeline_psnr(workdir: str, out: str, tmp_path) -> float:
  """PSNR of `python -m li_dit.torch_pipeline` against li_dit.sample's images of the same
  prompts from the same initial noise, both with the run's sampler defaults."""
  seed = 3
  # What `python -m li_dit.sample --workdir W --noema --seed 3 --prompt ...` computes.
  config, generator, params, _ = load.load_run(workdir, ema=False)
  want = generator(params, PROMPTS, seed=seed, steps=config.sample.steps,
                   cfg_scale=config.sample.cfg, sampler=config.sample.sampler)
  # The Generator's noise, NHWC -> the pipeline's NCHW.
  noise = generator.noise(seed, len(PROMPTS), (config.input.image_size,) * 2)
  np.save(tmp_path / "noise.npy", np.asarray(noise).transpose(0, 3, 1, 2))
  image = tmp_path / "images.png"
  result = subprocess.run(
      [sys.executable, "-m", "li_dit.torch_pipeline", "--model", out, "--noise",
       str(tmp_path / "noise.npy"), "--out", str(image)]
      + [arg for p in PROMPTS for arg in ("--prompt", p)],
      cwd=REPO, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  from PIL import Image
  strip = np.asarray(Image.open(image))  # [H, B*W, 3]: the images side by side.
  size = want.shape[1]
  got = strip.reshape(size, len(PROMPTS), size, 3).transpose(1, 0, 2, 3)
  return _psnr(got, want)


@pytest.mark.slow
def test_pipeline_matches_li_dit_sample(two_llm_export, tmp_path):
  """SmolLM2 through its chat template beside Gemma-3 (no chat template): two LLMs, as the real
  configs have (one LLM's denoiser: test_denoiser_matches_jax_one_llm)."""
  psnr = _pipeline_psnr(*two_llm_export, tmp_path)
  print(f"pixel space, two LLMs: PSNR(torch pipeline, li_dit.sample) = {psnr:.1f} dB")
  assert psnr >= 40


@pytest.mark.slow
def test_latent_pipeline_matches_li_dit_sample(latent_export, tmp_path):
  workdir, out = latent_export
  with open(os.path.join(out, "config.json")) as f:
    assert json.load(f)["vae"]["path"].endswith("vae")
  diff = _parity(workdir, out)
  psnr = _pipeline_psnr(workdir, out, tmp_path)
  print(f"latent space (tiny FLUX-layout VAE): max |torch - JAX| = {diff:.3g}, "
        f"PSNR(torch pipeline, li_dit.sample) = {psnr:.1f} dB")
  assert diff <= PARITY_ATOL and psnr >= 40


# -- the standalone module without jax -------------------------------------------------------------
@pytest.mark.slow
def test_fresh_venv_runs_the_standalone_module(smoke_run, smoke_export, tmp_path):
  """A virtual environment with nothing but torch and safetensors, the one file
  li_dit/export/torch/model.py on its path (as torch_model.py): it loads the export and gives the
  JAX model's output, without jax."""
  venv = tmp_path / "venv"
  subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
  python = str(venv / "bin" / "python")
  result = subprocess.run([python, "-m", "pip", "install", "-q", "torch==2.13.0",
                           "safetensors==0.8.0"], capture_output=True, text=True, timeout=1800)
  assert result.returncode == 0, result.stderr[-3000:]
  standalone = tmp_path / "standalone"
  standalone.mkdir()
  shutil.copy(os.path.join(REPO, "li_dit", "export", "torch", "model.py"),
              standalone / "torch_model.py")

  config, params, _ = exporter.restore_params(smoke_run, None, ema=False)
  x, t, feats = _inputs((576,), 16, 3)
  want = _jax_velocity(lidit.build_model(config, 1), params, x, t, feats)
  (prefix, tokens, mask), = feats
  safetensors.torch.save_file(
      {name: torch.from_numpy(np.ascontiguousarray(a)) for name, a in dict(
          x=x.transpose(0, 3, 1, 2), t=t, prefix=prefix, tokens=tokens, mask=mask,
          want=want.transpose(0, 3, 1, 2)).items()}, str(tmp_path / "io.safetensors"))
  script = f"""
import sys
import safetensors.torch, torch
import torch_model
io = safetensors.torch.load_file({str(tmp_path / 'io.safetensors')!r})
model = torch_model.LIDiT.from_pretrained({smoke_export!r})
with torch.no_grad():
  got = model(io["x"], io["t"], [torch_model.TextFeatures(io["prefix"], io["tokens"], io["mask"])])
print("max_diff", float((got - io["want"]).abs().max()))
print("imported", sorted(m for m in ("jax", "flax", "numpy", "li_dit") if m in sys.modules))
"""
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
  result = subprocess.run([python, "-c", script], cwd=str(standalone), env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  lines = dict(line.split(" ", 1) for line in result.stdout.strip().splitlines())
  print(f"fresh venv (torch + safetensors only): max |torch - JAX| = {lines['max_diff']}")
  assert float(lines["max_diff"]) <= PARITY_ATOL
  assert "jax" not in lines["imported"] and "flax" not in lines["imported"]
  assert "li_dit" not in lines["imported"]
