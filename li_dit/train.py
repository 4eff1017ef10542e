r"""Trains LI-DiT with rectified flow.

  python -m li_dit.train --config configs/demo.py --workdir workdirs/demo [--config.a.b=v ...]

A run lives in its workdir: checkpoints/ (orbax: params, EMA, optimizer and data-iterator state,
config), metrics.jsonl (one JSON object per logged step), tensorboard/, samples/step_<N>.png and
config.json. Starting the same command again resumes from the latest checkpoint: the same step
count and the same data order as an uninterrupted run. SIGTERM (e.g. a preemption notice) saves
a checkpoint after the current step (with several processes: a step all of them reach) and exits.

Several processes (hosts) train one model together, each loading its share of every global
batch. On TPU pod slices (and Slurm or Open MPI jobs) JAX finds its peers by itself; elsewhere
start every process with the same `--coordinator_address HOST:PORT --num_processes N` and its own
`--process_id I`. Process 0 writes config.json, metrics, TensorBoard and samples; all of them
save checkpoints together. A checkpoint resumes on any number of processes and any mesh.
"""
from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from li_dit import cli
from li_dit import config_lib
from li_dit.io import checkpoints
from li_dit.parallel import distributed
from li_dit.training import loop
from li_dit.training import nonfinite

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created, or resumed).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None,
    "HOST:PORT of process 0, for a multi-process run started by hand (with --num_processes and "
    "--process_id). Without these flags processes join only where JAX detects a cluster.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process: 0 .. num_processes - 1.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  distributed.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value,
                                     _PROCESS_ID.value)
  with cli.one_line_failures("li_dit.train", config_lib.ConfigError, checkpoints.CheckpointError,
                             nonfinite.Diverged):
    loop.train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
