"""A diverged run (configs/demo.py:smoke with a huge learning rate) skips and counts its
non-finite steps, stops with exit code 1 and one line naming the steps and the last checkpoint,
and never saves a non-finite parameter; keep_every keeps milestones the rotation would drop."""
import json
import os
import subprocess

import numpy as np
import pytest

import smoke_runs


@pytest.mark.slow
def test_a_diverged_run_stops_unsaved_and_keeps_its_good_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  result = subprocess.run(
      smoke_runs.command(workdir, {"data": 1}, "--config.optim.lr=1e9",
                         "--config.optim.max_nonfinite_steps=3", "--config.checkpoint_every=1",
                         "--config.keep_checkpoints=1", "--config.keep_every=2"),
      cwd=smoke_runs.REPO, env=smoke_runs.environment(1), capture_output=True, text=True,
      timeout=900)
  print(result.stdout[-2000:], result.stderr[-2000:])
  assert result.returncode == 1, result.stderr[-3000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("li_dit.train: diverged: 3 non-finite steps in a row"), message
  assert "Traceback" not in result.stderr

  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  flags = [int(r["nonfinite"]) for r in records]
  first = flags.index(1) + 1  # log_every=1: record i is step i + 1.
  # Once diverged, every step is non-finite: the skipped update leaves the same parameters, which
  # give the same non-finite result; the run stops after 3 of them, before logging a fourth.
  assert flags == [0] * (first - 1) + [1] * 3, flags
  assert [r["nonfinite_steps"] for r in records][-3:] == [1, 2, 3]
  assert f"from step {first}" in message
  assert "non-finite steps skipped" in result.stdout

  # Saved: every step until the one that stopped the run (a skipped step saves the unchanged,
  # finite state); kept: the newest, and for good the even ones.
  saved = list(range(1, first + 2))
  kept = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert kept == sorted({saved[-1], *(s for s in saved if s % 2 == 0)}), (kept, saved)
  assert f"the last checkpoint is step {saved[-1]}" in message
  for step in kept:
    assert all(np.isfinite(v).all() for v in smoke_runs.params(workdir, step).values()), step
