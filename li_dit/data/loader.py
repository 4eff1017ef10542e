"""Data iterators that are closed on purpose and in bounded time, never by the garbage collector.

A grain iterator with prefetch threads and worker processes shuts down in its `close()`, which
joins those threads and processes; grain also calls it from `__del__`. Left to the garbage
collector, that join runs in whatever thread the collector fires in (an import, an HTTP
client's pool bookkeeping) and waits on a prefetch thread that waits on a worker that produces
nothing more (it reads from a server that is gone, or is stuck in a transform): the whole
process hangs. Hence, for every iterator the project opens:

  * its owner closes it (`with iter(dataset) as batches:`, or `close()` in a `finally`);
  * closing finishes within `close_timeout` seconds plus a grace period: past the timeout the
    iterator's worker processes are killed, which unblocks every thread waiting on them;
  * an iterator dropped without `close()` is handed to a reaper thread, which closes it the same
    bounded way; the collector only enqueues it and never blocks;
  * a worker process whose parent is gone exits (`exit_with_parent`, grain's worker_init_fn): a
    trainer killed by SIGKILL alone (the kernel's OOM killer) or aborted by a failed check
    cannot close anything, and its orphaned workers would otherwise live on, holding its
    shared memory and the pipes of whoever started it.
"""
from __future__ import annotations

import collections
import concurrent.futures
import functools
import gc
import json
import multiprocessing
import multiprocessing.process
import os
import queue
import threading
import time
import weakref
from typing import Any, Iterator

import grain
import grain.multiprocessing
from absl import logging

# A healthy pipeline closes in about 2 s (its workers notice the stop event within a second).
CLOSE_TIMEOUT_S = 20.0
# After its workers are killed, the threads that waited on them finish within a second.
_GRACE_S = 10.0


# How often a worker checks that its parent is alive.
_PARENT_POLL_S = 1.0


def exit_with_parent(worker_index: int, worker_count: int) -> None:
  """grain worker_init_fn: a daemon thread in the worker process that ends the process once the
  process that started it is gone (its parent id changes)."""
  del worker_index, worker_count
  parent = multiprocessing.parent_process()
  if parent is None:  # Not a worker process: nothing to watch.
    return

  def watch():
    while os.getppid() == parent.pid:
      time.sleep(_PARENT_POLL_S)
    os._exit(1)  # pylint: disable=protected-access  # No cleanup to run: the parent is gone.

  threading.Thread(target=watch, name="li-dit-parent-watch", daemon=True).start()


class DataIterator(Iterator[Any]):
  """An iterator over a grain pipeline that its owner closes: `with iter(dataset) as it:`.

  It also speaks the state protocol of grain's orbax checkpoint handler (`get_state` bytes,
  `set_state`, `start_prefetch`), writing the same JSON file as the grain iterator it wraps.
  """

  def __init__(self, iterator: grain.DatasetIterator, close_timeout: float = CLOSE_TIMEOUT_S):
    self._iterator = iterator
    self._close_timeout = close_timeout
    _ensure_reaper()
    # Holds the grain iterator strongly, so the collector can never reach grain's __del__
    # before the reaper has closed it.
    self._finalizer = weakref.finalize(self, _reap_later, iterator, close_timeout)
    self._finalizer.atexit = False  # At exit grain's own multiprocessing finalizers run.

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> Any:
    if not self._finalizer.alive:
      raise ValueError("the data iterator is closed")
    batch = next(self._iterator)
    _take_shared_memory(batch)
    return batch

  def __enter__(self) -> DataIterator:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def close(self) -> None:
    """Stops prefetching and the worker processes; at most close_timeout + a few seconds.

    Idempotent."""
    detached = self._finalizer.detach()
    if detached is not None:
      _, _, (iterator, timeout), _ = detached
      close_within(iterator, timeout)

  @property
  def closed(self) -> bool:
    return not self._finalizer.alive

  def get_state(self) -> bytes:
    return json.dumps(self._iterator.get_state(), indent=4).encode()

  def set_state(self, state: bytes) -> None:
    self._iterator.set_state(json.loads(state))

  def start_prefetch(self) -> None:
    self._iterator.start_prefetch()

  def worker_processes(self) -> list[multiprocessing.process.BaseProcess]:
    """The worker processes this iterator has started (for tests and diagnostics)."""
    return _worker_processes(self._iterator)


