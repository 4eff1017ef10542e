"""Joining the processes (hosts) of a multi-process run.

On TPU pod slices (and Slurm or Open MPI jobs) JAX finds its peers by itself; elsewhere every
process is started with the same coordinator address and process count and its own id
(`li_dit.train --coordinator_address HOST:PORT --num_processes N --process_id I`).
"""
from __future__ import annotations

import jax


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Joins the processes of a multi-process run. Call it before anything touches a device.

  Given any argument, the run was started by hand: jax.distributed.initialize gets them (and
  fills the others from a detected cluster, or fails naming them). Given none, it is called only
  where JAX detects a cluster by itself; on a lone machine it would fail for want of a
  coordinator, and one process needs none.
  """
  if (coordinator_address, num_processes, process_id) == (None, None, None) and (
      not _cluster_detected()):
    return
  # Collectives between the CPU devices of different processes go through gloo (CPU runs).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def _cluster_detected() -> bool:
  """Whether jax.distributed.initialize() finds its coordinator, process count and id itself.

  JAX's own detection (its ClusterEnv: GCE and GKE TPU slices, multi-slice, Slurm, Open MPI,
  Kubernetes); no public API asks it without initializing.
  """
  from jax._src import clusters
  return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
             if not env.opt_in_only_method)
