r"""Rehearses a config's pod path end to end on this machine, shrunk, before anyone pays for a pod.

  python tools/rehearse.py --config configs/li_dit_1b.py [--config.a.b=v ...] [--json F] \
      [--workdir DIR] [--steps 6]
  python tools/rehearse.py --config configs/li_dit_10b.py:1024

Runs the real config's code path with every width, depth and LLM shrunk, the image size too where
it must be, and nothing else changed: pixel image sizes and aspect-ratio buckets through a tiny
random VAE of the config's VAE layout (16 channels, 8x; li_dit.io.tiny), two online LLMs from
tiny random Hugging Face checkpoints of the config's LLM architectures (LLaMA-3 and Qwen2 layouts,
with chat templates), splash attention, the config's dtype, remat and scan, the same time shift,
a data x fsdp x tensor mesh over 8 host devices (set up here: no XLA_FLAGS needed), on a TFDS
dataset of images of the config's squarest and widest buckets' shapes (each bucket is one more
compile of the train step), built with tools/build_dataset.py's code. Stages:

  run_card  the real config's run card (li_dit.training.run_card), printed and checked
  fixtures  the tiny LLMs, VAE and dataset
  train     li_dit.train on mesh data=2,fsdp=2,tensor=2, stopped by SIGTERM (it must save and
            exit 143)
  resume    the same workdir resumed on mesh fsdp=4,tensor=2 to the last step: every step logged
            once, a finite loss, the sample grid of the last step (on the training mesh)
  stage2    a second run at twice the resolution from the first (config.init_from), square
  sample    li_dit.sample on mesh fsdp=4,tensor=2 at a non-square bucket
  evaluate  li_dit.evaluate --benchmark shapes on mesh data=2,fsdp=2,tensor=2
  export    tools/export_torch.py

The stages after `resume` only read its workdir: stage2 runs beside sample, evaluate and export
(two processes at a time; each compile uses about one core). Prints one line per stage as it
finishes (pass or FAIL, what it measured), writes --json as
{"config": ..., "seconds": ..., "stages": {NAME: {"ok": bool, ...}}} in the order above, and exits
1 if any stage fails. About 13 minutes on 2 CPU cores.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402
from PIL import Image  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.data import build  # noqa: E402
from li_dit.data.synthetic import shapes  # noqa: E402
from li_dit.diffusion import image_space  # noqa: E402
from li_dit.io import architectures  # noqa: E402
from li_dit.io import packaged  # noqa: E402
from li_dit.io import tiny  # noqa: E402
from li_dit.parallel import host_devices  # noqa: E402
from li_dit.training import run_card  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_JSON = flags.DEFINE_string("json", None, "Also write the stages here as JSON.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the rehearsal's files go (default: a "
                               "temporary folder, removed at the end).")
_STEPS = flags.DEFINE_integer("steps", 6, "Training steps of the first stage.", lower_bound=4)
flags.mark_flags_as_required(["config"])

DEVICES = 8
MESHES = {"train": dict(data=2, fsdp=2, tensor=2), "resume": dict(data=1, fsdp=4, tensor=2),
          "evaluate": dict(data=2, fsdp=2, tensor=2)}
SIZE = 128  # The rehearsal's image side in pixels, when the real one is larger.
TINY_MODEL = dict(width=64, depth=2, num_heads=2)
TINY_LLM_WIDTH = tiny.TINY_LLM["hidden_size"]
PROMPTS = ("a red circle to the left of a blue square", "two green triangles",
           "a yellow square above a purple circle", "three orange circles")
STAGES = ("run_card", "fixtures", "train", "resume", "stage2", "sample", "evaluate", "export")
# Seconds a stage's process may take before it counts as hung.
TIMEOUT = 900


class Rehearsal:
  """The stages' results, printed as they finish."""

  def __init__(self):
    self.stages: dict[str, dict[str, Any]] = {}

  def run(self, name: str, stage: Callable[[dict[str, Any]], None],
          needs: Sequence[str] = ()) -> None:
    """Runs `stage(record)` unless a stage it needs failed; `record` collects what it measured,
    and an exception fails it (named), the other stages go on."""
    record: dict[str, Any] = {}
    failed = [n for n in needs if not self.stages.get(n, {}).get("ok")]
    start = time.perf_counter()
    if failed:
      record.update(ok=False, error=f"skipped: {', '.join(failed)} failed")
    else:
      try:
        stage(record)
        record["ok"] = True
      except Exception as e:  # pylint: disable=broad-except  # Reported, the rest go on.
        record.update(ok=False, error=f"{type(e).__name__}: {e}")
    record["seconds"] = round(time.perf_counter() - start, 1)
    self.stages[name] = record
    details = ", ".join(f"{k} {v}" for k, v in record.items() if k not in ("ok", "error"))
    print(f"{name:<9} {'pass' if record['ok'] else 'FAIL'}  {details}"
          + ("" if record["ok"] else f"\n          {record['error']}"), flush=True)

  @property
  def ok(self) -> bool:
    return all(r["ok"] for r in self.stages.values())


