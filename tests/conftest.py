"""Suite-wide settings.

Per-test time limits: pytest.ini's `timeout` (pytest-timeout) for every test, `slow_timeout` for
the tests marked slow, unless a test sets its own with @pytest.mark.timeout.

One persistent JAX compilation cache for the whole run, shared by the test processes, the xdist
workers and every subprocess they start (through JAX_COMPILATION_CACHE_DIR): dozens of tests
train, resume and sample the same small configs, and compiling their programs once instead of in
every process is most of the suite's time. A cache the caller set (e.g. .ci/run, shared by its two
runs) is used as is; otherwise a fresh one is made and removed at the end, so a run never reads
programs compiled by an older checkout.

Scheduling: pytest-xdist hands whole modules to its two workers in collection order (pytest.ini:
--dist=loadscope --no-loadscope-reorder), so the modules that take longest go first and the short
ones fill in at the end. xdist's own reorder, by number of tests per module, started the slow
suite's longest test (the 1B rehearsal, a module of one test) last, with one worker idle beside it.
"""
import os
import shutil
import tempfile

import pytest

_CACHE_ENV = "JAX_COMPILATION_CACHE_DIR"
# Modules by their time in CI on 2 cores, default and slow tests together, longest first
# (`--durations`); the rest follow in collection order. A scheduling hint: a stale entry costs
# minutes of wall time, never a result.
_LONGEST_FIRST = ("test_rehearse", "test_train", "test_torch_export", "test_models", "test_latent",
                  "test_latent_cache", "test_train_from_records", "test_distributed",
                  "test_mesh_layouts", "test_llm", "test_cli_failures", "test_sample_meshes",
                  "test_aot_compile", "test_damaged_checkpoints", "test_attention", "test_flops")


def pytest_addoption(parser: pytest.Parser) -> None:
  parser.addini("slow_timeout", "time limit in seconds of each test marked slow", default="2400")


def pytest_configure(config: pytest.Config) -> None:
  if not os.environ.get(_CACHE_ENV):
    os.environ[_CACHE_ENV] = tempfile.mkdtemp(prefix="li_dit_jax_cache_")
    config.add_cleanup(lambda: shutil.rmtree(os.environ.pop(_CACHE_ENV), ignore_errors=True))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(_LONGEST_FIRST)}
  # A stable sort: tests keep their order within a module, unlisted modules theirs.
  items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))
  limit = float(config.getini("slow_timeout"))
  for item in items:
    if item.get_closest_marker("slow") and item.get_closest_marker("timeout") is None:
      item.add_marker(pytest.mark.timeout(limit))
