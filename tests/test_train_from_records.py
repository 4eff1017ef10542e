"""The smoke config trains from datasets that tools/build_dataset.py built: the shapes source
written to disk, and the Noto emoji named by Unicode (Debian fonts-noto-color-emoji and
unicode-data), with cached or online text features. (Training on aspect-ratio buckets of a built
dataset: tools/rehearse.py, run by tests/test_rehearse.py; their batches: tests/test_pipeline.py.)"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from li_dit.data.synthetic import emoji

import image_fixtures as fx
import smoke_runs

TOOLS = os.path.join(smoke_runs.REPO, "tools")


def _tool(name, *args):
  result = subprocess.run([sys.executable, os.path.join(TOOLS, name), *args],
                          cwd=smoke_runs.REPO, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _build(tmp_path, source, name, *args):
  folder, data = str(tmp_path / f"{name}_in"), str(tmp_path / "data")
  _tool("make_image_folder.py", "--source", source, "--out", folder, *args)
  summary = json.loads(_tool("build_dataset.py", "--input", folder, "--out", data,
                             "--name", name, "--workers", "2"))
  return data, summary


def _train_on(tmp_path, name, data_dir, *overrides):
  """The smoke config on a built dataset; checks the run and returns its metrics."""
  workdir = str(tmp_path / "run")
  smoke_runs.train(workdir, 1, {}, "--config.input.source=tfds",
                   f"--config.input.tfds_name={name}", f"--config.input.data_dir={data_dir}",
                   *overrides)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    metrics = [json.loads(line) for line in f]
  assert [m["step"] for m in metrics] == list(range(1, 13))
  assert all(np.isfinite(m["loss"]) for m in metrics)
  assert os.path.exists(os.path.join(workdir, "samples", "step_12.png"))
  return metrics


# The runs here take 45-110 s each: slow, as the default suite must stay within 15 minutes on 2
# cores (it reads built datasets in test_pipeline, test_cloud_paths and test_latent_cache).
@pytest.mark.slow
def test_smoke_trains_from_the_shapes_source_on_disk(tmp_path):
  data, summary = _build(tmp_path, "shapes", "shapes_disk", "--num", "96")
  assert summary["written"] == 96 and summary["skipped_total"] == 0
  metrics = _train_on(tmp_path, "shapes_disk", data, "--config.text.encode=cached")
  assert all(m["skipped/unreadable_image"] == 0 and m["skipped_total"] == 0 for m in metrics)


@pytest.mark.slow
def test_a_rotted_record_is_counted_in_metrics_and_the_progress_line_across_a_resume(tmp_path):
  data = str(tmp_path / "data")
  fx.write_rotted_dataset(data, "rotted", num=16, rotten=3)
  workdir = str(tmp_path / "run")
  # Logs at steps 5, 10, 12 and checkpoints at 4, 8, 12: checkpoints fall between logs.
  overrides = ("--config.input.source=tfds", "--config.input.tfds_name=rotted",
               f"--config.input.data_dir={data}", "--config.log_every=5",
               "--config.checkpoint_every=4", "--config.keep_checkpoints=3")
  result = smoke_runs.train(workdir, 1, {}, *overrides)
  metrics = _metrics(workdir)
  # 12 steps of 8 records over 16 records: epoch e is steps 2e-1 and 2e, the rotten record once
  # in each.
  assert [m["step"] for m in metrics] == [5, 10, 12]
  assert sum(m["skipped/unreadable_image"] for m in metrics) == 6
  assert metrics[-1]["skipped_total"] == 6
  assert "skipped 6 bad records" in result.stdout
  # Each checkpoint holds the totals through its own step, unlogged steps included.
  for step, total in ((4, 2), (8, 4), (12, 6)):
    with open(os.path.join(workdir, "checkpoints", str(step), "counters", "metadata")) as f:
      counters = json.load(f)
    assert counters.pop("goodput/productive_s") > 0 and counters.pop("goodput/started_at") > 0
    assert counters == {"skipped/unreadable_image": total, "nonfinite_steps": 0}
  # Resumed from step 4, the run's total carries on from the checkpoint's.
  for step in (8, 12):
    shutil.rmtree(os.path.join(workdir, "checkpoints", str(step)))
  smoke_runs.train(workdir, 1, {}, *overrides)
  # What the first run logged after step 4 is dropped: each step is logged once.
  resumed = _metrics(workdir)
  assert [m["step"] for m in resumed] == [5, 10, 12]
  assert [m["skipped_total"] for m in resumed] == [m["skipped_total"] for m in metrics]


def _metrics(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
@pytest.mark.skipif(not (os.path.exists(emoji.FONT) and os.path.exists(emoji.EMOJI_TEST)),
                    reason="needs Debian's fonts-noto-color-emoji and unicode-data")
def test_smoke_trains_on_the_noto_emoji(tmp_path):
  data, summary = _build(tmp_path, "emoji", "noto_emoji", "--image_size", "32")
  assert summary["written"] == 3655 and summary["skipped_total"] == 0
  _train_on(tmp_path, "noto_emoji", data, "--config.input.num_workers=2",
            "--config.sample.prompts=('grinning face', 'red heart')")
