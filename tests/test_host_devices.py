"""A process on simulated host devices (li_dit.parallel.host_devices) gets the XLA:CPU pool threads
its collectives need: four per device, where XLA's default on 2 cores is one per device, with
which a launch can deadlock on its own collectives and abort after 40 s."""
import os
import subprocess
import sys

from li_dit.parallel import host_devices

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Runs one collective over 8 devices, then counts the threads of XLA:CPU's pool by name.
COUNT_POOL_THREADS = """
import os, jax, jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((8,), ("d",))
psum = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x, "d"), mesh=mesh, in_specs=P("d"),
                             out_specs=P()))
assert psum(jax.device_put(jnp.ones((8, 2)), NamedSharding(mesh, P("d"))))[0, 0] == 8
names = [open(f"/proc/self/task/{t}/comm").read().strip() for t in os.listdir("/proc/self/task")]
print(len(jax.devices()), names.count("tf_XLAEigen"))
"""


def _devices_and_pool_threads(env):
  result = subprocess.run([sys.executable, "-c", COUNT_POOL_THREADS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return tuple(int(n) for n in result.stdout.split())


def test_eight_host_devices_get_four_pool_threads_each():
  base = {k: v for k, v in os.environ.items() if k not in ("PJRT_NPROC", "NPROC")}
  devices, threads = _devices_and_pool_threads(
      host_devices.environment(8, base=dict(base, JAX_PLATFORMS="cpu")))
  assert devices == 8 and threads >= 4 * 8
  # A count the caller chose is kept.
  assert _devices_and_pool_threads(host_devices.environment(
      8, base=dict(base, JAX_PLATFORMS="cpu", PJRT_NPROC="12"))) == (8, 12)
