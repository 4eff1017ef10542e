"""A damaged newest checkpoint (truncated files, a missing item, a config that does not read) is
reported, moved aside to
<step>.damaged and the one before it used, by training's resume, li_dit.sample and
tools/export_torch.py; a checkpoint that does not fit the model is a config error that moves
nothing."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

import smoke_runs


def _run(cmd):
  return subprocess.run(cmd, cwd=smoke_runs.REPO, env=smoke_runs.environment(1),
                        capture_output=True, text=True, timeout=900)


def _steps(workdir):
  return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


@pytest.mark.slow
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_one_before_used(tmp_path):
  workdir = str(tmp_path / "run")
  common = ["--config.checkpoint_every=2", "--config.keep_checkpoints=3",
            "--config.sample_every=0"]
  smoke_runs.train(workdir, 1, {"data": 1}, "--config.total_steps=6", *common)
  assert [s for s in _steps(workdir) if s.isdigit()] == ["2", "4", "6"]

  # Truncate every file of step 6's params to half its size.
  for path in glob.glob(os.path.join(workdir, "checkpoints", "6", "params", "**", "*"),
                        recursive=True):
    if os.path.isfile(path):
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
  result = _run(smoke_runs.command(workdir, {"data": 1}, "--config.total_steps=8", *common))
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint step 6 is damaged (item params: " in result.stderr
  assert "resumed from step 4 in" in result.stdout
  assert "6.damaged" in _steps(workdir)
  assert [s for s in _steps(workdir) if s.isdigit()] == ["4", "6", "8"]

  # A config that does not read (the model's shapes come from it): li_dit.sample uses the step
  # before and says which.
  with open(os.path.join(workdir, "checkpoints", "8", "config", "metadata"), "w") as f:
    f.write('{"model": ')
  out = tmp_path / "grid.png"
  result = _run([sys.executable, "-m", "li_dit.sample", "--workdir", workdir, "--prompt", "x",
                 "--out", str(out), "--steps", "2"])
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint step 8 is damaged (item metadata: " in result.stderr
  assert "from step 6 of" in result.stdout and out.exists()
  assert {"6.damaged", "8.damaged"} <= set(_steps(workdir))

  # The PyTorch export falls back the same way, and names the step it exported.
  shutil.rmtree(os.path.join(workdir, "checkpoints", "6", "params"))
  result = _run([sys.executable, "tools/export_torch.py", "--workdir", workdir,
                 "--out", str(tmp_path / "export")])
  assert result.returncode == 0, result.stderr[-3000:]
  # The export reads the item's shapes from the metadata, where the missing item shows first.
  assert "checkpoint step 6 is damaged (item metadata: \"Unknown key: params." in result.stderr
  assert "export_torch: step 4 of" in result.stdout
  assert {"6.damaged.1", "8.damaged"} <= set(_steps(workdir))

  # A checkpoint that does not fit the model (another width): one line, nothing moved aside.
  before = _steps(workdir)
  result = _run(smoke_runs.command(workdir, {"data": 1}, "--config.total_steps=10",
                                   "--config.model.width=48", *common))
  assert result.returncode == 1, result.stderr[-3000:]
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  assert "has shape" in result.stderr.strip().splitlines()[-1]
  assert _steps(workdir) == before
