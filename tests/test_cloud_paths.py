"""gs:// paths end to end against a local GCS emulator: tools/build_dataset.py reads its inputs
from and writes its dataset to a bucket, and the pipeline (TFDS metadata through etils.epath +
gcsfs, ArrayRecord shards through their C++ GCS reader, in grain worker processes) reads it back
byte for byte as it reads the same dataset built on local disk. A run's files in a bucket:
metrics, TensorBoard events, sample grids, and the checkpoint path orbax gets.

Orbax's checkpoints themselves (tensorstore's GCS driver) are not run here: this emulator
answers the conditional writes of their OCDBT manifest with generations tensorstore rejects
("Malformed StorageGeneration"), though a small save and restore works."""
import io
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath
from PIL import Image

from li_dit.data import build
from li_dit.data import pipeline
from li_dit.generation import generator as generator_lib
from li_dit.io import checkpoints
from li_dit.text import transforms
from li_dit.training import metrics as metrics_lib

import image_fixtures as fx
from test_pipeline import _BUCKETS, _assert_same, _first, _tfds_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "li-dit-test"


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture
def gcs(monkeypatch):
  """A fresh in-memory GCS emulator with one bucket; clients in this process and its children
  (the tool's workers, grain's workers) talk to it through the standard emulator variables."""
  from gcp_storage_emulator import server as emulator  # pylint: disable=g-import-not-at-top
  port = _free_port()
  gcs_server = emulator.create_server("127.0.0.1", port, in_memory=True, default_bucket=BUCKET)
  gcs_server.start()
  endpoint = f"http://127.0.0.1:{port}"
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", endpoint)  # gcsfs (epath's gs:// backend)
  monkeypatch.setenv("CLOUD_STORAGE_EMULATOR_ENDPOINT", endpoint)  # ArrayRecord's C++ reader
  import fsspec  # pylint: disable=g-import-not-at-top
  fsspec.filesystem("gs").clear_instance_cache()  # No client from an earlier emulator.
  try:
    yield f"gs://{BUCKET}"
  finally:
    fsspec.filesystem("gs").clear_instance_cache()
    gcs_server.stop()


def _upload(local: str, remote: epath.Path):
  for dirpath, _, files in os.walk(local):
    for name in files:
      path = os.path.join(dirpath, name)
      target = remote / os.path.relpath(path, local)
      target.parent.mkdir(parents=True, exist_ok=True)
      with open(path, "rb") as f:
        target.write_bytes(f.read())


def test_build_to_a_bucket_and_train_batches_from_it(tmp_path, gcs):
  folder = str(tmp_path / "in")
  sizes = fx.write_aspect_folder(folder, 42)
  broken = fx.broken_images()
  with open(os.path.join(folder, "truncated.jpg"), "wb") as f:  # counted remotely too
    f.write(broken["truncated.jpg"][0])
  with open(os.path.join(folder, "truncated.txt"), "w") as f:
    f.write("a broken file")
  _upload(folder, epath.Path(gcs) / "in")

  run = subprocess.run(
      [sys.executable, os.path.join(ROOT, "tools", "build_dataset.py"), "--input", f"{gcs}/in",
       "--out", f"{gcs}/data", "--name", "mixed", "--examples_per_shard", "10",
       "--workers", "2"], capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  build.build([folder], str(tmp_path / "data"), "mixed", examples_per_shard=10, workers=1)

  remote_dir = next((epath.Path(gcs) / "data" / "mixed").iterdir())
  local_dir = next((tmp_path / "data" / "mixed").iterdir())
  remote_summary = json.loads((remote_dir / "summary.json").read_text())
  local_summary = json.loads((local_dir / "summary.json").read_text())
  for summary in (remote_summary, local_summary):
    assert summary["written"] == 42 and summary["skipped"] == {"unreadable_image": 1}
  assert ({p.name for p in remote_dir.iterdir()} == {p.name for p in local_dir.iterdir()})

  transform = transforms.CaptionIds(sorted(sizes))
  # Past the end of the first epoch; the worker processes are closed before the emulator stops.
  remote = _first(pipeline.make_train_dataset(_tfds_config(f"{gcs}/data", num_workers=2),
                                              transform), 12)
  local = _first(pipeline.make_train_dataset(_tfds_config(str(tmp_path / "data")), transform), 12)
  for a, b in zip(remote, local):
    _assert_same(a, b)
    assert tuple(a["image"].shape[1:3]) in _BUCKETS


def test_missing_bucket_path_names_it(gcs):
  config = _tfds_config(f"{gcs}/nothing-here")
  with pytest.raises(ValueError, match=f"cannot open TFDS dataset 'mixed' in '{gcs}/nothing-here'"):
    pipeline.make_train_dataset(config, transforms.CaptionIds(["x"]))


def test_a_runs_files_go_to_a_bucket(gcs, tmp_path, monkeypatch):
  """metrics.jsonl (appended across a restart, though objects cannot be appended to),
  TensorBoard events, sample grids; orbax gets the checkpoint path as gs://, not made local."""
  run = epath.Path(gcs) / "runs" / "smoke"
  for steps in ((1, 2), (3,)):  # A run, then its resumed continuation.
    with metrics_lib.MetricWriter(str(run), resume_step=steps[0] - 1) as writer:
      for step in steps:
        writer.write(step, {"loss": 1.0 / step})
    time.sleep(1.1)  # TensorBoard event files are named by the second they were opened in.
  lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert lines == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5},
                   {"step": 3, "loss": 1 / 3}]
  events = list((run / "tensorboard").iterdir())
  assert len(events) == 2 and all(e.stat().length > 0 for e in events)

  images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8)
  generator_lib.save_grid(images, str(run / "samples" / "step_3.png"))
  grid = np.asarray(Image.open(io.BytesIO((run / "samples" / "step_3.png").read_bytes())))
  np.testing.assert_array_equal(grid[8:, :8], images[2])

  assert checkpoints.checkpoint_dir(str(run)) == f"{run}/checkpoints"
  monkeypatch.chdir(tmp_path)
  assert checkpoints.checkpoint_dir("runs/x") == str(tmp_path / "runs" / "x" / "checkpoints")
