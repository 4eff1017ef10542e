"""The environment of a process whose mesh is simulated with host CPU devices (the rehearsal, the
multi-device tests): jax reads it when it starts, so a parent sets it for its child process.

XLA:CPU runs every device's share of a launch on one thread pool, PJRT_NPROC threads (default:
one per core, at least one per device). A device with two independent collectives ready may
start both, each holding a pool thread until its peers arrive; with a thread per device, the last
device's collective then finds no free thread, every thread waits on another, and after 40 s XLA
aborts the process ("Termination timeout ... Expected 8 threads to join the rendezvous, but only
7 of them arrived on time"). Measured on 2 cores: 2 of 4 rehearsals (8 devices) died so.
Four threads per device leave room for that.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

THREADS_PER_DEVICE = 4


def environment(devices: int, xla_flags: Sequence[str] = (),
                base: Mapping[str, str] | None = None) -> dict[str, str]:
  """`base` (default: this process's environment) with `devices` host CPU devices, `xla_flags`
  as XLA_FLAGS, and the pool threads they need (a PJRT_NPROC already set is kept)."""
  env = dict(os.environ if base is None else base)
  env["XLA_FLAGS"] = " ".join([f"--xla_force_host_platform_device_count={devices}", *xla_flags])
  env.setdefault("PJRT_NPROC", str(max(os.cpu_count() or 1, THREADS_PER_DEVICE * devices)))
  return env
