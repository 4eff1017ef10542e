"""tools/load_memory.py (host memory of loading a sharded checkpoint) and tools/bench_encode.py."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name, *args, timeout=900):
  proc = subprocess.run([sys.executable, os.path.join(REPO, "tools", name), *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_loading_a_sharded_checkpoint_stays_within_the_memory_bound(tmp_path):
  """A ~470 MB float32 checkpoint in 5 files: peak increase <= model + 1.5 x largest tensor."""
  out = tmp_path / "memory.json"
  stdout = _tool("load_memory.py", "--json", str(out))
  result = json.loads(out.read_text())
  print(stdout)
  assert result["num_files"] >= 2 and result["checkpoint_bytes"] > 300 << 20
  assert result["increase"] <= result["model_bytes"] + 1.5 * result["largest_tensor_bytes"]
  assert result["within_bound"] and "within the bound" in stdout


@pytest.mark.slow
def test_bench_encode_runs_at_a_tiny_size(tmp_path):
  out = tmp_path / "bench.json"
  stdout = _tool("bench_encode.py", "--batch", "2", "--repeats", "1", "--max-tokens", "8",
                 "--json", str(out))
  result = json.loads(out.read_text())
  assert set(result["tokens_per_sec"]) == {"torch", "ours_full", "ours_prefix_reuse"}
  assert all(v > 0 for v in result["tokens_per_sec"].values())
  # Same model, same rows: the two implementations agree (float32, massive activations ~2.5e4).
  assert result["max_abs_diff"] < 0.05
  assert "prefix reuse saves" in stdout
