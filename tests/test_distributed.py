"""Multi-process training: 2 processes x 2 CPU devices train like 1 process on 1 device, only
process 0 writes the run's files, and their checkpoint resumes on 1 process with another mesh.
Also: processes join only where JAX detects a cluster (or by flags), and a SIGTERM to one process
stops all of them after the same step.

Processes join through `--coordinator_address/--num_processes/--process_id` on 127.0.0.1, with
gloo for the collectives between their CPU devices: the same code path as hosts of a TPU pod.
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
from PIL import Image

import smoke_runs
from li_dit.io import checkpoints

STEPS, MORE = 5, 7
ONE_DEVICE = dict(data=1, fsdp=1, tensor=1)
# Every run: a checkpoint and a sample grid at step 5, and a constant learning rate after the
# warm-up, so a run to step 5 continued to step 7 follows the schedule of a run to step 7.
COMMON = ("--config.checkpoint_every=5", "--config.sample_every=5",
          "--config.optim.final_lr_ratio=1.0")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# A Slurm job of one task, as srun describes it: one of the clusters JAX detects by itself.
SLURM = dict(SLURM_JOB_ID="1", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="1",
             SLURM_PROCID="0", SLURM_LOCALID="0")
CLUSTER_VARIABLES = ("SLURM_", "OMPI_", "KUBERNETES_", "TPU_", "MEGASCALE_", "JAX_COORDINATOR")


@pytest.mark.parametrize("cluster", [False, True], ids=["lone_machine", "slurm"])
def test_processes_join_only_where_jax_detects_a_cluster(cluster):
  env = {k: v for k, v in os.environ.items() if not k.startswith(CLUSTER_VARIABLES)}
  if cluster:
    env.update(SLURM, JAX_COORDINATOR_PORT=str(_free_port()))
  probe = ("from li_dit.parallel import distributed; distributed.initialize_distributed(); "
           "import jax; print(jax.distributed.is_initialized(), jax.process_count())")
  result = subprocess.run([sys.executable, "-c", probe], cwd=smoke_runs.REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.split()[-2:] == [str(cluster), "1"]


PREEMPTIBLE = textwrap.dedent("""
    import sys, time
    from li_dit.parallel import distributed
    from li_dit.training import loop
    distributed.initialize_distributed(sys.argv[1], 2, int(sys.argv[2]))
    preemption = loop.Preemption()
    print("ready", flush=True)
    for step in range(1, 1000):
      time.sleep(0.05)  # A train step.
      if preemption.stop_after(step):
        break
    print("stopped after", step, flush=True)
""")


def test_sigterm_to_one_process_stops_all_after_the_same_step():
  address = f"127.0.0.1:{_free_port()}"
  stopped = []
  with smoke_runs.running([[sys.executable, "-c", PREEMPTIBLE, address, str(i)]
                           for i in range(2)]) as procs:
    for p in procs:  # Past jax.distributed.initialize, which installs the SIGTERM handler.
      while (line := p.stdout.readline()) and line != "ready\n":
        pass
    time.sleep(1)  # Both are stepping.
    procs[1].send_signal(signal.SIGTERM)
    for p in procs:
      stdout, stderr = p.communicate(timeout=300)
      assert p.returncode == 0, stderr[-3000:]
      stopped.append(int(stdout.split()[-1]))
  # Saving a checkpoint there together; a process left running would wait for the other forever.
  assert stopped[0] == stopped[1] < 999


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
  """1 process, 1 device, 7 steps without interruption."""
  workdir = str(tmp_path_factory.mktemp("one_device"))
  smoke_runs.train(workdir, 1, ONE_DEVICE, f"--config.total_steps={MORE}", *COMMON)
  return workdir


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory) -> tuple[str, list[str]]:
  """2 processes x 2 devices, 5 steps on mesh fsdp=2 (across the processes) x tensor=2 (within
  each): each process holds half the batch and half of every parameter sharded over fsdp.

  Returns the workdir and each process's stdout.
  """
  workdir = str(tmp_path_factory.mktemp("two_processes"))
  flags = ["--coordinator_address", f"127.0.0.1:{_free_port()}", "--num_processes", "2"]
  command = smoke_runs.command(workdir, dict(data=1, fsdp=2, tensor=2),
                               f"--config.total_steps={STEPS}", *COMMON, *flags)
  with smoke_runs.running([command + ["--process_id", str(i)] for i in range(2)],
                          env=smoke_runs.environment(2)) as procs:
    outputs = [p.communicate(timeout=900) for p in procs]
  for i, (p, (_, stderr)) in enumerate(zip(procs, outputs)):
    assert p.returncode == 0, f"process {i}: {stderr[-3000:]}"
  return workdir, [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_two_processes_train_like_one_device(reference, two_processes):
  workdir, _ = two_processes
  smoke_runs.assert_losses_close(smoke_runs.losses(workdir),
                                 smoke_runs.losses(reference)[:STEPS], "2 processes")
  smoke_runs.assert_params_close(smoke_runs.params(workdir, STEPS),
                                 smoke_runs.params(reference, STEPS),
                                 f"2 processes: parameters after {STEPS} steps")
  # Sampling runs on both processes over their sharded EMA params: the same grid.
  grids = [np.asarray(Image.open(os.path.join(w, "samples", f"step_{STEPS}.png")), np.int32)
           for w in (workdir, reference)]
  assert np.abs(grids[0] - grids[1]).max() <= 1  # Rounding to uint8 only.


@pytest.mark.slow
def test_only_process_zero_writes_the_run_files(two_processes):
  workdir, (stdout0, stdout1) = two_processes
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line)["step"] for line in f] == list(range(1, STEPS + 1))
  assert len(os.listdir(os.path.join(workdir, "tensorboard"))) == 1
  assert os.listdir(os.path.join(workdir, "samples")) == [f"step_{STEPS}.png"]
  assert f"step {STEPS}/{STEPS}" in stdout0 and "mesh " in stdout0
  assert "step " not in stdout1 and "mesh " not in stdout1
  # Both processes saved the one checkpoint, each with its data-iterator state.
  ckpt = checkpoints.Checkpointer(workdir)
  assert ckpt.latest_step() == STEPS and ckpt.data_process_count(STEPS) == 2
  ckpt.close()


@pytest.mark.slow
def test_checkpoint_of_two_processes_resumes_on_one_process_with_another_mesh(
    reference, two_processes, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(two_processes[0], workdir)
  # 1 process, mesh fsdp=2: the arrays saved over 2 processes are resharded on restore; the
  # data continues at global batch 5 (grain's state of 2 processes does not restore on 1).
  result = smoke_runs.train(workdir, 2, dict(data=1, fsdp=2, tensor=1),
                            f"--config.total_steps={MORE}", *COMMON, "--config.sample_every=0")
  assert f"the data restarts at global batch {STEPS}" in result.stderr
  assert f"step {STEPS + 1}/{MORE}" in result.stdout and f"step {STEPS}/{MORE}" not in result.stdout
  smoke_runs.assert_losses_close(smoke_runs.losses(workdir), smoke_runs.losses(reference),
                                 "resumed on 1 process")
  smoke_runs.assert_params_close(smoke_runs.params(workdir, MORE),
                                 smoke_runs.params(reference, MORE),
                                 f"resumed on 1 process: parameters after {MORE} steps")
