"""li_dit.sample on meshes: a smoke run with a wide bucket samples the same images on one device
and on fsdp=4 x tensor=2 (8 host devices), at its square and its wide size. Its own module, so
the test suite's workers run it beside tests/test_train.py's slow tests."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import smoke_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(cmd, env=None):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_sampling_on_meshes_and_at_a_bucket_size(tmp_path):
  """A run with a wide bucket samples the same images on one device and on fsdp=4 x tensor=2,
  at its square size and at its wide bucket; a size it did not train on is refused."""
  workdir = tmp_path / "run"
  proc = _run(smoke_runs.command(str(workdir), {}, "--config.total_steps=2",
                                 "--config.sample_every=0", "--config.input.num_workers=1",
                                 "--config.input.buckets=((32,32),(32,64))"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  grids = {}
  for mesh in ("data=1", "fsdp=4,tensor=2"):
    for size in ("32x32", "32x64"):
      out = tmp_path / f"{mesh}-{size}.png"
      result = _run(
          [sys.executable, "-m", "li_dit.sample", "--workdir", str(workdir), "--prompt",
           "a red circle", "--prompt", "two blue squares", "--out", str(out), "--steps", "3",
           "--scale", "1", "--mesh", mesh, "--size", size], env=smoke_runs.environment(8))
      assert result.returncode == 0, result.stderr[-3000:]
      grids[mesh, size] = np.asarray(Image.open(out)).astype(int)
  assert grids["data=1", "32x64"].shape == (32, 128, 3)  # two 32x64 images side by side
  for size in ("32x32", "32x64"):
    diff = np.abs(grids["data=1", size] - grids["fsdp=4,tensor=2", size]).max()
    print(f"{size}: largest pixel difference between the meshes {diff}")
    assert diff <= 2
  bad = _run([sys.executable, "-m", "li_dit.sample", "--workdir", str(workdir), "--prompt", "x",
              "--out", str(tmp_path / "x.png"), "--size", "64x32"])
  assert bad.returncode == 1 and "the run trained on 32x32, 32x64" in bad.stderr, bad.stderr
