"""Orbax checkpoints of a run: params, EMA params, optimizer state, data iterator, config and
the run's counters (records skipped so far, by reason).

Layout: <workdir>/checkpoints/<step>/{params,ema_params,opt_state,data,config,counters}. Each item can
be restored on its own (sampling reads only `ema_params` or `params`). Saves are asynchronous;
orbax writes into a temporary directory and renames it when complete, so a run killed in the
middle of a save leaves the previous checkpoint as the latest one, never a half-written one.
The frozen LLMs are not saved: they are loaded from their own files.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Callable, Iterator

import grain
import grain.checkpoint
import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils

from li_dit import config_lib
from li_dit.io import paths

ARRAY_ITEMS = ("params", "ema_params", "opt_state")


class CheckpointError(RuntimeError):
  """A checkpoint that is missing or does not fit the model; names the step and item."""


class CheckpointMismatch(CheckpointError):
  """A readable checkpoint whose tree or shapes differ from the model's: a wrong config, not a
  damaged checkpoint, so nothing is moved aside."""


# What reading a damaged checkpoint raises: orbax and tensorstore errors (ValueError, e.g. JSON
# or decode errors; KeyError, a missing item), missing files, our own CheckpointError.
_DAMAGE = (CheckpointError, ValueError, KeyError, TypeError, OSError)


def checkpoint_dir(workdir: str) -> str:
  """<workdir>/checkpoints, absolute (orbax wants it so); gs:// paths as they are."""
  path = os.path.join(workdir, "checkpoints")
  return path if paths.is_remote(path) else os.path.abspath(path)


