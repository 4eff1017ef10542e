"""End to end on the smoke config: train, metrics, samples, the sample and evaluate CLIs, and
exact resume after SIGTERM and SIGKILL (same step count, same data order, same losses)."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

import smoke_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One grain worker process, as in the demo: the resume tests cover the workers' iterator state.
SMOKE = ["--config", os.path.join(REPO, "configs", "demo.py") + ":smoke", "--config.log_every=1",
         "--config.input.num_workers=1"]


def _train_cmd(workdir, *overrides):
  return [sys.executable, "-m", "li_dit.train", *SMOKE, "--workdir", str(workdir), *overrides]


def _run(cmd, timeout=600):
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
  return proc


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _losses(workdir):
  """step -> loss; a step logged twice (before a kill and after the resume) must agree."""
  out = {}
  for m in _metrics(workdir):
    if m["step"] in out:
      assert out[m["step"]] == m["loss"], f"step {m['step']} logged with two losses"
    out[m["step"]] = m["loss"]
  return out


TIME_PARTS = ("step", "data_wait", "checkpoint", "sample", "compile")


def _counters(workdir, step):
  with open(os.path.join(workdir, "checkpoints", str(step), "counters", "metadata")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(_train_cmd(workdir))
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc


def test_training_writes_metrics_checkpoints_and_samples(reference_run):
  workdir, proc = reference_run
  stdout = proc.stdout
  # The data worker process and its shared memory are shut down, not left to the interpreter.
  assert "leaked" not in proc.stderr, proc.stderr[-3000:]
  metrics = _metrics(workdir)
  assert [m["step"] for m in metrics] == list(range(1, 13))
  for m in metrics:
    for key in ("step", "loss", "lr", "grad_norm", "steps_per_sec", "eta_seconds"):
      assert key in m and np.isfinite(m[key]), key
  assert metrics[-1]["loss"] < metrics[0]["loss"]
  assert "step 12/12" in stdout and "steps/s" in stdout and "ETA" in stdout
  # Each interval's wall time, split: the parts add up; the first step compiles, step 5 saves a
  # checkpoint, step 12 samples and saves. Goodput counts start-up against the run.
  for m in metrics:
    parts = [m[f"time/{part}_s"] for part in TIME_PARTS]
    assert min(parts) >= 0 and sum(parts) == pytest.approx(m["time/wall_s"], rel=1e-6)
    assert 0 < m["goodput"] < 1
  assert metrics[0]["time/compile_s"] > 1 and metrics[4]["time/checkpoint_s"] > 0
  assert metrics[11]["time/sample_s"] > 0 and metrics[11]["time/checkpoint_s"] > 0
  assert f"goodput {round(100 * metrics[-1]['goodput'])}%" in stdout.splitlines()[-1]
  grid = Image.open(os.path.join(workdir, "samples", "step_12.png"))
  assert grid.size[0] > 32 and grid.mode == "RGB"
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10", "12"]
  assert any(f.startswith("events.out.tfevents") for f in
             os.listdir(os.path.join(workdir, "tensorboard")))
  # Running the finished run again changes nothing.
  again = _run(_train_cmd(workdir))
  assert again.returncode == 0, again.stderr[-2000:]
  assert len(_metrics(workdir)) == 12


@pytest.mark.slow
def test_sample_cli_is_deterministic_by_seed(reference_run, tmp_path):
  workdir, _ = reference_run
  outs = []
  for name, seed in (("a", 1), ("b", 1), ("c", 2)):
    out = tmp_path / f"{name}.png"
    proc = _run([sys.executable, "-m", "li_dit.sample", "--workdir", str(workdir),
                 "--prompt", "a red circle", "--prompt", "two blue squares", "--out", str(out),
                 "--steps", "3", "--seed", str(seed), "--scale", "1"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    outs.append(np.asarray(Image.open(out)))
  assert outs[0].shape == (32, 64, 3)
  np.testing.assert_array_equal(outs[0], outs[1])
  assert np.abs(outs[0].astype(int) - outs[2]).max() > 0


def test_evaluate_cli_writes_a_report(reference_run, tmp_path):
  workdir, _ = reference_run
  out = tmp_path / "report.json"
  proc = _run([sys.executable, "-m", "li_dit.evaluate", "--workdir", str(workdir),
               "--benchmark", "shapes", "--out", str(out), "--samples_per_prompt", "1",
               "--steps", "2"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  report = json.loads(out.read_text())
  assert report["benchmark"] == "shapes" and report["checkpoint_step"] == 12
  for key in ("colour_accuracy", "lr_position_accuracy", "count_accuracy"):
    assert 0.0 <= report[key] <= 1.0
  assert report["num_images"] == report["num_prompts"] >= 60


def _wait_for(predicate, proc, timeout=600, allow_exit=False, poll=0.5):
  start = time.time()
  while not predicate():
    assert allow_exit or proc.poll() is None, proc.communicate()[1][-3000:]
    assert time.time() - start < timeout, "timed out"
    time.sleep(poll)


def _logged_steps(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path) as f:
    return len(f.readlines())


@pytest.mark.slow
def test_resume_after_sigterm_matches_the_uninterrupted_run(reference_run, tmp_path):
  """SIGTERM mid-run, before any periodic checkpoint: the trainer checkpoints the step it stopped
  at and exits 143; the restart goes on from there with the uninterrupted run's losses, and
  goodput spans both processes. (SIGKILL: test_sigkill_at_random_moments_resumes_bit_for_bit.)"""
  reference, _ = reference_run
  workdir = tmp_path / "run"
  with smoke_runs.running([_train_cmd(workdir)]) as (proc,):
    _wait_for(lambda: _logged_steps(workdir) >= 3, proc)
    proc.send_signal(signal.SIGTERM)  # The trainer alone: it shuts its data workers down itself.
    _, stderr = proc.communicate(timeout=300)
  stopped_at = _logged_steps(workdir)
  assert proc.returncode == 143 and stopped_at < 12, stderr[-2000:]
  ckpts = sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit())
  assert ckpts[-1] == stopped_at

  before = _counters(workdir, stopped_at)
  resumed = _run(_train_cmd(workdir))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"step {stopped_at + 1}/12" in resumed.stdout
  assert f"step {stopped_at}/12" not in resumed.stdout
  # Goodput spans both processes: the first start, and the productive time saved before the stop.
  after = _counters(workdir, 12)
  assert after["goodput/started_at"] == before["goodput/started_at"]
  assert after["goodput/productive_s"] > before["goodput/productive_s"] > 0
  # Same step count, same data and randomness: the same losses as the uninterrupted run.
  assert _losses(workdir) == _losses(reference)


@pytest.mark.slow
def test_sigkill_at_random_moments_resumes_bit_for_bit(reference_run, tmp_path):
  """Ten or more SIGKILLs of the whole process group at random moments, every other one the
  moment a save is in flight (orbax's temporary directory exists), each followed by a restart in
  the same workdir, then a SIGTERM inside a save: the final parameters are the uninterrupted
  run's bit for bit, and metrics.jsonl logs each step once."""
  reference, _ = reference_run
  workdir = tmp_path / "run"
  ckpt_dir = workdir / "checkpoints"
  # A save every other step, so kills land inside saves; saves and samples change no state.
  cmd = _train_cmd(workdir, "--config.checkpoint_every=2", "--config.sample_every=0")

  def saves_in_flight():  # orbax writes a checkpoint into a temporary directory, then renames it.
    names = os.listdir(ckpt_dir) if ckpt_dir.is_dir() else []
    return {d for d in names if "orbax-checkpoint-tmp" in d}

  trials, inside_save, resume_points = 0, 0, []  # resume_points: the newest checkpoint after each.
  while trials < 10:
    rng = np.random.default_rng(trials)
    logged, stale = _logged_steps(workdir), saves_in_flight()  # Left by earlier kills.
    with smoke_runs.running([cmd]) as (proc,):
      kind = trials % 3
      if kind == 0:  # A random moment of start-up: loading, restoring, compiling.
        time.sleep(rng.uniform(2.0, 12.0))
      elif kind == 1:  # A random moment after the first step it takes: 0-1 s, ~0-2 steps.
        _wait_for(lambda: _logged_steps(workdir) > logged or proc.poll() is not None, proc,
                  allow_exit=True)
        time.sleep(rng.uniform(0.0, 1.0))
      else:  # The first save it starts, while orbax writes it.
        _wait_for(lambda: saves_in_flight() - stale or proc.poll() is not None, proc,
                  allow_exit=True, poll=0.01)
      assert proc.poll() is None, "the run finished before ten kills"
      inside_save += bool(saves_in_flight() - stale)
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
    trials += 1
    ckpts = [int(d) for d in os.listdir(ckpt_dir) if d.isdigit()] if ckpt_dir.is_dir() else []
    resume_points.append(max(ckpts, default=0))
  # SIGTERM while a save is in flight: the trainer finishes that save, then saves the step it
  # stops after, and exits 143.
  stale = saves_in_flight()
  with smoke_runs.running([cmd]) as (proc,):
    _wait_for(lambda: saves_in_flight() - stale or proc.poll() is not None, proc, poll=0.01)
    in_flight = {int(d.split(".")[0]) for d in saves_in_flight() - stale}
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-3000:]
  assert all((ckpt_dir / str(step)).is_dir() for step in in_flight), (in_flight, stderr[-3000:])
  final = _run(cmd)
  assert final.returncode == 0, final.stderr[-3000:]
  print(f"{trials} kills, {inside_save} inside a save; resume points {resume_points}")
  assert inside_save >= 3
  got, want = smoke_runs.params(str(workdir), 12), smoke_runs.params(str(reference), 12)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  # The losses are the reference's, and each step is logged once: a resumed run drops what the
  # killed one logged after the checkpoint it resumes from.
  assert [m["step"] for m in _metrics(workdir)] == list(range(1, 13))
  assert _losses(workdir) == _losses(reference)


