"""Every test has a time limit: with this repository's pytest.ini and conftest, a hanging test
fails (default limit, and the longer one of tests marked slow) with a stack trace, and the
suite goes on."""
import os
import shutil
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HANGING = """
import threading
import pytest

def test_hangs():
  threading.Event().wait()

@pytest.mark.slow
def test_slow_hangs():
  threading.Event().wait()

def test_after_the_hangs():
  pass
"""


def test_a_hanging_test_fails_with_a_stack_trace_and_the_suite_goes_on(tmp_path):
  shutil.copy(os.path.join(REPO, "pytest.ini"), tmp_path)
  (tmp_path / "tests").mkdir()
  shutil.copy(os.path.join(REPO, "tests", "conftest.py"), tmp_path / "tests")
  (tmp_path / "tests" / "test_hanging.py").write_text(HANGING)
  result = subprocess.run(
      [sys.executable, "-m", "pytest", "-m", "", "-o", "timeout=2", "-o", "slow_timeout=3"],
      cwd=tmp_path, capture_output=True, text=True, timeout=120)
  assert result.returncode == 1, result.stdout[-3000:]
  assert "Failed: Timeout (>2.0s) from pytest-timeout" in result.stdout
  assert "Failed: Timeout (>3.0s) from pytest-timeout" in result.stdout
  assert "def test_hangs():\n>     threading.Event().wait()" in result.stdout
  assert "2 failed, 1 passed" in result.stdout
