"""The text-feature cache: feature tables of a run's captions, stored in its workdir.

In cached text mode (li_dit.text.conditioning) every caption's features are computed once per
LLM, and stored as `<workdir>/text_cache/<llm>-<key>.npz` (local or gs://), the key a hash of the
encoder's identity (`PromptEncoder.cache_key`) and the captions, so a resumed run, or another
run of the same LLM and captions, reads them back instead of encoding again.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from li_dit.io import paths
from li_dit.text import encoders as encoders_lib


def table_path(cache_dir: str, name: str, encoder: encoders_lib.PromptEncoder,
               captions: Sequence[str]) -> epath.Path:
  """Where the table of `captions` (sorted, "" included) by `encoder` lives in `cache_dir`."""
  key = hashlib.sha256(json.dumps([encoder.cache_key(), captions]).encode()).hexdigest()[:16]
  return epath.Path(cache_dir) / f"{name}-{key}.npz"


def read_table(path: epath.Path) -> tuple[jax.Array, jax.Array] | None:
  """The table at `path`: (features [N,L,D], mask [N,L]); None when there is none."""
  if not path.exists():
    return None
  with np.load(io.BytesIO(path.read_bytes())) as f:
    return jnp.asarray(f["tokens"]), jnp.asarray(f["mask"])


def write_table(path: epath.Path, tokens: jax.Array, mask: jax.Array) -> None:
  """Stores a table at `path`: written locally, then published whole."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    local = os.path.join(tmp, "table.npz")
    np.savez(local, tokens=np.asarray(tokens), mask=np.asarray(mask))
    paths.publish(local, path)  # Never a half-written table under the final name.