def test_the_run_card_is_printed_written_and_the_tools(reference_run, tmp_path):
  workdir, proc = reference_run
  assert "run card: 32x32 px -> DiT input 32x32x3, 64 image tokens" in proc.stdout
  with open(os.path.join(workdir, "run_card.json")) as f:
    card = json.load(f)
  out = tmp_path / "card.json"
  tool = _run([sys.executable, "tools/run_card.py", *SMOKE, "--devices", "1", "--json", str(out)])
  assert tool.returncode == 0, tool.stderr[-2000:]
  assert json.loads(out.read_text()) == card


@pytest.mark.slow
def test_a_second_stage_starts_from_the_first_runs_parameters(reference_run, tmp_path):
  """config.init_from at twice the resolution: parameters and EMA of the reference run's
  checkpoint, fresh optimizer (a learning rate of 1e-12 keeps them where they started)."""
  reference = reference_run[0]
  stage = tmp_path / "stage2"
  common = ["--config.input.image_size=64", "--config.sample_every=0",
            "--config.optim.lr=1e-12", "--config.optim.warmup_steps=0"]
  proc = _run(_train_cmd(stage, f"--config.init_from={reference}", "--config.total_steps=2",
                         *common))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"initialized parameters and EMA from step 12 of {reference}" in proc.stdout
  assert "run card: 64x64 px" in proc.stdout
  got, want = smoke_runs.params(str(stage), 2), smoke_runs.params(str(reference), 12)
  assert got.keys() == want.keys()
  for name in want:
    np.testing.assert_allclose(got[name], want[name], atol=1e-8, err_msg=name)
  # A resume of the stage continues its own checkpoint: init_from is not read again.
  resumed = _run(_train_cmd(stage, f"--config.init_from={reference}", "--config.total_steps=3",
                            *common))
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "initialized" not in resumed.stdout and "step 3/3" in resumed.stdout
  # Another width: refused before anything is read, naming the parameter and both shapes.
  bad = _run(_train_cmd(tmp_path / "bad", f"--config.init_from={reference}/checkpoints/10",
                        "--config.model.width=32", "--config.model.num_heads=2"))
  assert bad.returncode == 1 and "Traceback" not in bad.stderr, bad.stderr[-3000:]
  message = bad.stderr.strip().splitlines()[-1]
  assert message.startswith("li_dit.train: config.init_from=") and "checkpoint step 10" in message
  assert "has shape (" in message and "the model's is (" in message, message
