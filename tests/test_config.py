"""Configs: the shipped ones load and validate; bad overrides fail fast with a message naming the
flag or field; the parameter table of the paper's model sizes."""
import os
import re
import subprocess
import time
import sys

import pytest
from ml_collections import config_flags

from li_dit import config_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name, arg=None):
  path = os.path.join(REPO, "configs", name)
  return config_flags.config_flags._LoadConfigModule(name, path).get_config(arg)  # pylint: disable=protected-access


@pytest.mark.parametrize("name,arg", [("demo.py", None), ("demo.py", "smoke"),
                                      ("demo.py", "latent_smoke"),
                                      ("li_dit_1b.py", None), ("li_dit_10b.py", None),
                                      ("li_dit_10b.py", "1024")])
def test_shipped_configs_validate(name, arg):
  config = _load(name, arg)
  config_lib.validate(config)
  # Same schema as the defaults: a config file only changes values.
  assert set(config_lib.default_config().keys()) == set(config.keys())


def test_unknown_demo_variant():
  with pytest.raises(ValueError, match="unknown variant 'tiny'"):
    _load("demo.py", "tiny")


@pytest.mark.parametrize("field,value,message", [
    ("model.num_heads", 5, "config.model.width: 64 is not divisible by model.num_heads=5"),
    ("input.image_size", 31, "config.input.image_size: 31 is not divisible by model.patch_size"),
    ("text.encode", "offline", "config.text.encode: 'offline' is not one of"),
    ("model.dtype", "float16", "config.model.dtype: 'float16' is not one of"),
    ("vae.dtype", "float16", "config.vae.dtype: 'float16' is not one of"),
    ("sample.sampler", "ddim", "config.sample.sampler: 'ddim' is not one of"),
    ("model.remat", "save-everything", "config.model.remat: 'save-everything' is not one of"),
    ("model.attention", "flash", "config.model.attention: 'flash' is not one of"),
    ("optim.warmup_steps", 100, "config.optim.warmup_steps: must be in"),
    ("input.caption_dropout", 1.0, "config.input.caption_dropout: must be in"),
    ("input.relations", ("left", "beside"),
     "config.input.relations: ('left', 'beside') is not a non-empty subset of"),
    ("input.buckets", ((32, 32),) * 257, "config.input.buckets: at most 256 buckets, got 257"),
    ("input.buckets", ((32, 31),), "config.input.buckets: (32, 31) is not a (height, width)"),
    ("optim.accumulate_steps", 0, "config.optim.accumulate_steps: must be >= 1, got 0"),
    ("optim.accumulate_steps", 3,
     "config.optim.accumulate_steps: 3 does not divide input.batch_size=8"),
])
def test_validate_names_the_field(field, value, message):
  config = _load("demo.py", "smoke")
  section, key = field.split(".")
  config[section][key] = value
  with pytest.raises(config_lib.ConfigError, match=re.escape(message)):
    config_lib.validate(config)


@pytest.mark.parametrize("override,message", [
    ("--config.model.widht=3", "--config.model.widht=3: no such config key"),
    ("--config.model.width=abc", "flag --config.model.width=abc: invalid literal for int()"),
    ("--config.model.num_heads=5", "config.model.width: 64 is not divisible by model.num_heads=5"),
])
def test_train_cli_rejects_bad_overrides_before_anything_runs(tmp_path, override, message):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, "-m", "li_dit.train", "--config",
       os.path.join(REPO, "configs", "demo.py") + ":smoke", "--workdir", str(workdir), override],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (workdir / "checkpoints").exists()  # Nothing was built, let alone compiled.


def test_param_count_tool_prints_the_table():
  proc = subprocess.run(
      [sys.executable, os.path.join(REPO, "tools", "param_count.py"), "--config",
       os.path.join(REPO, "configs", "li_dit_1b.py"), "--depth", "1"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  rows = {l.split()[0]: int(l.split()[1].replace(",", "")) for l in lines
          if l and l.split()[0] in ("dit", "token_refiner_0", "token_refiner_1",
                                    "collaborative_refiner", "t_embedder", "total")}
  assert set(rows) == {"dit", "token_refiner_0", "token_refiner_1", "collaborative_refiner",
                       "t_embedder", "total"}
  assert rows["total"] == sum(v for k, v in rows.items() if k != "total")
  assert 0.9e9 < rows["total"] < 1.3e9  # "LI-DiT-1B"


def test_train_rejects_a_batch_the_data_parallel_devices_do_not_divide(tmp_path):
  workdir = tmp_path / "run"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
  start = time.perf_counter()
  proc = subprocess.run(
      [sys.executable, "-m", "li_dit.train", "--config",
       os.path.join(REPO, "configs", "demo.py") + ":smoke", "--workdir", str(workdir),
       "--config.mesh.data=3"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert ("config.input.batch_size=8 does not divide over the 3 data-parallel devices"
          in proc.stderr), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  assert not (workdir / "checkpoints").exists()
  print(f"rejected after {time.perf_counter() - start:.1f} s (before the LLM is loaded)")


def test_no_tpu_initialisation_noise_on_a_machine_without_one(tmp_path):
  """libtpu is installed here (the test extra) but there is no TPU: JAX keeps to the CPU, prints
  nothing of libtpu's, and leaves /tmp/libtpu_lockfile to the processes that compile for TPU.
  The train step's first use of JAX (the config check on a mesh) is part of the run."""
  env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
  for args in (["-m", "li_dit.train", "--help"],
               ["-m", "li_dit.train", "--config", "configs/demo.py:smoke", "--workdir",
                str(tmp_path / "run"), "--config.mesh.data=3"]):
    proc = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "libtpu", "InitGoogle",
                  "Unable to initialize backend 'tpu'"):
      assert noise not in proc.stderr, proc.stderr[-2000:]
  assert "config.mesh" in proc.stderr  # The second command ran as far as the mesh check.
