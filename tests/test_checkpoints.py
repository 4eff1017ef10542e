"""Checkpoint round trip: arrays, data-iterator position and config; errors that name the step."""
import contextlib
import json

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from li_dit import config_lib
from li_dit.data import loader
from li_dit.io import checkpoints


def _dataset():
  return grain.MapDataset.range(1000).seed(3).shuffle().batch(4).to_iter_dataset()


def _iterator():
  """The iterator li_dit.train checkpoints (grain's, with prefetch threads, wrapped)."""
  return loader.DataIterator(iter(_dataset()))


def _arrays(seed):
  k = jax.random.split(jax.random.key(seed), 3)
  return {"params": {"w": jax.random.normal(k[0], (4, 3)), "b": jnp.zeros((3,))},
          "ema_params": {"w": jax.random.normal(k[1], (4, 3)), "b": jnp.ones((3,))},
          "opt_state": {"count": jnp.asarray(7, jnp.int32), "mu": jax.random.normal(k[2], (4, 3))}}


def test_round_trip_of_arrays_data_position_and_config(tmp_path):
  config = config_lib.default_config()
  config.model.width = 96
  arrays = _arrays(0)
  with _iterator() as it, checkpoints.Checkpointer(str(tmp_path), keep=2) as ckpt:
    for _ in range(5):
      next(it)
    ckpt.save(5, arrays, it, config)
    expected_next = [next(it) for _ in range(3)]
  # The file grain writes for its own iterator: checkpoints from before the wrapper restore.
  with contextlib.closing(iter(_dataset())) as raw:
    for _ in range(5):
      next(raw)
    saved = json.loads((tmp_path / "checkpoints" / "5" / "data" / "process_0-of-1.json")
                       .read_text())
    assert saved == raw.get_state()

  with checkpoints.Checkpointer(str(tmp_path)) as ckpt, _iterator() as fresh:
    assert ckpt.latest_step() == 5
    restored = ckpt.restore(5, checkpoints.abstract_like(_arrays(1)), data_iterator=fresh)
    jax.tree_util.tree_map(np.testing.assert_array_equal, restored, arrays)
    for want in expected_next:  # The data continues exactly where it was saved.
      np.testing.assert_array_equal(next(fresh), want)
    assert ckpt.restore_config(5).model.width == 96
    assert ckpt.data_process_count(5) == 1
    # One item alone (what sampling reads).
    only = ckpt.restore(5, {"ema_params": checkpoints.abstract_like(arrays["ema_params"])})
    np.testing.assert_array_equal(only["ema_params"]["w"], arrays["ema_params"]["w"])


def test_restore_errors_name_the_problem(tmp_path):
  with (checkpoints.Checkpointer(str(tmp_path), async_save=False) as ckpt,
        _iterator() as saved, _iterator() as fresh, _iterator() as untouched):
    next(saved)
    ckpt.save(3, _arrays(0), saved, config_lib.default_config())
    with pytest.raises(checkpoints.CheckpointError,
                       match="no checkpoint for step 4.*available steps: \\[3\\]"):
      ckpt.restore(4, checkpoints.abstract_like(_arrays(0)))
    wrong = checkpoints.abstract_like(_arrays(0))
    wrong["params"]["w"] = jax.ShapeDtypeStruct((5, 3), jnp.float32)
    with pytest.raises(checkpoints.CheckpointError, match="step 3"):
      ckpt.restore(3, wrong, data_iterator=fresh)
    # Nothing half-loaded: the data iterator was not moved to the checkpoint's position.
    np.testing.assert_array_equal(next(fresh), next(untouched))
