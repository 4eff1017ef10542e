"""Data iterators close on purpose and in bounded time (li_dit.data.loader): a pipeline whose
workers are stuck, dropped without close() and found by the garbage collector while another
thread imports a module, neither blocks the collector nor outlives its timeout; explicit close
kills stuck and copes with dead workers; no shared memory is left behind; workers do not outlive
the process that started them."""
import contextlib
import gc
import importlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time

from multiprocessing import shared_memory

import grain.multiprocessing
import numpy as np
import pytest

from li_dit import config_lib
from li_dit.data import loader
from li_dit.data import pipeline
from li_dit.data.synthetic import shapes
from li_dit.text import transforms

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 8
CLOSE_TIMEOUT = 2.0
# A close that kills its workers ends within the timeout plus the grace period after the kill;
# the margin covers a loaded 2-core machine.
BOUND = CLOSE_TIMEOUT + loader._GRACE_S + 10  # pylint: disable=protected-access


class StallAfter:
  """Data-worker transform: CaptionIds for the first `captions` calls in each worker process,
  then blocks forever (a worker stuck on a dead server or a runaway transform)."""

  def __init__(self, captions: int):
    self.ids = transforms.CaptionIds(shapes.train_captions(0) + [""])
    self.captions = captions
    self.calls = 0

  def __call__(self, caption):
    self.calls += 1
    if self.calls > self.captions:
      time.sleep(3600)
    return self.ids(caption)


class TagSharedMemory:
  """Data-worker transform: CaptionIds, in a worker whose shared-memory segments are named
  `tag` + random hex instead of psm_ + random hex, so a test tells its own segments from those of
  every other process on the machine (the other xdist worker's pipelines, other runs)."""

  def __init__(self, tag: str):
    self.ids = transforms.CaptionIds(shapes.train_captions(0) + [""])
    self.tag = tag

  def __call__(self, caption):
    # CPython names every SharedMemory it creates _SHM_NAME_PREFIX + random hex.
    shared_memory._SHM_NAME_PREFIX = "/" + self.tag  # pylint: disable=protected-access
    return self.ids(caption)


def _dataset(num_workers=2, stall_after_batches=None, transform=None):
  config = config_lib.default_config().input
  config.update(source="shapes", image_size=32, batch_size=BATCH, num_workers=num_workers,
                prefetch_buffer=1)
  transform = transform or (StallAfter(stall_after_batches * BATCH) if stall_after_batches
                            else transforms.CaptionIds(shapes.train_captions(0) + [""]))
  dataset = pipeline.make_train_dataset(config, transform)
  dataset.close_timeout = CLOSE_TIMEOUT
  return dataset


def _wait_until_dead(workers, bound):
  start = time.monotonic()
  while any(p.is_alive() for p in workers):
    assert time.monotonic() - start < bound, [p.pid for p in workers if p.is_alive()]
    time.sleep(0.2)
  return time.monotonic() - start


def _shm_names():
  return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_a_dropped_iterator_with_stuck_workers_does_not_block_the_collector(tmp_path,
                                                                            monkeypatch):
  # Each worker makes 3 batches, then hangs: after one batch is read, every prefetch buffer is
  # full and the threads that fill them wait on workers that produce nothing more.
  iterator = iter(_dataset(stall_after_batches=3))
  next(iterator)
  workers = iterator.worker_processes()
  assert len(workers) == 2 and all(p.is_alive() for p in workers)
  time.sleep(2)

  # A module whose import forces a collection (as the collector fires inside an unrelated import).
  (tmp_path / "collects_on_import.py").write_text("import gc, time\ngc.collect()\ntime.sleep(1)\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  gc.disable()  # Only the explicit collections below free the iterator.
  try:
    cycle = [iterator]
    cycle.append(cycle)
    del iterator, cycle
    importer = threading.Thread(target=importlib.import_module, args=("collects_on_import",))
    start = time.monotonic()
    importer.start()
    gc.collect()
    importer.join(60)
    collect_seconds = time.monotonic() - start
  finally:
    gc.enable()
    sys.modules.pop("collects_on_import", None)
  assert not importer.is_alive()
  print(f"collections during an import took {collect_seconds:.2f} s")
  assert collect_seconds < 10  # The import's 1 s; the collector only hands the iterator over.
  # The reaper closes it in the background: the stuck workers are killed after the timeout.
  print(f"workers gone {_wait_until_dead(workers, BOUND):.1f} s after the collection")


def test_close_finishes_with_stuck_workers_and_with_a_dead_one():
  with iter(_dataset(stall_after_batches=2)) as iterator:
    next(iterator)
    stuck = iterator.worker_processes()
    time.sleep(1)
    start = time.monotonic()
  assert time.monotonic() - start < BOUND
  assert not any(p.is_alive() for p in stuck)

  with iter(_dataset()) as iterator:
    next(iterator)
    workers = iterator.worker_processes()
    os.kill(workers[0].pid, signal.SIGKILL)
    start = time.monotonic()
  assert time.monotonic() - start < BOUND
  _wait_until_dead(workers, BOUND)


def test_closed_iterators_leave_no_shared_memory_and_refuse_next():
  tag = f"t{secrets.token_hex(2)}_"  # With 3 random bytes: CPython's 14-character name limit.
  with iter(_dataset(transform=TagSharedMemory(tag))) as iterator:
    batches = [next(iterator) for _ in range(4)]
    # The batches' arrays came through shared memory; their names are gone already.
    shared = [a for b in batches for a in b.values()
              if isinstance(a, grain.multiprocessing.SharedMemoryArray)]
    assert shared and all(a.shm.name.startswith(tag) for a in shared)
    assert not {a.shm.name for a in shared} & _shm_names()
    workers = iterator.worker_processes()
  _wait_until_dead(workers, BOUND)
  assert iterator.closed and not any(p.is_alive() for p in workers)
  with pytest.raises(ValueError, match="closed"):
    next(iterator)
  iterator.close()  # Idempotent.
  assert not {n for n in _shm_names() if n.startswith(tag)}
  # The arrays stay valid after their names are unlinked and the iterator is closed.
  assert batches[3]["image"].shape == (BATCH, 32, 32, 3) and np.any(batches[3]["image"])


def test_workers_exit_when_their_trainer_is_killed_alone():
  """SIGKILL to the process that owns the pipeline, not to its group (the kernel's OOM killer, a
  failed check's abort): nothing in it can close the iterator, and its workers exit by
  themselves (loader.exit_with_parent) instead of living on as orphans."""
  code = ("import sys; sys.path.insert(0, 'tests'); import test_loader; "
          "it = iter(test_loader._dataset()); next(it); "
          "print(*[p.pid for p in it.worker_processes()], flush=True); "
          "import time; time.sleep(600)")
  with subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                        text=True, start_new_session=True) as owner:
    try:
      workers = [int(pid) for pid in owner.stdout.readline().split()]
      assert len(workers) == 2
      os.kill(owner.pid, signal.SIGKILL)
      owner.wait()
      start = time.monotonic()
      while any(_alive(pid) for pid in workers):
        assert time.monotonic() - start < 10, "orphaned workers still running"
        time.sleep(0.2)
    finally:
      with contextlib.suppress(ProcessLookupError):
        os.killpg(owner.pid, signal.SIGKILL)  # Whatever the test leaves, it does not leak.


def _alive(pid: int) -> bool:
  """Whether `pid` is a running process (a zombie, exited but unreaped by init, is not)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False