class Checkpointer:
  """One run's CheckpointManager (every process must create it and join saves/restores)."""

  def __init__(self, workdir: str, keep: int = 3, async_save: bool = True, create: bool = True,
               keep_every: int = 0):
    """Keeps the newest `keep` checkpoints and, for good, every one whose step is a multiple
    of `keep_every` (0: none). `create`: make <workdir>/checkpoints if missing (False: a run
    only read from)."""
    if not create and not epath.Path(checkpoint_dir(workdir)).is_dir():
      raise CheckpointError(f"no checkpoints in {workdir} (no {checkpoint_dir(workdir)})")
    if jax.process_count() == 1:
      # orbax splits the writing of a replicated array among its replicas ("replica parallel"),
      # one slice per replica, each a small jit compiled on first use (~20 s of compiles at the
      # first save of a smoke run on 8 host devices). In one process the same host writes every
      # slice, so the split spreads no I/O; it pays only across processes.
      # The default handler's metadata store is kept (orbax exports no public name for it).
      default = ocp.type_handlers.get_type_handler(jax.Array)
      ocp.type_handlers.register_type_handler(jax.Array, ocp.type_handlers.ArrayHandler(
          use_replica_parallel=False,
          array_metadata_store=getattr(default, "_array_metadata_store", None)), override=True)
    self._saving: int | None = None  # The step of the last save started.
    self._save_failed = False
    handlers = {name: ocp.StandardCheckpointHandler() for name in ARRAY_ITEMS}
    handlers["data"] = grain.checkpoint.CheckpointHandler()
    handlers["config"] = ocp.JsonCheckpointHandler()
    handlers["counters"] = ocp.JsonCheckpointHandler()
    self.manager = ocp.CheckpointManager(
        checkpoint_dir(workdir),
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, keep_period=keep_every or None,
                                             enable_async_checkpointing=async_save,
                                             create=create),
        item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, arrays: dict[str, Any], data_iterator: Any,
           config: ml_collections.ConfigDict, counters: dict[str, float] | None = None,
           force: bool = False) -> bool:
    """Starts an (async) save of `arrays` (the ARRAY_ITEMS), the data iterator, the config and
    `counters` (run totals through `step`, e.g. {"skipped/empty_file": 2})."""
    args = {name: ocp.args.StandardSave(arrays[name]) for name in ARRAY_ITEMS}
    args["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    args["config"] = ocp.args.JsonSave(config_lib.to_json(config))
    args["counters"] = ocp.args.JsonSave(dict(counters or {}))
    # orbax raises a failed async save (e.g. a full disk) here, at the next save, or in wait();
    # the cause names the file, whose directory names the step.
    self._saving = step
    with self._save_failures():
      return self.manager.save(step, args=ocp.args.Composite(**args), force=force)

  def restore(self, step: int, abstract: dict[str, Any], data_iterator: Any | None = None
              ) -> dict[str, Any]:
    """Restores the items named in `abstract` (trees of ShapeDtypeStruct with shardings).

    The arrays are resharded to the given shardings, whatever mesh and number of processes
    saved them. The data iterator, if given, is restored in place, and only once the arrays
    are read, so a failure leaves the caller's state untouched. It restores only under the
    number of processes that saved it (`data_process_count`).
    """
    self._check_step(step)
    restored = self._restore(step, {name: ocp.args.StandardRestore(tree)
                                    for name, tree in abstract.items()})
    if data_iterator is not None:
      self.restore_data(step, data_iterator)
    return {name: restored[name] for name in abstract}

  def restore_data(self, step: int, data_iterator: Any) -> None:
    """Restores `data_iterator` in place to its state at `step` (`data_process_count` processes
    only)."""
    self._restore(step, {"data": grain.checkpoint.CheckpointRestore(data_iterator)})

  def check_shapes(self, step: int, item: str, abstract: Any) -> None:
    """Raises CheckpointError unless array item `item` of `step` has the tree and leaf shapes of
    `abstract` (arrays or ShapeDtypeStructs); reads metadata only. The message names the first
    parameter path that differs and both shapes."""
    self._check_step(step)
    metadata = self.manager.item_metadata(step)[item]
    saved = _leaf_shapes(getattr(metadata, "tree", metadata))
    wanted = _leaf_shapes(abstract)
    where = f"checkpoint step {step} in {self.manager.directory}, item {item}"
    for path in sorted(wanted.keys() | saved.keys()):
      if path not in saved:
        raise CheckpointMismatch(f"{where}: has no parameter {path} (the model's is "
                                 f"{wanted[path]})")
      if path not in wanted:
        raise CheckpointMismatch(f"{where}: parameter {path} {saved[path]} is not in the model")
      if saved[path] != wanted[path]:
        raise CheckpointMismatch(f"{where}: parameter {path} has shape {saved[path]}, the "
                                 f"model's is {wanted[path]}")

  def restore_whole(self, abstract: dict[str, Any] | Callable[[int], dict[str, Any]],
                    step: int | None = None, data_iterator: Any | None = None
                    ) -> tuple[int, dict[str, Any]]:
    """(step, items of `abstract`) from the newest checkpoint that restores whole (or `step`).

    `abstract`: {item: tree of ShapeDtypeStructs}, or a function of the step giving it (e.g.
    read from that step's metadata; its read errors count as damage).

    Every item's tree and shapes are checked against the checkpoint's metadata first: a
    mismatch raises CheckpointMismatch and moves nothing (a wrong config, not damage). A
    checkpoint that cannot be read whole (a missing item, a truncated or corrupt file,
    unreadable metadata) is reported (step, item, cause), moved aside to
    checkpoints/<step>.damaged (never deleted, never half-loaded: nothing is returned and the
    data iterator, restored last, is untouched) and the next older one is tried; with `step`
    given, no other. CheckpointError naming every step tried when none restores.
    """
    if step is not None:
      self._check_step(step)
    candidates = [step] if step is not None else sorted(self.manager.all_steps(), reverse=True)
    if not candidates:
      raise CheckpointError(f"no checkpoint in {self.manager.directory}")
    abstract_at = abstract if callable(abstract) else lambda _: abstract
    tried = []
    for candidate in candidates:
      item = "metadata"
      try:
        wanted = abstract_at(candidate)
        for item, tree in wanted.items():
          self.check_shapes(candidate, item, tree)
        restored = {}
        for item, tree in wanted.items():
          restored[item] = self._restore(candidate, {item: ocp.args.StandardRestore(tree)})[item]
        if data_iterator is not None:
          item = "data"
          self.restore_data(candidate, data_iterator)
        return candidate, restored
      except CheckpointMismatch:
        raise
      except _DAMAGE as e:
        cause = " ".join(str(e).split())[:300] or type(e).__name__
        aside = self._move_aside(candidate)
        print(f"checkpoint step {candidate} is damaged (item {item}: {cause}); moved to {aside}",
              file=sys.stderr, flush=True)
        tried.append(f"{candidate} (item {item}: {cause})")
    raise CheckpointError(f"no checkpoint in {self.manager.directory} restores whole; tried "
                          f"step {'; step '.join(tried)}")

  def _move_aside(self, step: int) -> epath.Path:
    """Renames checkpoint `step` to <step>.damaged (.damaged.1, ... if taken); one process
    renames, all wait for it."""
    source = self.manager.directory / str(step)
    target = self.manager.directory / f"{step}.damaged"
    n = 0
    while target.exists():
      n += 1
      target = self.manager.directory / f"{step}.damaged.{n}"
    # Every process has chosen the same name before process 0 renames.
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"li_dit_checkpoint_{step}_named")
    if jax.process_index() == 0:
      source.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"li_dit_checkpoint_{step}_moved_aside")
    self.manager.reload()
    return target

  def data_process_count(self, step: int) -> int | None:
    """How many processes saved the data-iterator state of `step` (None: it has none).

    grain's handler writes one state file per process, process_<i>-of-<n>.json, and restores
    only under the same n.
    """
    self._check_step(step)
    for path in (self.manager.directory / str(step) / "data").glob("process_*-of-*.json"):
      return int(path.stem.rsplit("-of-", 1)[1])
    return None

  def restore_config(self, step: int) -> ml_collections.ConfigDict:
    """The config saved with `step`; CheckpointError if it does not read."""
    self._check_step(step)
    text = self._restore(step, {"config": ocp.args.JsonRestore()})["config"]
    try:
      return config_lib.from_json(text)
    except (ValueError, TypeError, KeyError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.manager.directory}: its config "
                            f"does not read: {e}") from e

  def newest_config(self, step: int | None = None) -> ml_collections.ConfigDict:
    """The config of checkpoint `step`, or of the newest checkpoint whose config reads (a run's
    checkpoints share it; a damaged one is left for restore_whole to move aside)."""
    if step is not None:
      return self.restore_config(step)
    if not self.manager.all_steps():
      raise CheckpointError(f"no checkpoint in {self.manager.directory}")
    errors = []
    for candidate in sorted(self.manager.all_steps(), reverse=True):
      try:
        return self.restore_config(candidate)
      except CheckpointError as e:
        errors.append(str(e))
    raise CheckpointError(f"no checkpoint in {self.manager.directory} has a config that reads"
                          + (f": {'; '.join(errors)}" if errors else ""))

  def restore_counters(self, step: int) -> dict[str, float]:
    """The counters saved with `step` ({} for a checkpoint written before they existed)."""
    self._check_step(step)
    if not (self.manager.directory / str(step) / "counters").exists():
      return {}
    return dict(self._restore(step, {"counters": ocp.args.JsonRestore()})["counters"])

  def wait(self) -> None:
    """Waits for a save in flight; CheckpointError if it failed."""
    with self._save_failures():
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for a save in flight, then releases the manager's threads. A failed save is
    CheckpointError, unless one was raised already."""
    with self._save_failures():
      self.manager.close()

  @contextlib.contextmanager
  def _save_failures(self) -> Iterator[None]:
    """A save that failed (in orbax's background threads) -> one CheckpointError naming the
    step, the directory and the cause; raised once. orbax leaves the step's temporary directory,
    which the next start ignores, so the checkpoints before it stay the ones a restart uses."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except  # Whatever the storage raised.
      if self._save_failed:
        return
      self._save_failed = True
      cause = " ".join(str(e).split())
      raise CheckpointError(f"saving checkpoint step {self._saving} in {self.manager.directory} "
                            f"failed: {type(e).__name__}: {cause}") from e

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _check_step(self, step: int) -> None:
    if step not in self.manager.all_steps():
      raise CheckpointError(f"no checkpoint for step {step} in {self.manager.directory}; "
                            f"available steps: {sorted(self.manager.all_steps())}")

  def _restore(self, step: int, args: dict[str, Any]) -> Any:
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**args))
    except (ValueError, KeyError, FileNotFoundError) as e:
      raise CheckpointError(f"checkpoint step {step} in {self.manager.directory} does not match "
                            f"the model or is incomplete: {e}") from e


def _leaf_shapes(tree: Any) -> dict[str, tuple[int, ...]]:
  """{path: shape} of a tree's leaves. Paths name keys, attributes and indices alike, since
  orbax's metadata stores a namedtuple (optax states) as a dict and a tuple as a list."""
  def name(key):
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        return f"[{getattr(key, attr)!r}]"
    return str(key)
  return {"".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def parse_checkpoint_path(path: str) -> tuple[str, int | None]:
  """A run's workdir, or <workdir>/checkpoints/<step> -> (workdir, step; None: the latest)."""
  parts = path.rstrip("/").rsplit("/", 2)
  if len(parts) == 3 and parts[1] == "checkpoints" and parts[2].isdigit():
    return parts[0] or "/", int(parts[2])
  return path, None


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, the target of a restore."""
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)),
      tree)
