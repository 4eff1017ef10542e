"""Training metrics: metrics.jsonl, TensorBoard event files and the progress line."""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from clu import metrics as clu_metrics
from etils import epath

from li_dit.io import paths

# Metrics that are counts within a step: summed over a logging interval, not averaged.
SUMMED = ("truncated_captions", "nonfinite")
SUMMED_PREFIXES = ("skipped/",)  # Records skipped by the pipeline, per reason.


def average(step_metrics: Sequence[Mapping[str, Any]]) -> dict[str, float]:
  """Per-step metric dicts (device scalars) -> one dict: means, and sums for SUMMED keys.

  One device_get for the whole interval, so logging costs one host sync, not one per step.
  """
  host = jax.device_get(list(step_metrics))
  out = {}
  for key in host[0]:
    values = np.asarray([m[key] for m in host], np.float64)
    if key in SUMMED or key.startswith(SUMMED_PREFIXES):
      out[key] = float(values.sum())
    else:
      out[key] = float(clu_metrics.Average.from_model_output(values).compute())
  return out


class MetricWriter:
  """Appends one JSON object per logged step to metrics.jsonl and mirrors it to TensorBoard.

  The workdir may be on an object store (gs://), where objects cannot be appended to: there both
  files are written in a local staging folder and uploaded whole after every write (a 100k-step
  run logging every 50 steps uploads at most about 1 MB at a time). metrics.jsonl of an earlier
  run in the workdir is continued from `resume_step`: what it logged after that step (work a
  kill lost, which the resumed run redoes) is dropped from both files, so each step is logged once.
  """

  def __init__(self, workdir: str, enabled: bool = True, resume_step: int = 0):
    self.enabled = enabled
    if not enabled:
      return
    from tensorboardX import SummaryWriter  # Only the writing process needs it.
    self._workdir = epath.Path(workdir)
    self._remote = paths.is_remote(workdir)
    self._local = tempfile.mkdtemp(prefix="li_dit_metrics_") if self._remote else workdir
    jsonl = os.path.join(self._local, "metrics.jsonl")
    if self._remote and (self._workdir / "metrics.jsonl").exists():
      (self._workdir / "metrics.jsonl").copy(jsonl)
    _drop_after(jsonl, resume_step)
    self._jsonl = open(jsonl, "a")
    # TensorBoard hides the events of steps >= purge_step written before it.
    self._tb = SummaryWriter(os.path.join(self._local, "tensorboard"),
                             purge_step=resume_step + 1 if resume_step else None)

  def write(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()
    for key, value in metrics.items():
      self._tb.add_scalar(key, value, step)
    self._tb.flush()
    self._upload()

  def _upload(self) -> None:
    """On an object store: the staged files, each uploaded whole."""
    if self._remote:
      events = [os.path.join("tensorboard", f)
                for f in os.listdir(os.path.join(self._local, "tensorboard"))]
      for name in ["metrics.jsonl", *events]:
        paths.publish(os.path.join(self._local, name), self._workdir / name)

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Flushes and closes both files (uploads them on an object store). Idempotent."""
    if self.enabled and not self._jsonl.closed:
      self._jsonl.close()
      self._tb.close()
      self._upload()
      if self._remote:
        shutil.rmtree(self._local)


def _drop_after(jsonl: str, step: int) -> None:
  """Rewrites `jsonl` (atomically) without its records of steps after `step`."""
  if not os.path.exists(jsonl):
    return
  with open(jsonl) as f:
    lines = f.readlines()
  kept = [l for l in lines if l.strip() and json.loads(l)["step"] <= step]
  if len(kept) < len(lines):
    with open(jsonl + ".tmp", "w") as f:
      f.writelines(kept)
    os.replace(jsonl + ".tmp", jsonl)


class Progress:
  """Steps/s, examples/s, ETA, TFLOP/s per device and MFU between logging points.

  Args:
    step_flops: model FLOPs of one train step (li_dit.training.flops.train_step_flops "total").
    peak_flops: peak FLOP/s of all the devices the step runs on (li_dit.training.flops.peak_flops).
    num_devices: devices the step runs on.
  """

  def __init__(self, total_steps: int, start_step: int, batch_size: int, step_flops: float,
               peak_flops: float, num_devices: int):
    self.total_steps = total_steps
    self.batch_size = batch_size
    self.step_flops = step_flops
    self.peak_flops = peak_flops
    self.num_devices = num_devices
    self._last_step = start_step
    self._last_time = time.perf_counter()
    self._start_time = self._last_time

  def update(self, step: int, excluded_seconds: float = 0.0) -> dict[str, float]:
    """Rates since the last update; `excluded_seconds` of the interval (compilation) are not
    step time."""
    now = time.perf_counter()
    busy = now - self._last_time - excluded_seconds
    steps_per_sec = (step - self._last_step) / max(busy, 1e-9)
    self._last_step, self._last_time = step, now
    flops_per_sec = steps_per_sec * self.step_flops
    return {"steps_per_sec": steps_per_sec,
            "examples_per_sec": steps_per_sec * self.batch_size,
            "tflops_per_sec_per_device": flops_per_sec / self.num_devices / 1e12,
            "mfu": flops_per_sec / self.peak_flops,
            "eta_seconds": (self.total_steps - step) / max(steps_per_sec, 1e-9),
            "elapsed_seconds": now - self._start_time}

  def line(self, step: int, m: Mapping[str, float]) -> str:
    eta = int(m["eta_seconds"])
    extra = f" | truncated {int(m['truncated_captions'])}" if m.get("truncated_captions") else ""
    if m.get("skipped_total"):
      extra += f" | skipped {int(m['skipped_total'])} bad records"
    if m.get("nonfinite_steps"):
      extra += f" | {int(m['nonfinite_steps'])} non-finite steps skipped"
    if m.get("time/compile_s", 0) >= 0.5:
      extra += f" | compiled {m['time/compile_s']:.1f} s"
    if "goodput" in m:
      extra += f" | goodput {100 * m['goodput']:.0f}%"
    return (f"step {step}/{self.total_steps} | loss {m['loss']:.4f} | grad_norm "
            f"{m['grad_norm']:.3f} | lr {m['lr']:.2e} | {m['steps_per_sec']:.2f} steps/s | "
            f"{m['examples_per_sec']:.1f} ex/s | MFU {100 * m['mfu']:.1f}% | ETA {eta // 3600}h{eta % 3600 // 60:02d}m"
            f"{eta % 60:02d}s{extra}")