class Dataset:
  """A grain IterDataset whose iterators are `DataIterator`s."""

  def __init__(self, dataset: grain.IterDataset, close_timeout: float = CLOSE_TIMEOUT_S):
    self.dataset = dataset
    self.close_timeout = close_timeout

  def __iter__(self) -> DataIterator:
    return DataIterator(iter(self.dataset), self.close_timeout)


def close_within(iterator: grain.DatasetIterator, timeout: float) -> bool:
  """Closes a grain iterator, killing its worker processes if that takes over `timeout` s.

  Returns whether it closed (False: a thread stayed stuck even after the kill; it is a daemon
  and left behind, logged).
  """
  start = time.monotonic()
  # Found before closing starts: closing drops grain's references to workers it is still joining.
  workers = _worker_processes(iterator)
  closer = threading.Thread(target=_close, args=(iterator,), name="li-dit-data-close",
                            daemon=True)
  closer.start()
  closer.join(timeout)
  if closer.is_alive():
    workers = [p for p in workers if p.is_alive()]
    logging.warning("a data iterator did not close within %.0f s: killing its worker processes "
                    "%s", timeout, [p.pid for p in workers])
    for process in workers:
      process.kill()
    closer.join(_GRACE_S)
    if closer.is_alive():
      logging.error("a data iterator is still closing %.0f s after its workers were killed; "
                    "leaving its threads behind", time.monotonic() - start)
      _abandoned.append(iterator)  # Never reached by the collector (grain's __del__ would block).
      return False
  return True


def _close(iterator: grain.DatasetIterator) -> None:
  try:
    iterator.close()
  except Exception as e:  # pylint: disable=broad-except
    # A pipeline that failed (a dead worker) can fail again while closing; it is closed anyway.
    logging.warning("closing a data iterator: %s: %s", type(e).__name__, e)


def _take_shared_memory(batch: Any) -> None:
  """Unlinks the /dev/shm names of the batch's arrays (grain's worker processes hand arrays over
  in shared memory) as soon as this process holds them.

  The memory stays mapped while the arrays live; only the name goes. grain unlinks a name when
  its array is garbage collected, through a thread pool: the arrays of the last batches, freed
  as the program ends, would outlive that pool and be reported as leaked by the resource tracker.
  """
  for leaf in batch.values() if isinstance(batch, dict) else (batch,):
    # pylint: disable-next=protected-access
    if isinstance(leaf, grain.multiprocessing.SharedMemoryArray) and leaf._unlink_on_del:
      leaf.shm.unlink()
      leaf._unlink_on_del = False  # pylint: disable=protected-access  # Unmapped on del only.


def _worker_processes(iterator: Any) -> list[multiprocessing.process.BaseProcess]:
  """The processes reachable from a grain iterator through grain's own objects and the
  containers and futures that hold them (interleaved shards, iterators made in advance)."""
  containers = (list, tuple, dict, set, frozenset, collections.deque, functools.partial,
                concurrent.futures.Future)
  found, seen, stack = [], set(), [iterator]
  while stack:
    obj = stack.pop()
    if id(obj) in seen:
      continue
    seen.add(id(obj))
    if isinstance(obj, multiprocessing.process.BaseProcess):
      found.append(obj)
    elif isinstance(obj, containers) or type(obj).__module__.startswith("grain."):
      stack.extend(gc.get_referents(obj))
  return found


# Iterators dropped without close(), closed one at a time by a daemon thread. SimpleQueue.put is
# safe in a finalizer: it takes no lock another thread could hold while the collector runs.
_dropped: queue.SimpleQueue = queue.SimpleQueue()
_reaper: threading.Thread | None = None
_reaper_lock = threading.Lock()
_abandoned: list[grain.DatasetIterator] = []


def _ensure_reaper() -> None:
  global _reaper
  with _reaper_lock:
    if _reaper is None or not _reaper.is_alive():  # Not alive: a forked child.
      _reaper = threading.Thread(target=_reap_forever, name="li-dit-data-reaper", daemon=True)
      _reaper.start()


def _reap_later(iterator: grain.DatasetIterator, timeout: float) -> None:
  _dropped.put((iterator, timeout))


def _reap_forever() -> None:
  while True:
    iterator, timeout = _dropped.get()
    logging.warning("a data iterator was dropped without close(); closing it in the background")
    close_within(iterator, timeout)
    del iterator