def _buckets(real: Sequence[Sequence[int]], real_size: int, size: int, step: int
             ) -> tuple[tuple[int, int], ...]:
  """The real buckets' squarest and widest shapes at `size` pixels of area, sides multiples of
  `step` (each bucket is a compile of the train step: two exercise bucketing at half the cost)."""
  real = [tuple(b) for b in real] or [(real_size, real_size)]
  picked = [min(real, key=lambda b: abs(b[1] / b[0] - 1)), max(real, key=lambda b: b[1] / b[0])]
  out = []
  for h, w in picked:
    scale = size / real_size
    bucket = (max(step, round(h * scale / step) * step), max(step, round(w * scale / step) * step))
    if bucket not in out:
      out.append(bucket)
  return tuple(out)


def _flag(key: str, value: Any) -> str:
  return f"--config.{key}={value if isinstance(value, str) else repr(value)}"


# The stages' processes: DEVICES host CPU devices with the pool threads their collectives need
# (li_dit.parallel.host_devices; jax reads both when it starts), compiled without LLVM's
# expensive passes: compiling, not running, is most of a rehearsal's time (a fifth less per
# train step compile, measured).
_ENV = host_devices.environment(
    DEVICES, ["--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"],
    base=dict(os.environ, JAX_PLATFORMS="cpu"))


@contextlib.contextmanager
def _process(args: Sequence[str], log: str) -> Iterator[subprocess.Popen]:
  """A process of this repository on DEVICES host devices, its stdout in `log`.out and stderr in
  `log`.err: files, not pipes, which a data worker left behind by a crashed process would hold
  open. It runs in a session of its own; on leaving, whatever is left of the session (the
  process, its data workers) is killed and the process reaped."""
  os.makedirs(os.path.dirname(log), exist_ok=True)
  with open(f"{log}.out", "w") as out, open(f"{log}.err", "w") as err:
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=_ENV, stdout=out, stderr=err,
                            start_new_session=True)
    try:
      yield proc
    finally:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # Before the reaping wait: the group still exists.
      proc.wait()


def _failure(args: Sequence[str], returncode: int, log: str) -> RuntimeError:
  """Names the process, its exit code, its last stderr lines and where the rest is."""
  with open(f"{log}.err") as f:
    lines = [line.strip() for line in f if line.strip()][-3:]
  return RuntimeError(f"{' '.join(args[:2])} exited {returncode}: "
                      f"{' | '.join(lines) or '(no output)'} (all of it: {log}.err)")


