"""Paths that may be local or on an object store (gs://, through etils.epath and gcsfs)."""
from __future__ import annotations

import os

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """True for an object-store path (gs://, s3://, ...), False for a local one."""
  return "://" in str(path)


def publish(local: str, target: str | os.PathLike) -> None:
  """Puts the finished local file `local` at `target` such that `target` never exists
  half-written.

  An object store's upload is atomic (the object appears whole or not at all) and has no cheap
  rename; a local file is copied under a temporary name and renamed.
  """
  target = epath.Path(target)
  if is_remote(target):
    epath.Path(local).copy(target, overwrite=True)
  else:
    tmp = epath.Path(f"{target}.tmp")
    epath.Path(local).copy(tmp, overwrite=True)
    tmp.rename(target)
