"""Per-test time limits: pytest.ini's `timeout` (pytest-timeout) for every test, `slow_timeout`
for the tests marked slow, unless a test sets its own with @pytest.mark.timeout."""
import pytest


def pytest_addoption(parser: pytest.Parser) -> None:
  parser.addini("slow_timeout", "time limit in seconds of each test marked slow", default="2400")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
  limit = float(config.getini("slow_timeout"))
  for item in items:
    if item.get_closest_marker("slow") and item.get_closest_marker("timeout") is None:
      item.add_marker(pytest.mark.timeout(limit))
