"""What every command-line entry point does with an expected failure: one line, `prog: message`,
naming the file or field, and exit code 1. A traceback is left for bugs.

Expected are an OSError (a missing, unreadable or unwritable file or directory, a full disk; its
message names the path) and the errors each entry point names: its config, checkpoint or input
errors, whose messages name the field or file. Flag errors are absl's and argparse's (exit 1 and 2,
with usage).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator


@contextlib.contextmanager
def one_line_failures(prog: str, *expected: type[BaseException]) -> Iterator[None]:
  """Turns an OSError or one of `expected` raised in the block into `prog: message`, exit 1."""
  try:
    yield
  except (OSError, *expected) as e:
    # One write, newline included: background threads (e.g. orbax's, after a failed save) may
    # write to stderr while the process exits.
    sys.stderr.write(f"{prog}: {e}\n")
    sys.stderr.flush()
    sys.exit(1)
