"""The run card (li_dit.training.run_card, tools/run_card.py): every size of the real configs is in
pixels, the latent side is derived through the VAE's factor, and LI-DiT-1B's 256px stage is the base
of the resolution shift; weight decay falls on kernels and embeddings only."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import pytest

from li_dit.diffusion import image_space
from li_dit.training import optim
from li_dit.training import run_card

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _card(spec: str, devices: int, **overrides):
  config = _config(spec)
  config.update_from_flattened_dict(overrides)
  return run_card.make(config, run_card.planned_encoders(config),
                       image_space.from_config(config, load=False),
                       run_card.mesh_sizes(config, devices))


@pytest.mark.parametrize("spec, devices, shift, median_t, latent, tokens, per_device", [
    ("configs/li_dit_1b.py", 256, 1.0, 0.5, 32, 256, 8),
    ("configs/li_dit_10b.py", 1024, 2.0, 2 / 3, 64, 1024, 4),
    ("configs/li_dit_10b.py:1024", 1024, 4.0, 0.8, 128, 4096, 4),
])
def test_the_documented_stages(spec, devices, shift, median_t, latent, tokens, per_device):
  card = _card(spec, devices)
  size = latent * 8
  assert card["image_size_px"] == size and card["latent_size"] == latent
  assert card["latent_channels"] == 16 and card["image_tokens"] == tokens
  assert card["time_shift"] == pytest.approx(shift) and card["median_t"] == pytest.approx(median_t)
  assert card["per_device_batch"] == per_device and card["devices"] == devices
  # Every bucket has about the square's pixels and tokens, in pixels and latents.
  for bucket in card["buckets"]:
    h, w = bucket["size_px"]
    assert bucket["latent"] == [h // 8, w // 8]
    assert abs(h * w / size ** 2 - 1) < 0.02 and abs(bucket["image_tokens"] / tokens - 1) < 0.02
  # Not on this machine: the paper's LLMs by their published architectures, template guessed.
  assert set(card["text_tokens"]) == {"llama3", "qwen15"}
  assert all(t["estimated"] and t["prompt"] == 136 for t in card["text_tokens"].values())
  params = card["trainable_parameters"]
  assert (1.0e9 < params < 1.2e9) if "1b" in spec else (10.0e9 < params < 11.0e9)
  assert card["model_tflops_per_step"] > 0


def test_a_stage_at_another_size_shifts_by_the_pixel_ratio():
  card = _card("configs/li_dit_1b.py", 256, **{"input.image_size": 512, "input.buckets": ()})
  assert card["latent_size"] == 64 and card["time_shift"] == pytest.approx(2.0)


def test_the_tool_prints_and_writes_the_card_of_the_demo(tmp_path):
  out = tmp_path / "card.json"
  result = subprocess.run(
      [sys.executable, "tools/run_card.py", "--config", "configs/demo.py:smoke", "--json",
       str(out), "--devices", "4", "--config.mesh.data=4"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  card = json.loads(out.read_text())
  assert card["image_size_px"] == card["latent_size"] == 32  # pixel space
  assert card["image_tokens"] == 64 and card["per_device_batch"] == 2
  # SmolLM2's tokenizer is installed: the real template, not an estimate.
  assert not card["text_tokens"]["smollm2"]["estimated"]
  assert card["text_tokens"]["smollm2"]["prompt"] == 16 + 6  # max_tokens + the chat suffix
  assert "run card: 32x32 px" in result.stdout and "time shift 1" in result.stdout
  bad = subprocess.run(
      [sys.executable, "tools/run_card.py", "--config", "configs/li_dit_1b.py", "--devices",
       "3"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert bad.returncode == 1 and "config.input.batch_size=2048 does not divide" in bad.stderr


@pytest.mark.parametrize("scan", [True, False])
def test_weight_decay_falls_on_kernels_and_embeddings_of_the_1b(scan):
  config = _config("configs/li_dit_1b.py")
  config.model.scan_layers = scan
  config.model.depth = 28 if scan else 2  # Unrolled: the same blocks, fewer of them.
  encoders = run_card.planned_encoders(config)
  abstract = run_card.abstract_params(config, encoders, image_space.from_config(config, load=False))
  mask = optim.decay_mask(abstract)  # Boxed leaves, as the optimizer is built from.
  leaves = jax.tree_util.tree_leaves_with_path(mask)
  decayed = {run_card.leaf_name(path) for path, leaf in leaves if leaf}
  names = {run_card.leaf_name(path) for path, _ in leaves}
  print(f"decayed, {len(decayed)} of {len(names)} leaves:")
  for name in sorted(decayed):
    print(f"  {name}")
  assert decayed == {name for name in names if name.endswith(("/kernel", "/embedding"))}
  blocks = "dit/blocks" if scan else "dit/block_0"
  for name in (f"{blocks}/self_attn/qkv/kernel", f"{blocks}/mlp/fc1/kernel",
               f"{blocks}/adaln/proj/kernel", "dit/pos_embed/conv1/kernel",
               "dit/patch_embed/kernel"):
    assert name in decayed, name
  for name in (f"{blocks}/adaln/proj/bias", f"{blocks}/self_attn/q_norm/scale",
               f"{blocks}/self_attn/qkv/bias", "dit/final_adaln/proj/bias",
               "dit/pos_embed/conv1/bias"):
    assert name in names and name not in decayed, name
