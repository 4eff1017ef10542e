"""Runs of the real entry point, `python -m li_dit.train` on configs/demo.py:smoke, and what they
leave in their workdirs; and test functions called on several host devices. Each run is its own
process (or processes), since the number of host devices is fixed when jax starts.
"""
import contextlib
import json
import os
import signal
import subprocess
import sys
from typing import Iterator, Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from li_dit.parallel import host_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(workdir: str, mesh: dict[str, int], *overrides: str,
            config: str = "configs/demo.py:smoke") -> list[str]:
  """`config` (default: the smoke config) logging every step, on `mesh`, with `--config.…`
  overrides."""
  return [sys.executable, "-m", "li_dit.train", "--config", config,
          "--workdir", workdir, "--config.log_every=1",
          *(f"--config.mesh.{axis}={size}" for axis, size in mesh.items()), *overrides]


def environment(devices: int) -> dict[str, str]:
  """The environment of a process with `devices` CPU devices."""
  return host_devices.environment(devices)


def call_with_devices(module: str, function: str, devices: int) -> str:
  """Calls `<module>.<function>()` (a module of tests/) in a process with `devices` CPU devices;
  returns its stdout."""
  code = (f"import sys; sys.path.insert(0, 'tests'); import {module}; {module}.{function}()")
  result = subprocess.run(
      [sys.executable, "-c", code],
      cwd=REPO, env=environment(devices), capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


@contextlib.contextmanager
def running(commands: Sequence[Sequence[str]], **popen_kwargs
            ) -> Iterator[list[subprocess.Popen]]:
  """One process per command, each in a process group of its own (text pipes for stdout and
  stderr, cwd the repository). On leaving, a failed assertion or a timeout included, every group
  is killed (the trainer and its data workers) and reaped: no test leaves a process behind."""
  procs = []
  try:
    for cmd in commands:
      procs.append(subprocess.Popen(cmd, **{"cwd": REPO, "stdout": subprocess.PIPE,
                                            "stderr": subprocess.PIPE, "text": True,
                                            "start_new_session": True, **popen_kwargs}))
    yield procs
  finally:
    for proc in procs:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      for stream in (proc.stdout, proc.stderr):
        if stream is not None:
          stream.close()


def train(workdir: str, devices: int, mesh: dict[str, int], *overrides: str
          ) -> subprocess.CompletedProcess:
  """One process with `devices` CPU devices; asserts it succeeded."""
  result = subprocess.run(command(workdir, mesh, *overrides), cwd=REPO,
                          env=environment(devices), capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def losses(workdir: str) -> np.ndarray:
  """The logged losses, in the order of metrics.jsonl."""
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return np.asarray([r["loss"] for r in records if "loss" in r], np.float64)


def params(workdir: str, step: int) -> dict[str, np.ndarray]:
  """The parameters of checkpoint `step` as host numpy arrays, whatever mesh saved them."""
  path = os.path.join(workdir, "checkpoints", str(step), "params")
  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(path)
  metadata = getattr(metadata, "item_metadata", metadata)
  args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  tree = checkpointer.restore(path, restore_args=args)
  return {jax.tree_util.keystr(k): np.asarray(v)
          for k, v in jax.tree_util.tree_leaves_with_path(tree)}


def assert_losses_close(got: np.ndarray, want: np.ndarray, what: str) -> None:
  """As many losses as `want`, each within 1e-5 of it (relative)."""
  assert len(got) == len(want), (got, want)
  rel = np.abs(got - want) / np.abs(want)
  print(f"{what}: losses {got.round(6).tolist()}, max relative diff {rel.max():.2g}")
  assert rel.max() <= 1e-5, (got, want)


def assert_params_close(got: dict[str, np.ndarray], want: dict[str, np.ndarray], what: str
                        ) -> None:
  """All parameters as one vector: |got - want| / |want| (L2) <= 1e-5, and <= 1e-4 per tensor.

  Per tensor the bound is looser: element-wise or per-tensor ratios of 1e-5 are no measure in
  zero-initialised tensors (adaLN weights, refiner biases, values ~lr x steps), where Adam moves
  each weight by ~lr whatever its gradient's size, so gradients near Adam's epsilon turn a
  reduction-order rounding into up to ~1e-5 of such a tensor (measured: 1.2e-5 for the refiner's
  first FFN bias under data=2,fsdp=2,tensor=2). A mis-sharded tensor is off by O(1).
  """
  assert got.keys() == want.keys()
  num = sum(float(np.sum((got[k].astype(np.float64) - want[k]) ** 2)) for k in got)
  den = sum(float(np.sum(want[k].astype(np.float64) ** 2)) for k in got)
  per_tensor = {k: float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k]))
                for k in got if np.any(want[k])}
  worst = max(per_tensor, key=per_tensor.get)
  print(f"{what}: |diff| / |params| {(num / den) ** 0.5:.2g}; worst tensor {worst} "
        f"{per_tensor[worst]:.2g}")
  assert (num / den) ** 0.5 <= 1e-5
  assert per_tensor[worst] <= 1e-4, worst