def _run(args: Sequence[str], log: str) -> str:
  """Runs `args` as _process does, to its end (at most TIMEOUT s); returns its stdout."""
  with _process(args, log) as proc:
    try:
      proc.wait(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
      raise RuntimeError(f"{' '.join(args[:2])} still running after {TIMEOUT} s "
                         f"(its output: {log}.err)") from None
  if proc.returncode != 0:
    raise _failure(args, proc.returncode, log)
  with open(f"{log}.out") as f:
    return f.read()


def _metrics(workdir: str) -> list[dict[str, Any]]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _write_dataset(folder: str, data_dir: str, buckets: Sequence[tuple[int, int]],
                   count: int) -> None:
  """`count` captioned shapes scenes, resized to the buckets' shapes in turn, built into the
  TFDS dataset "rehearsal" as tools/build_dataset.py builds any image folder."""
  source = shapes.ShapesSource(image_size=64, seed=0, split="train")
  os.makedirs(folder, exist_ok=True)
  for i in range(count):
    record = source[i]
    height, width = buckets[i % len(buckets)]
    image = Image.fromarray(record["image"]).resize((width, height), Image.BICUBIC)
    image.save(os.path.join(folder, f"{i:04d}.jpg"), quality=92)
    with open(os.path.join(folder, f"{i:04d}.txt"), "w") as f:
      f.write(record["caption"] + "\n")
  build.build([folder], data_dir, "rehearsal", workers=1)


def rehearse(config, config_file: str, user_overrides: dict[str, Any], root: str,
             steps: int) -> Rehearsal:
  """Runs every stage in `root`; see the module docstring."""
  report = Rehearsal()
  real_size = config.input.image_size
  size = min(real_size, SIZE)
  overrides: dict[str, Any] = {}  # The shrunk config: what the stages' processes are given.
  run = os.path.join(root, "run")
  state: dict[str, Any] = {}

  def logs(stage: str) -> str:  # Where a stage's process writes its stdout and stderr.
    return os.path.join(root, "logs", stage)

  def check_run_card(record):
    config_lib.validate(config)
    space = image_space.from_config(config, load=False)
    card = run_card.make(config, run_card.planned_encoders(config), space,
                         run_card.mesh_sizes(config, DEVICES))
    print(run_card.describe(card), flush=True)
    latent = real_size // space.factor
    if (card["latent_size"], card["image_tokens"]) != (
        latent, (latent // config.model.patch_size) ** 2):
      raise ValueError(f"run card sizes {card['latent_size']}, {card['image_tokens']} do not "
                       f"follow {real_size}px / f={space.factor} / p={config.model.patch_size}")
    state["step"] = space.factor * config.model.patch_size  # Pixels per token side.
    record.update(image_size_px=real_size, latent_size=card["latent_size"],
                  image_tokens=card["image_tokens"], time_shift=round(card["time_shift"], 3),
                  llms=len(card["text_tokens"]))

  def make_fixtures(record):
    corpus = list(PROMPTS) + [shapes.ShapesSource(64, seed=0)[i]["caption"] for i in range(64)]
    shrunk = []
    for name in sorted(config.text.llms):
      path = config.text.llms[name].path
      with contextlib.suppress(FileNotFoundError):
        packaged.resolve_llm_path(path)
        continue  # On this machine (a small packaged LLM): the real one.
      architecture = os.path.basename(os.path.normpath(path))
      if architecture not in architectures.HF_CONFIGS:
        raise ValueError(f"config.text.llms.{name}.path: {path!r} is neither on this machine "
                         f"nor a published architecture to shrink: {sorted(architectures.HF_CONFIGS)}")
      folder = tiny.llm_folder(os.path.join(root, "llms", name), architecture, corpus)
      overrides.update({f"text.llms.{name}.path": folder,
                        f"text.llms.{name}.hidden_size": TINY_LLM_WIDTH,
                        f"text.llms.{name}.max_tokens": 16})
      shrunk.append(name)
    if config.vae.path and not os.path.isdir(config.vae.path):
      name = os.path.basename(os.path.normpath(config.vae.path))
      overrides["vae.path"] = tiny.vae_folder(
          os.path.join(root, "vae"), name if name in architectures.VAE_CONFIGS else "FLUX.1-schnell")
    state["buckets"] = _buckets(config.input.buckets, real_size, size, state["step"])
    data_dir = os.path.join(root, "data")
    _write_dataset(os.path.join(root, "images"), data_dir, state["buckets"], 48)
    base = config.flow.base_size * size / real_size  # The real shift at the rehearsal's size.
    overrides.update({
        **{f"model.{k}": v for k, v in TINY_MODEL.items()},
        "input.source": "tfds", "input.tfds_name": "rehearsal", "input.data_dir": data_dir,
        "input.image_size": size, "input.buckets": state["buckets"], "input.batch_size": 8,
        "input.num_workers": 1, "flow.base_size": int(base) if base == int(base) else base,
        "total_steps": steps, "log_every": 1, "checkpoint_every": 2, "sample_every": steps,
        "optim.warmup_steps": 2, "sample.prompts": PROMPTS, "sample.steps": 2,
        **{f"mesh.{k}": v for k, v in MESHES["train"].items()},
        **{f"dcn_mesh.{k}": 1 for k in MESHES["train"]}})
    record.update(image_size_px=size, buckets=[f"{h}x{w}" for h, w in state["buckets"]],
                  tiny_llms=shrunk, tiny_vae="vae.path" in overrides, model=TINY_MODEL)

  def train_args(workdir: str, extra: dict[str, Any]) -> list[str]:
    merged = {**user_overrides, **overrides, **extra}
    return ["-m", "li_dit.train", "--config", config_file, "--workdir", workdir,
            *(_flag(k, v) for k, v in merged.items())]

  def train_and_stop(record):
    args, log = train_args(run, {}), logs("train")
    with _process(args, log) as proc:
      # SIGTERM once step 3 is logged: mid-run, after the step-2 checkpoint.
      deadline = time.monotonic() + TIMEOUT
      while not (os.path.exists(os.path.join(run, "metrics.jsonl"))
                 and len(_metrics(run)) >= 3):
        if proc.poll() is not None:
          raise _failure(args, proc.returncode, log)
        if time.monotonic() > deadline:
          raise RuntimeError(f"no step 3 after {TIMEOUT} s (its output: {log}.err)")
        time.sleep(0.5)
      proc.send_signal(signal.SIGTERM)  # The trainer alone: it stops its data workers itself.
      try:
        proc.wait(timeout=TIMEOUT)
      except subprocess.TimeoutExpired:
        raise RuntimeError(f"still running {TIMEOUT} s after SIGTERM ({log}.err)") from None
    if proc.returncode != 143:
      raise _failure(args, proc.returncode, log)
    state["stopped"] = _metrics(run)[-1]["step"]
    saved = sorted(int(s) for s in os.listdir(os.path.join(run, "checkpoints")) if s.isdigit())
    if saved[-1] != state["stopped"]:
      raise RuntimeError(f"stopped at step {state['stopped']}, last checkpoint {saved[-1]}")
    record.update(mesh=MESHES["train"], stopped_at=state["stopped"], exit_code=143,
                  first_loss=round(_metrics(run)[0]["loss"], 4))

  def resume(record):
    _run(train_args(run, {f"mesh.{k}": v for k, v in MESHES["resume"].items()}), logs("resume"))
    logged = [m["step"] for m in _metrics(run)]
    if logged != list(range(1, steps + 1)):
      raise RuntimeError(f"logged steps {logged}")
    loss = _metrics(run)[-1]["loss"]
    if not math.isfinite(loss):
      raise RuntimeError(f"final loss {loss}")
    grid = os.path.join(run, "samples", f"step_{steps}.png")
    if not os.path.exists(grid):
      raise RuntimeError(f"no sample grid {grid}")
    record.update(mesh=MESHES["resume"], resumed_after=state["stopped"], final_step=steps,
                  final_loss=round(loss, 4))

  def second_stage(record):
    stage2 = os.path.join(root, "stage2")
    double = 2 * size
    stdout = _run(train_args(stage2, {"init_from": run, "input.image_size": double,
                                      "input.buckets": (), "total_steps": 2, "sample_every": 0}),
                  logs("stage2"))
    if f"initialized parameters and EMA from step {steps}" not in stdout:
      raise RuntimeError("the second stage did not start from the first")
    with open(os.path.join(stage2, "run_card.json")) as f:
      card = json.load(f)
    record.update(image_size_px=double, time_shift=round(card["time_shift"], 3),
                  loss=round(_metrics(stage2)[-1]["loss"], 4))

  def sample(record):
    height, width = max(state["buckets"], key=lambda b: b[1] / b[0])  # The widest bucket.
    out = os.path.join(root, "sample.png")
    mesh = ",".join(f"{k}={v}" for k, v in MESHES["resume"].items())
    _run(["-m", "li_dit.sample", "--workdir", run, "--prompt", PROMPTS[0], "--prompt",
          PROMPTS[1], "--out", out, "--steps", "2", "--scale", "1", "--mesh", mesh,
          "--size", f"{height}x{width}"], logs("sample"))
    shape = np.asarray(Image.open(out)).shape
    if shape != (height, 2 * width, 3):
      raise RuntimeError(f"grid of shape {shape}, expected {(height, 2 * width, 3)}")
    record.update(mesh=mesh, size=f"{height}x{width}")

  def evaluate(record):
    out = os.path.join(root, "shapes_eval.json")
    mesh = ",".join(f"{k}={v}" for k, v in MESHES["evaluate"].items())
    _run(["-m", "li_dit.evaluate", "--workdir", run, "--benchmark", "shapes", "--out", out,
          "--samples_per_prompt", "1", "--steps", "2", "--batch_size", "16", "--mesh", mesh],
         logs("evaluate"))
    with open(out) as f:
      result = json.load(f)
    record.update(mesh=mesh, images=result["num_images"],
                  colour_accuracy=round(result["colour_accuracy"], 3))

  def export(record):
    out = os.path.join(root, "torch")
    _run(["tools/export_torch.py", "--workdir", run, "--out", out, "--ema"], logs("export"))
    files = sorted(os.listdir(out))
    if "config.json" not in files or not any(f.endswith(".safetensors") for f in files):
      raise RuntimeError(f"export wrote {files}")
    record.update(files=files)

  report.run("run_card", check_run_card)
  report.run("fixtures", make_fixtures, needs=["run_card"])
  report.run("train", train_and_stop, needs=["fixtures"])
  report.run("resume", resume, needs=["train"])

  def run_lane(lane):
    for name, stage in lane:
      report.run(name, stage, needs=["resume"])

  lanes = ([("stage2", second_stage)],
           [("sample", sample), ("evaluate", evaluate), ("export", export)])
  with concurrent.futures.ThreadPoolExecutor(len(lanes)) as pool:
    for lane in [pool.submit(run_lane, lane) for lane in lanes]:
      lane.result()
  report.stages = {name: report.stages[name] for name in STAGES}  # The documented order.
  return report


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_failures("rehearse", config_lib.ConfigError):
    if _JSON.value:  # An unwritable --json fails now, not after the stages.
      open(_JSON.value, "a").close()
    ok = run(_CONFIG.value, config_flags.get_config_filename(flags.FLAGS["config"]),
             config_flags.get_override_values(flags.FLAGS["config"]))
  if not ok:
    sys.exit(1)


def run(config, config_file: str, overrides: dict[str, Any]) -> bool:
  """Rehearses in --workdir (or a temporary directory, removed after a rehearsal that passes and
  kept, with each stage's logs, after one that fails); prints the verdict and writes --json.
  Returns whether every stage passed."""
  start = time.perf_counter()
  root = _WORKDIR.value or tempfile.mkdtemp(prefix="li_dit_rehearsal_")
  report = None
  try:
    report = rehearse(config, config_file, overrides, root, _STEPS.value)
  finally:
    if not _WORKDIR.value and report is not None and report.ok:
      shutil.rmtree(root, ignore_errors=True)
  seconds = round(time.perf_counter() - start, 1)
  print(f"rehearsal of {config_file}: "
        + (f"every stage passed in {seconds} s" if report.ok else
           f"FAILED in {seconds} s; its files and each stage's logs are in {root}"))
  if _JSON.value:
    with open(_JSON.value, "w") as f:
      json.dump({"config": config_file, "seconds": seconds, "ok": report.ok,
                 "stages": report.stages}, f, indent=2)
  return report.ok


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
