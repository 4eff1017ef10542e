"""TPU chip facts by `jax.Device.device_kind`: bf16 matmul peak and HBM per chip (public specs)."""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # bf16 dense matmul FLOP/s per chip
  hbm_bytes: int


_GIB = 2 ** 30
_V4 = Chip("v4", 275e12, 32 * _GIB)
_V5E = Chip("v5e", 197e12, 16 * _GIB)
_V5P = Chip("v5p", 459e12, 95 * _GIB)
_V6E = Chip("v6e", 918e12, 32 * _GIB)

# device_kind as jax reports it (v5e is "TPU v5 lite", v5p "TPU v5", v6e "TPU v6 lite").
CHIPS: dict[str, Chip] = {
    "TPU v4": _V4,
    "TPU v5 lite": _V5E, "TPU v5e": _V5E,
    "TPU v5": _V5P, "TPU v5p": _V5P,
    "TPU v6 lite": _V6E, "TPU v6e": _V6E,
}


def chip(device_kind: str) -> Chip:
  """The Chip of a device kind; ValueError naming the known kinds otherwise."""
  if device_kind not in CHIPS:
    raise ValueError(f"unknown TPU device kind {device_kind!r}; known: {sorted(CHIPS)}")
  return CHIPS[device_kind]
