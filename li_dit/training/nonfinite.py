"""Non-finite steps: counted across restarts, and a diverged run stopped before it saves.

The train step itself skips a step whose loss, gradients or new parameters are not finite
(li_dit.training.step); here the loop counts those steps and stops the run once
`config.optim.max_nonfinite_steps` come in a row, without saving, so the last checkpoint stays
the last good one.
"""
from __future__ import annotations

from typing import Any

import jax

from li_dit.training import step as step_lib

COUNTER = "nonfinite_steps"  # The run's total, in metrics.jsonl and the checkpoint's counters.


class Diverged(RuntimeError):
  """The run stopped as diverged; the message names the steps and the last checkpoint."""


class NonfiniteSteps:
  """Reads each step's `nonfinite` flag and keeps the run's total and the current streak.

  A flag is read one step late (`observe`), so the host never waits on the step it has just
  dispatched and keeps a step ahead of the devices; `flush` reads the last one (before a log or
  a save).
  """

  def __init__(self, limit: int, total: int = 0):
    self.limit = limit
    self.total = int(total)
    self.streak = 0
    self.streak_start: int | None = None
    self.first_bad: int | None = None  # Of this process's part of the run.
    self._pending: tuple[int, jax.Array] | None = None

  def observe(self, step: int, flag: jax.Array) -> None:
    """Takes step `step`'s flag; counts the previous step's."""
    previous, self._pending = self._pending, (step, flag)
    if previous is not None:
      self._count(*previous)

  def flush(self) -> None:
    if self._pending is not None:
      self._count(*self._pending)
      self._pending = None

  @property
  def diverged(self) -> bool:
    return self.streak >= self.limit

  def message(self, last_checkpoint: int | None, where: str) -> str:
    checkpoint = (f"the last checkpoint is step {last_checkpoint} in {where}"
                  if last_checkpoint else f"no checkpoint in {where}")
    return (f"diverged: {self.streak} non-finite steps in a row (optim.max_nonfinite_steps="
            f"{self.limit}), from step {self.streak_start}; the first non-finite step of this "
            f"process was {self.first_bad}, {self.total} in the run; nothing saved, {checkpoint}")

  def _count(self, step: int, flag: jax.Array) -> None:
    if int(jax.device_get(flag)):
      self.total += 1
      self.streak += 1
      if self.streak == 1:
        self.streak_start = step
      if self.first_bad is None:
        self.first_bad = step
    else:
      self.streak = 0


@jax.jit
def state_is_finite(params: Any, ema_params: Any) -> jax.Array:
  """Whether every parameter and EMA parameter is finite: checked before every save."""
  return step_lib.all_finite(params) & step_lib.all_finite(ema_params)
