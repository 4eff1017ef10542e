"""li_dit.training.goodput: the interval split adds up, compilation is moved out of the phase it
happens in, and goodput carries across a restart through the checkpoint's counters. The train
loop's figures are checked in tests/test_train.py."""
import time

import jax
import jax.numpy as jnp
import pytest

from li_dit.training import goodput as goodput_lib

PARTS = ("step", "data_wait", "checkpoint", "sample", "compile")


def test_the_parts_add_up_and_compilation_is_its_own_part():
  with goodput_lib.Goodput({}) as timing:
    with timing.phase("sample"):
      time.sleep(0.2)
      # A program no other test compiles: its compile time is counted once, as compile.
      jax.jit(lambda x: jnp.cumsum(jnp.sin(x) * 7.25))(jnp.arange(977.0)).block_until_ready()
    with timing.phase("data_wait"):
      time.sleep(0.1)
    time.sleep(0.1)  # Neither: step time.
    interval = timing.interval()
  assert interval["time/compile_s"] > 0
  assert interval["time/sample_s"] == pytest.approx(0.2, abs=0.05)
  assert interval["time/data_wait_s"] == pytest.approx(0.1, abs=0.05)
  assert interval["time/step_s"] >= 0.1
  assert sum(interval[f"time/{p}_s"] for p in PARTS) == pytest.approx(interval["time/wall_s"])
  # The next interval starts empty; the listener is gone once closed.
  after = timing.interval()
  assert after["time/compile_s"] == 0 and after["time/sample_s"] == 0
  jax.jit(lambda x: x * 3.5 + 1.25)(jnp.arange(3.0))
  assert timing.interval()["time/compile_s"] == 0


def test_goodput_carries_the_first_start_and_the_productive_time_across_a_restart():
  started = time.time() - 100.0
  with goodput_lib.Goodput({goodput_lib.STARTED: started,
                            goodput_lib.PRODUCTIVE: 50.0}) as timing:
    assert timing.goodput() == pytest.approx(0.5, abs=0.01)
    time.sleep(0.1)
    counters = timing.counters()
  assert counters[goodput_lib.STARTED] == started
  assert counters[goodput_lib.PRODUCTIVE] == pytest.approx(50.1, abs=0.05)
