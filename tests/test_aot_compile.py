"""tools/aot_compile.py: the real train step compiled for TPU topologies by libtpu on this CPU."""
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# These processes only compile for TPU topologies, so several may load libtpu at once (xdist
# workers, another test's tool): without this, libtpu's /tmp/libtpu_lockfile lets one in at a time.
LIBTPU_ENV = {**os.environ, "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}


def _aot(tmp_path, *args):
  """Runs the tool in its own process (libtpu serves one topology per process)."""
  out = tmp_path / "plan.json"
  result = subprocess.run(
      [sys.executable, "tools/aot_compile.py", "--json", str(out), *args], cwd=REPO,
      capture_output=True, text=True, timeout=900, env=LIBTPU_ENV)
  plan = json.loads(out.read_text()) if out.exists() else None
  return result, plan


@pytest.mark.slow
def test_smoke_plan_fits_and_fsdp_shards_the_llm(tmp_path):
  common = ["--config", "configs/demo.py:smoke", "--topology", "v5e:2x2"]
  result, fsdp = _aot(tmp_path, *common, "--config.mesh.data=1", "--config.mesh.fsdp=4")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "fits: peak" in result.stdout
  assert fsdp["chips"] == 4 and fsdp["device_kind"] == "TPU v5 lite" and fsdp["fits"]
  assert fsdp["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
  assert 0 < fsdp["arguments_gib"] < fsdp["peak_gib"] < fsdp["hbm_per_chip_gib"]
  assert fsdp["tflops_per_step"]["llms"] > 0  # online encoding: the LLM runs in the step
  result, data = _aot(tmp_path, *common, "--config.mesh.data=4", "--config.mesh.fsdp=1")
  assert result.returncode == 0, result.stderr[-3000:]
  # Pure data parallelism replicates the weights (the 135M-parameter LLM included); fsdp=4
  # holds about a quarter of them per chip.
  print(f"arguments per chip: data=4 {data['arguments_gib']:.3f} GiB, "
        f"fsdp=4 {fsdp['arguments_gib']:.3f} GiB")
  assert fsdp["arguments_gib"] < 0.4 * data["arguments_gib"]


@pytest.mark.slow
def test_out_of_memory_is_reported_and_exits_nonzero(tmp_path):
  # 4096 tokens per image (64x64 pixels, patch 1) and 256 images per v5e chip.
  result, plan = _aot(tmp_path, "--config", "configs/demo.py:smoke", "--topology", "v5e:2x2",
                      "--config.input.batch_size=1024", "--config.input.image_size=64",
                      "--config.model.patch_size=1", "--config.mesh.data=4")
  assert result.returncode == 1, result.stderr[-3000:]
  assert "OUT OF MEMORY" in result.stdout
  assert plan is not None and plan["fits"] is False
  assert plan["temporaries_gib"] > plan["hbm_per_chip_gib"]


def test_cached_text_mode_is_refused_before_compiling(tmp_path):
  result, plan = _aot(tmp_path, "--config", "configs/demo.py", "--topology", "v5e:2x2")
  assert result.returncode != 0
  assert "config.text.encode" in result.stderr and plan is None


def test_unknown_topology_is_a_clear_error(tmp_path):
  result, plan = _aot(tmp_path, "--config", "configs/demo.py:smoke", "--topology", "v5e:1x1")
  assert result.returncode != 0 and plan is None
  assert "--topology=v5e:1x1" in result.stderr


@pytest.mark.slow
def test_two_slices_with_splash_attention_and_offloaded_remat(tmp_path):
  # Two v5e:2x2 slices over DCN: data parallel across them, fsdp within each; the splash
  # kernel compiled by Mosaic for TPU; the blocks' matmul outputs offloaded to host memory.
  result, plan = _aot(tmp_path, "--config", "configs/demo.py:smoke", "--topology", "v5e:2x2",
                      "--num_slices", "2", "--config.dcn_mesh.data=2", "--config.mesh.data=1",
                      "--config.mesh.fsdp=4", "--config.model.attention=splash",
                      "--config.model.remat=offload")
  assert result.returncode == 0, result.stderr[-3000:]
  assert plan["chips"] == 8 and plan["slices"] == 2 and plan["fits"]
  assert plan["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}
  assert plan["attention"] == "splash" and plan["remat"] == "offload"
  assert plan["host_temporaries_gib"] > 0  # what the offload keeps off HBM


def test_multi_slice_mesh_keeps_each_slice_within_its_data_row():
  # The hybrid mesh puts the DCN part of an axis outermost: data row i is slice i.
  code = ("from jax.experimental import topologies; from li_dit.parallel import sharding\n"
          "d = topologies.get_topology_desc(topology_name='v5e:2x2', platform='tpu', "
          "num_slices=2).devices\n"
          "m = sharding.make_mesh(dict(data=1, fsdp=-1, tensor=1), d, dict(data=2))\n"
          "print('SLICES', [[x.slice_index for x in row.flat] for row in m.devices])\n"
          "try:\n  sharding.make_mesh(dict(data=-1), d)\n"
          "except ValueError as e:\n  print('ERROR', e)\n")
  result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=LIBTPU_ENV)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "SLICES [[0, 0, 0, 0], [1, 1, 1, 1]]" in result.stdout
  assert "ERROR the devices span 2 TPU slices" in result.stdout
