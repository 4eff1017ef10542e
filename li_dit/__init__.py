"""li-dit: LI-DiT text-to-image models in JAX/Flax, from one CPU to TPU pods.

On a machine with no accelerator, JAX is kept to its CPU backend (JAX_PLATFORMS=cpu) unless the
user chose platforms: libtpu, when installed (the `test` and `tpu` extras), would otherwise try
to initialise a TPU on every start, print its errors, and hold /tmp/libtpu_lockfile against
every other JAX process of the machine. The decision comes from the machine (PCI devices and
device files), so a TPU VM still finds its chips; tools/aot_compile.py, which needs libtpu on a
CPU, asks for every platform itself. Nothing here imports JAX (li_dit.export.torch.model runs
without).
"""
import glob
import os
import sys

# PCI vendor ids of accelerators JAX has backends for: Google (TPU), NVIDIA, AMD.
_ACCELERATOR_VENDORS = ("0x1ae0", "0x10de", "0x1002")
_ACCELERATOR_FILES = ("/dev/accel*", "/dev/vfio/[0-9]*", "/dev/nvidia[0-9]*", "/dev/kfd")


def _has_accelerator() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() in _ACCELERATOR_VENDORS:
          return True
    except OSError:
      continue
  return any(glob.glob(pattern) for pattern in _ACCELERATOR_FILES)


if "JAX_PLATFORMS" not in os.environ and not _has_accelerator():
  os.environ["JAX_PLATFORMS"] = "cpu"
  if "jax" in sys.modules:  # Imported first (a notebook, a test): its config read the env already.
    try:
      sys.modules["jax"].config.update("jax_platforms", "cpu")
    except (AttributeError, RuntimeError):  # Partly imported, or backends already started.
      pass
