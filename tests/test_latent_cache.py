"""Datasets of latents (li_dit.data.latent_datasets, tools/encode_latents.py) on a tiny random
FLUX-layout VAE made offline: the pipeline's batches of a float32 dataset of latents give the train
step the x0 of online encoding; bad images are skipped and counted, an interrupted encode is
finished by a rerun; a config that does not fit the dataset fails before anything loads; and (slow)
a run on cached latents logs the losses of the online run."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

import image_fixtures as fx
import smoke_runs
import vae_fixtures
from li_dit import config_lib
from li_dit.data import build
from li_dit.data import latent_datasets
from li_dit.data import pipeline
from li_dit.data.synthetic import shapes
from li_dit.diffusion import image_space
from li_dit.text import encoders
from li_dit.text import transforms
from li_dit.training import loop
from test_latent import _latent_smoke  # pylint: disable=g-bad-import-order

NUM = 40  # Shapes records in the image dataset: 5 batches of 8.


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory) -> str:
  return vae_fixtures.save_tiny_vae(str(tmp_path_factory.mktemp("tiny_vae") / "vae"))


@pytest.fixture(scope="module")
def data(tmp_path_factory, vae_folder) -> str:
  """A data_dir with "shapes_px" (the first NUM shapes records, as built PNGs) and its latents
  "shapes_f32" and "shapes_f16"."""
  root = tmp_path_factory.mktemp("data")
  folder = root / "in"
  folder.mkdir()
  source = shapes.ShapesSource(image_size=32)
  for i in range(NUM):
    Image.fromarray(source[i]["image"]).save(folder / f"{i:06d}.png")
    (folder / f"{i:06d}.txt").write_text(source[i]["caption"])
  data_dir = str(root / "data")
  build.build([str(folder)], data_dir, "shapes_px", workers=1)
  config = _on(_latent_smoke(vae_folder), "shapes_px", data_dir)
  for name, dtype in (("shapes_f32", "float32"), ("shapes_f16", "float16")):
    latent_datasets.encode_dataset(config, data_dir, name, dtype=dtype, examples_per_shard=16)
  return data_dir


def _on(config, name: str, data_dir: str):
  config.input.update(source="tfds", tfds_name=name, data_dir=data_dir)
  return config


def _batches(config, n: int) -> list[dict[str, np.ndarray]]:
  transform = transforms.CaptionIds(shapes.train_captions(0) + [""])
  with iter(pipeline.make_train_dataset(config.input, transform)) as iterator:
    return [next(iterator) for _ in range(n)]


def test_cached_latents_give_the_train_step_the_online_x0(data, vae_folder):
  online = _on(_latent_smoke(vae_folder), "shapes_px", data)
  space = image_space.from_config(online)
  x0 = jax.jit(space.x0)
  rng = jax.random.key(7)
  expected = _batches(online, 6)  # Across an epoch boundary (5 batches per epoch).
  assert "image" in expected[0] and "latent_mean" not in expected[0]
  for name, atol in (("shapes_f32", 1e-5), ("shapes_f16", 2e-2)):
    cached = _batches(_on(_latent_smoke(vae_folder), name, data), 6)
    for want, got in zip(expected, cached):
      assert "image" not in got and got["latent_mean"].shape == (8, 8, 8, 16)
      assert got["latent_mean"].dtype == np.dtype(name.replace("shapes_f", "float"))
      # The same records in the same rows, with the same captions and dropout.
      np.testing.assert_array_equal(got["caption_id"], want["caption_id"])
      np.testing.assert_array_equal(got["skipped"], want["skipped"])
      a, b = x0(space.frozen(), want, rng), x0(space.frozen(), got, rng)
      np.testing.assert_allclose(b, a, rtol=0, atol=atol)
      assert np.abs(a).max() > 0.5  # Not vacuous: the latents are not near zero.

  metadata = json.loads((build.dataset_dir(data, "shapes_f32", "1.0.0") /
                         latent_datasets.METADATA).read_text())
  assert metadata["buckets"] == [[32, 32]] and metadata["channels"] == 16
  assert metadata["vae"]["config"]["shift_factor"] == vae_fixtures.TINY_FLUX["shift_factor"]


def _encode_cli(*args) -> dict:
  result = subprocess.run([sys.executable, "tools/encode_latents.py", *args], cwd=smoke_runs.REPO,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads(result.stdout)


def test_bad_images_are_skipped_and_counted_and_a_rerun_finishes(tmp_path, vae_folder):
  captions = fx.write_rotted_dataset(str(tmp_path), "rotted", num=8, rotten=5)
  args = ["--config", "configs/demo.py:latent_smoke", f"--config.vae.path={vae_folder}",
          "--config.input.source=tfds", "--config.input.tfds_name=rotted",
          f"--config.input.data_dir={tmp_path}", "--out", str(tmp_path / "out"),
          "--name", "rotted_latents", "--examples_per_shard", "3", "--batch_size", "2"]
  summary = _encode_cli(*args)
  assert summary["written"] == 7 and summary["skipped"] == {"unreadable_image": 1}
  assert summary["num_shards"] == 3 and summary["latents"]["dtype"] == "float16"

  records = _records(tmp_path / "out")
  assert [r["key"] for r in records] == [b"0", b"1", b"2", b"3", b"4", b"6", b"7"]
  assert [r["captions"][0].decode() for r in records] == captions[:5] + captions[6:]
  assert records[0]["latent_mean"].shape == (8, 8, 16)

  # An encode interrupted before its second shard was published: the rerun writes that shard
  # alone, with the same records.
  directory = build.dataset_dir(str(tmp_path / "out"), "rotted_latents", "1.0.0")
  shards = [build.shard_path(directory, "rotted_latents", i, 3) for i in range(3)]
  mtimes = [os.path.getmtime(s) for s in shards]
  shards[1].unlink()
  (directory / f"{shards[1].name}.counts.json").unlink()
  again = _encode_cli(*args)
  assert [os.path.getmtime(s) == m for s, m in zip(shards, mtimes)] == [True, False, True]
  for want, got in zip(records, _records(tmp_path / "out"), strict=True):
    assert want.keys() == got.keys()
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])
  assert {k: v for k, v in again.items() if k != "seconds"} == {
      k: v for k, v in summary.items() if k != "seconds"}


def _records(data_dir) -> list[dict]:
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return [dict(r) for r in tfds.data_source("rotted_latents", data_dir=str(data_dir))["train"]]


@pytest.mark.parametrize("case,message", [
    ("no_vae", "config.vae.path: empty, but dataset 'shapes_f32' in "),
    ("other_vae", "config.vae.path: the VAE in "),  # ... is not the one that encoded ...
    ("buckets", "config.input.buckets / config.input.image_size: dataset 'shapes_f32' in "),
    ("version", "config.input.tfds_name: dataset 'shapes_f32' in "),
])
def test_a_config_that_does_not_fit_the_dataset_fails_before_loading(
    data, vae_folder, tmp_path, monkeypatch, case, message):
  config = _on(_latent_smoke(vae_folder), "shapes_f32", data)
  if case == "no_vae":
    config.vae.path = ""
    config.model.channels = 3
  elif case == "other_vae":
    config.vae.path = vae_fixtures.save_tiny_vae(str(tmp_path / "other"), seed=1)
  elif case == "buckets":
    config.input.image_size = 64
  else:
    metadata = json.loads((build.dataset_dir(data, "shapes_f32", "1.0.0") /
                           latent_datasets.METADATA).read_text())
    monkeypatch.setattr(latent_datasets, "dataset_metadata",
                        lambda _: {**metadata, "format_version": 99})

  def no_loading(*args, **kwargs):
    raise AssertionError("something was loaded before the dataset was checked")
  monkeypatch.setattr(encoders, "build_encoders", no_loading)
  monkeypatch.setattr(image_space, "from_config", no_loading)
  with pytest.raises(config_lib.ConfigError) as error:
    loop.train(config, str(tmp_path / "run"))
  assert str(error.value).startswith(message), error.value


def _run(workdir: str, vae_folder: str, name: str, data: str, processes: int = 1) -> np.ndarray:
  """latent_smoke on dataset `name` for 6 steps, in `processes` processes of one device each
  (mesh data=processes); returns the losses."""
  command = smoke_runs.command(
      workdir, dict(data=processes), f"--config.vae.path={vae_folder}",
      "--config.input.source=tfds", f"--config.input.tfds_name={name}",
      f"--config.input.data_dir={data}", "--config.total_steps=6", "--config.sample_every=6",
      config="configs/demo.py:latent_smoke")
  if processes > 1:
    with socket.socket() as s:
      s.bind(("127.0.0.1", 0))
      command += ["--coordinator_address", f"127.0.0.1:{s.getsockname()[1]}",
                  "--num_processes", str(processes)]
  with smoke_runs.running([command + (["--process_id", str(i)] if processes > 1 else [])
                           for i in range(processes)], env=smoke_runs.environment(1)) as procs:
    for i, p in enumerate(procs):
      _, stderr = p.communicate(timeout=900)
      assert p.returncode == 0, f"process {i}: {stderr[-3000:]}"
  assert os.path.exists(os.path.join(workdir, "samples", "step_6.png"))
  return smoke_runs.losses(workdir)


@pytest.mark.slow
def test_cached_latents_and_two_processes_log_the_losses_of_online_encoding(
    data, vae_folder, tmp_path):
  """The same batches and draws: shapes_f32's float32 latents train as online encoding of
  shapes_px does, step by step, up to float rounding; so do 2 processes reading their halves of
  every batch's latents. (2 processes on pixels: tests/test_distributed.py.)"""
  online = _run(str(tmp_path / "online"), vae_folder, "shapes_px", data)
  assert len(online) == 6 and np.all(np.isfinite(online))
  np.testing.assert_allclose(_run(str(tmp_path / "cached"), vae_folder, "shapes_f32", data),
                             online, rtol=1e-4)
  smoke_runs.assert_losses_close(
      _run(str(tmp_path / "two_processes"), vae_folder, "shapes_f32", data, processes=2), online,
      "2 processes on shapes_f32")
