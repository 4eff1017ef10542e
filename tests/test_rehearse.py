"""tools/rehearse.py: LI-DiT-1B's pod path end to end on 8 host devices, shrunk (tiny LLMs of its
LLaMA-3 and Qwen2 layouts, a tiny 16-channel 8x VAE, splash attention, bf16, buckets), every
stage passing; and the tiny frozen models it is built on load as the real ones do."""
import json
import os
import subprocess
import sys

import pytest

from li_dit.io import diffusers_vae
from li_dit.io import tiny
from li_dit.text import encoders
from li_dit.text import prompts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("architecture, family, chat_suffix", [
    ("Meta-Llama-3-8B-Instruct", "llama", "<|eot_id|><|start_header_id|>assistant"),
    ("Qwen1.5-7B-Chat", "qwen2", "<|im_end|>\n<|im_start|>assistant"),
])
def test_tiny_llms_load_with_their_chat_templates(tmp_path, architecture, family, chat_suffix):
  folder = tiny.llm_folder(str(tmp_path / "llm"), architecture, ["a red circle"])
  encoder = encoders.PromptEncoder(name="x", path=folder, max_tokens=8)
  assert encoder.config.family == family and encoder.width == tiny.TINY_LLM["hidden_size"]
  suffix = encoder.tokenizer.decode(encoder.layout.suffix_ids)
  assert suffix.startswith(chat_suffix)
  prefix = encoder.tokenizer.decode(encoder.layout.prefix_ids)
  assert prompts.INSTRUCTION in prefix and prompts.SYSTEM_PROMPT in prefix


def test_tiny_vae_has_the_published_latent_layout(tmp_path):
  config, params = diffusers_vae.load_vae(tiny.vae_folder(str(tmp_path / "vae")))
  assert (config.latent_channels, config.downsampling_factor) == (16, 8)
  assert (config.scaling_factor, config.shift_factor) == (0.3611, 0.1159)
  assert params["encoder"]["conv_in"]["kernel"].shape[-1] == 8


@pytest.mark.slow
def test_the_1b_rehearsal_passes_every_stage(tmp_path):
  out = tmp_path / "rehearsal.json"
  result = subprocess.run(
      [sys.executable, "tools/rehearse.py", "--config", "configs/li_dit_1b.py", "--json",
       str(out), "--workdir", str(tmp_path / "rehearsal")],  # Its stages' logs stay there.
      cwd=REPO, capture_output=True, text=True, timeout=2400)
  print(result.stdout[-4000:])
  report = json.loads(out.read_text())
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  stages = report["stages"]
  assert list(stages) == ["run_card", "fixtures", "train", "resume", "stage2", "sample",
                          "evaluate", "export"]
  assert all(s["ok"] for s in stages.values())
  assert stages["run_card"]["time_shift"] == 1.0 and stages["run_card"]["image_tokens"] == 256
  assert stages["train"]["exit_code"] == 143 and stages["stage2"]["time_shift"] == 2.0
  assert stages["fixtures"]["tiny_llms"] == ["llama3", "qwen15"] and stages["fixtures"]["tiny_vae"]
