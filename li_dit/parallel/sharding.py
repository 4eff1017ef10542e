"""Device mesh, logical-axis rules and host <-> global array helpers.

Parameters and activations carry logical axis names (li_dit.models.layers); one rules table
(`config.sharding_rules`) maps each name to mesh axes. The mesh has the axes `data` (pure data
parallelism), `fsdp` (data parallelism with parameters and optimizer state sharded) and `tensor`
(model parallelism inside matmuls). One device is a mesh too, so the same code runs everywhere.
"""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axes. Batch is split over every data-parallel axis; weights over fsdp
# (their "embed" side) and tensor (their "mlp"/"heads" side).
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("text_length", None),
    ("embed", "fsdp"),
    ("embed_in", None),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("modulation", "tensor"),
    ("layers", None),
    ("conv_h", None),
    ("conv_w", None),
)


def mesh_shape(sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
  """Resolves the mesh sizes (one of them may be -1: the rest of the devices).

  Raises ValueError naming the sizes when they do not multiply to `num_devices`.
  """
  unknown = [a for a in sizes if a not in MESH_AXES]
  if unknown:
    raise ValueError(f"unknown mesh axes {unknown}; the mesh axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if shape.count(-1) > 1:
    raise ValueError(f"at most one mesh size may be -1, got {dict(zip(MESH_AXES, shape))}")
  if -1 in shape:
    known = math.prod(s for s in shape if s != -1)
    if num_devices % known:
      raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} does not divide {num_devices} devices")
    shape[shape.index(-1)] = num_devices // known
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {math.prod(shape)} devices, "
                     f"there are {num_devices}")
  return tuple(shape)


def make_mesh(sizes: Mapping[str, int], devices: Sequence[jax.Device] | None = None,
              dcn_sizes: Mapping[str, int] | None = None) -> Mesh:
  """A Mesh with axes (data, fsdp, tensor) over `devices` (default: all devices).

  Args:
    sizes: each axis's size within a slice (ICI); one may be -1.
    dcn_sizes: each axis's size across slices (DCN), multiplying `sizes`; one may be -1 (the
      number of slices). All 1 (the default): one slice, `sizes` span every device. On TPU a
      slice is `device.slice_index`; elsewhere each process stands for a slice.
  """
  devices = list(jax.devices() if devices is None else devices)
  dcn_sizes = dict(dcn_sizes or {})
  on_tpu = devices[0].platform == "tpu"
  # Single-slice TPU devices may lack slice_index (compile-only topologies do).
  granule_attr = "slice_index" if on_tpu else "process_index"
  granules = len({getattr(d, granule_attr, 0) for d in devices})
  if all(int(v) == 1 for v in dcn_sizes.values()):
    if on_tpu and granules > 1:
      raise ValueError(f"the devices span {granules} TPU slices; give the mesh across slices "
                       "(config.dcn_mesh, e.g. data=-1)")
    shape = mesh_shape(sizes, len(devices))
    if on_tpu:
      # Physical order: neighbours on a mesh axis are neighbours on the ICI torus.
      grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    else:
      grid = np.asarray(devices).reshape(shape)
  else:
    dcn_shape = mesh_shape(dcn_sizes, granules)
    ici_shape = mesh_shape(sizes, len(devices) // granules)
    # Slices (or processes) outermost on each axis: only the DCN part of an axis crosses them.
    grid = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, process_is_granule=granule_attr == "process_index",
        allow_split_physical_axes=True)
  # Auto axes: XLA propagates shardings from the annotated params, inputs and constraints.
  return Mesh(grid, MESH_AXES,
              axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def rules_from_config(rules: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
  """Config rules (a list of [name, axes] pairs, axes None, a str or a list) as a tuple."""
  if rules is None:
    return DEFAULT_RULES
  out = []
  for name, axes in rules:
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"sharding rule for {name!r} names mesh axis {a!r}; "
                         f"the mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def divisible_shardings(logical_specs: Any, shapes: Any, mesh: Mesh, rules) -> Any:
  """A tree of logical PartitionSpecs -> NamedShardings on `mesh`, leaving an array axis whole
  where its mesh axes do not divide it (a frozen LLM's vocabulary, a width of 1152 over 256
  devices) instead of failing: such an array is sharded wherever the mesh does divide it.

  Args:
    logical_specs: tree of logical PartitionSpecs; shapes: the matching tree of arrays or
      ShapeDtypeStructs.
  """
  def fit(spec: PartitionSpec, shape: Any) -> NamedSharding:
    mesh_spec = tuple(nn.logical_to_mesh_axes(spec, rules)) + (None,) * len(shape.shape)
    return NamedSharding(mesh, PartitionSpec(
        *(dividing_axes(entry, size, mesh) for size, entry in zip(shape.shape, mesh_spec))))
  return jax.tree_util.tree_map(fit, logical_specs, shapes,
                                is_leaf=lambda x: isinstance(x, PartitionSpec))


def dividing_axes(axes: str | tuple[str, ...] | None, size: int,
                  mesh: Mesh | jax.sharding.AbstractMesh) -> str | tuple[str, ...] | None:
  """The leading mesh axes of one PartitionSpec entry that evenly split an array axis of `size`
  (a PartitionSpec entry again: None, one name or a tuple of names)."""
  names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
  kept, ways = [], 1
  for name in names:
    if size % (ways * mesh.shape[name]) == 0:
      kept.append(name)
      ways *= mesh.shape[name]
  return tuple(kept) if len(kept) > 1 else (kept[0] if kept else None)


def batch_sharding(mesh: Mesh, ndim: int, rules) -> NamedSharding:
  """Sharding of a [B,...] batch array: B over the data-parallel axes, the rest replicated."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh, rules) -> int:
  """How many ways the batch is split."""
  spec = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = () if spec is None else (spec if isinstance(spec, tuple) else (spec,))
  return math.prod(mesh.shape[a] for a in axes)


def host_to_global(local_batch: Any, mesh: Mesh, rules) -> Any:
  """Each host's slice of the batch (numpy, [B/hosts,...]) -> global jax Arrays [B,...]."""
  def put(x):
    return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim, rules), x)
  return jax.tree_util.tree_map(put, local_batch)


def memory_footprint(tree: Any) -> tuple[int, int]:
  """(total bytes, bytes held by the first device) of a tree of jax Arrays."""
  leaves = jax.tree_util.tree_leaves(tree)
  total = sum(x.nbytes for x in leaves)
  device = jax.devices()[0]
  per_device = sum(s.data.nbytes for x in leaves for s in x.addressable_shards
                   if s.device == device)
  return total, per_device
