"""Sharded training equals single-device training: 5 steps of the smoke config on 8 CPU devices.

Each run is the real entry point (`python -m li_dit.train`) in its own process, since the number
of host devices is fixed when jax starts. The smoke config encodes text online, so the frozen
LLM's forward runs inside the sharded train step too, its weights sharded over fsdp and tensor.
"""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 5
LAYOUTS = {
    "data=8": dict(data=8, fsdp=1, tensor=1),
    "fsdp=8": dict(data=1, fsdp=8, tensor=1),
    "data=2,fsdp=2,tensor=2": dict(data=2, fsdp=2, tensor=2),
}


def _train(workdir: str, devices: int, mesh: dict[str, int]) -> str:
  """Runs 5 steps; returns the run's stdout."""
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  overrides = [f"--config.mesh.{axis}={size}" for axis, size in mesh.items()]
  cmd = [sys.executable, "-m", "li_dit.train", "--config", "configs/demo.py:smoke",
         "--workdir", workdir, f"--config.total_steps={STEPS}", "--config.log_every=1",
         "--config.sample_every=0", f"--config.checkpoint_every={STEPS}", *overrides]
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _footprints(stdout: str) -> dict[str, tuple[float, float]]:
  """The start-up line's "<what> X MiB (Y MiB on device 0)" figures, by what."""
  line = next(l for l in stdout.splitlines() if l.startswith("mesh "))
  found = re.findall(r"(train state|frozen text side) ([0-9.]+) MiB \(([0-9.]+) MiB on device 0\)",
                     line)
  return {what: (float(total), float(per_device)) for what, total, per_device in found}


def _losses(workdir: str) -> np.ndarray:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return np.asarray([r["loss"] for r in records if "loss" in r], np.float64)


def _params(workdir: str) -> dict[str, np.ndarray]:
  """The step-5 parameters as host numpy arrays, whatever mesh saved them."""
  path = os.path.join(workdir, "checkpoints", str(STEPS), "params")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  tree = checkpointer.restore(path, restore_args=args)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("one_device"))
  _train(workdir, 1, dict(data=1, fsdp=1, tensor=1))
  return _losses(workdir), _params(workdir)


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_eight_device_layout_matches_one_device(layout, reference, tmp_path):
  ref_losses, ref_params = reference
  stdout = _train(str(tmp_path), 8, LAYOUTS[layout])
  # Weights, EMA and Adam moments are split over fsdp x tensor, and so are the frozen LLM's.
  # Not quite evenly at the smoke size: the input sides of the patch embedding and the LLM-feature
  # projections, and the norms, are split over fsdp only or not at all (~15% of this tiny state,
  # <1% of LI-DiT-1B's). Measured on device 0: 1.05x the even share for fsdp=8, 1.17x for
  # data=2,fsdp=2,tensor=2.
  ways = LAYOUTS[layout]["fsdp"] * LAYOUTS[layout]["tensor"]
  footprints = _footprints(stdout)
  assert footprints.keys() == {"train state", "frozen text side"}
  for what, (total, per_device) in footprints.items():
    print(f"{layout}: {what} {total} MiB, {per_device} MiB on device 0")
    assert per_device <= 1.25 * total / ways, (what, total, per_device)
  losses, params = _losses(str(tmp_path)), _params(str(tmp_path))
  assert len(losses) == len(ref_losses) == STEPS
  loss_rel = np.abs(losses - ref_losses) / np.abs(ref_losses)
  print(f"{layout}: losses {losses.round(6).tolist()}, max relative diff {loss_rel.max():.2g}")
  assert loss_rel.max() <= 1e-5, (losses, ref_losses)
  assert params.keys() == ref_params.keys()
  # All parameters as one vector: |difference| / |parameters| (L2) within the 1e-5 of the loss.
  # Per tensor the bound is 1e-4: element-wise or per-tensor ratios of 1e-5 are no measure in
  # zero-initialised tensors (adaLN weights, refiner biases, values ~lr x steps), where Adam
  # moves each weight by ~lr whatever its gradient's size, so gradients near Adam's epsilon turn
  # a reduction-order rounding into up to ~1e-5 of such a tensor (measured: 1.2e-5 for the
  # refiner's first FFN bias under data=2,fsdp=2,tensor=2). A mis-sharded tensor is off by O(1).
  num = sum(float(np.sum((params[k].astype(np.float64) - ref_params[k]) ** 2)) for k in params)
  den = sum(float(np.sum(ref_params[k].astype(np.float64) ** 2)) for k in params)
  per_tensor = {k: float(np.linalg.norm(params[k] - ref_params[k]) / np.linalg.norm(ref_params[k]))
                for k in params if np.any(ref_params[k])}
  worst = max(per_tensor, key=per_tensor.get)
  print(f"{layout}: parameters after {STEPS} steps, |diff| / |params| {(num / den) ** 0.5:.2g}; "
        f"worst tensor {worst} {per_tensor[worst]:.2g}")
  assert (num / den) ** 0.5 <= 1e-5
  assert per_tensor[worst] <= 1e-4, worst
