"""Where a run's wall time goes, and its goodput across restarts.

Each logging interval's wall time is split into what the loop waits on: the data iterator
(`data_wait`), checkpoint saves and their finiteness check (`checkpoint`), sample grids
(`sample`), XLA compilation wherever it happens (`compile`, from jax.monitoring's compile-time
events: tracing, lowering and compiling or reading the persistent cache), and the rest, `step`:
dispatching train steps and waiting for the devices. The parts add up to the interval's wall time.

Goodput is the productive step time over the wall time since the run first started. Both
travel in the checkpoint's counters, so a restart's lost time (the steps after the last
checkpoint, start-up, compile, and the time the job was down) counts against it, and recomputed
steps count once.
"""
from __future__ import annotations

import contextlib
import time
from typing import Iterator

import jax

PHASES = ("data_wait", "checkpoint", "sample")
PRODUCTIVE = "goodput/productive_s"  # Checkpoint counters: step time through the saved step,
STARTED = "goodput/started_at"  # and the Unix time the run first started.
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                   "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")


class Goodput:
  """Times the loop's phases; a context manager that listens to jax's compile events while open.

  Args:
    counters: the checkpoint's counters of a resumed run ({} for a new one): the productive
      time so far and the run's first start.
  """

  def __init__(self, counters: dict[str, float]):
    now = time.time()
    self.started_at = float(counters.get(STARTED, now))
    self._productive = float(counters.get(PRODUCTIVE, 0.0))
    self._compile = 0.0  # Seconds compiled since this process started, all threads.
    self._interval_start = time.perf_counter()
    self._interval = dict.fromkeys(PHASES, 0.0)
    self._interval_compile = 0.0

  def __enter__(self) -> Goodput:
    jax.monitoring.register_event_duration_secs_listener(self._on_event)
    return self

  def __exit__(self, *exc_info) -> None:
    jax.monitoring.unregister_event_duration_listener(self._on_event)

  def _on_event(self, event: str, duration: float, **kwargs) -> None:
    del kwargs
    if event in _COMPILE_EVENTS:
      self._compile += duration

  @contextlib.contextmanager
  def phase(self, name: str) -> Iterator[None]:
    """Counts the block's wall time as `name` (one of PHASES), less any compile inside it."""
    start, compiled = time.perf_counter(), self._compile
    try:
      yield
    finally:
      self._interval[name] += (time.perf_counter() - start) - (self._compile - compiled)

  def interval(self) -> dict[str, float]:
    """The wall time since the last call (or the start), split: {"time/wall_s", "time/step_s",
    "time/compile_s", "time/<phase>_s", "goodput"}; starts the next interval."""
    now = time.perf_counter()
    wall, compiled, step = self._split(now)
    self._productive += step
    out = {"time/wall_s": wall, "time/step_s": step, "time/compile_s": compiled,
           **{f"time/{name}_s": t for name, t in self._interval.items()},
           "goodput": self.goodput()}
    self._interval_start, self._interval_compile = now, self._compile
    self._interval = dict.fromkeys(PHASES, 0.0)
    return out

  def goodput(self) -> float:
    return self._productive / max(time.time() - self.started_at, 1e-9)

  def counters(self) -> dict[str, float]:
    """For the checkpoint's counters: the productive time through now (call it outside any
    phase) and the run's first start."""
    return {PRODUCTIVE: self._productive + self._split(time.perf_counter())[2],
            STARTED: self.started_at}

  def _split(self, now: float) -> tuple[float, float, float]:
    """(wall, compile, step) seconds of the interval so far."""
    wall = now - self._interval_start
    compiled = self._compile - self._interval_compile
    return wall, compiled, max(wall - compiled - sum(self._interval.values()), 0.0)
