"""The grain pipeline: deterministic batches, exact resume with worker processes, host shards
of the same global batches, starting at a batch, caption dropout."""
import numpy as np
import ml_collections
import pytest

from li_dit import config_lib
from li_dit.data import pipeline
from li_dit.data import shapes
from li_dit.text import conditioning


def _input_config(**overrides) -> ml_collections.ConfigDict:
  config = config_lib.default_config().input
  config.update({**dict(source="shapes", image_size=32, batch_size=8, num_workers=0),
                 **overrides})
  return config


def _captions():
  return conditioning.CaptionIds(shapes.train_captions(0) + [""])


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same(a, b):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_batches_are_deterministic_and_typed():
  a = _take(iter(pipeline.make_train_dataset(_input_config(), _captions())), 2)
  b = _take(iter(pipeline.make_train_dataset(_input_config(), _captions())), 2)
  for x, y in zip(a, b):
    _assert_same(x, y)
  assert a[0]["image"].shape == (8, 32, 32, 3) and a[0]["image"].dtype == np.uint8
  assert a[0]["caption_id"].shape == (8,)
  c = _take(iter(pipeline.make_train_dataset(_input_config(seed=1), _captions())), 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_from_iterator_state_is_exact(num_workers):
  config = _input_config(num_workers=num_workers)
  it = iter(pipeline.make_train_dataset(config, _captions()))
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = iter(pipeline.make_train_dataset(config, _captions()))
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 3)):
    _assert_same(want, got)


@pytest.mark.parametrize("hosts", [2, 4])
def test_hosts_read_their_rows_of_the_same_global_batches(hosts):
  # Host p's k-th batch is rows [p*B/P, (p+1)*B/P) of global batch k, caption dropout included:
  # the global batches (and so the per-example noise of the train step) do not depend on the
  # number of hosts.
  config = _input_config(batch_size=16, caption_dropout=0.3)
  one_host = _take(iter(pipeline.make_train_dataset(config, _captions())), 3)
  shares = [_take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts)), 3)
            for p in range(hosts)]
  for k, want in enumerate(one_host):
    assert shares[0][k]["image"].shape[0] == 16 // hosts
    _assert_same(want, {key: np.concatenate([s[k][key] for s in shares]) for key in want})
  with pytest.raises(ValueError, match="does not divide over 3 hosts"):
    pipeline.make_train_dataset(config, _captions(), 0, 3)


def test_start_batch_continues_the_stream():
  config = _input_config(batch_size=8)
  for hosts in (1, 2):
    for p in range(hosts):
      stream = _take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts)), 5)
      late = _take(iter(pipeline.make_train_dataset(config, _captions(), p, hosts,
                                                    start_batch=3)), 2)
      for want, got in zip(stream[3:], late):
        _assert_same(want, got)


def test_caption_dropout_gives_the_null_prompt():
  ids = _captions()
  null_id = ids("")["caption_id"]
  batches = _take(iter(pipeline.make_train_dataset(
      _input_config(batch_size=50, caption_dropout=0.3), ids)), 4)
  rate = np.mean(np.concatenate([b["caption_id"] for b in batches]) == null_id)
  assert 0.2 < rate < 0.4
  none = next(iter(pipeline.make_train_dataset(_input_config(caption_dropout=0.0), ids)))
  assert not np.any(none["caption_id"] == null_id)
  with pytest.raises(KeyError, match="not in the cached feature table"):
    ids("a caption nobody cached")
