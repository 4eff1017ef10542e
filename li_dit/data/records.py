"""Image-caption records: their schema, caption cleaning, and readers of the input formats.

A dataset built by `tools/build_dataset.py` is a TFDS dataset in ArrayRecord files, so the
pipeline and `tfds.data_source(name, data_dir=...)` read the same thing. One record:

  image     the original encoded bytes (JPEG, PNG, WebP, ...), decoded by li_dit.data.images
  width, height   after EXIF orientation (what bucketing needs, without decoding)
  captions  one or more cleaned captions
  key       where the example came from (file path, table row, tar member)

A dataset of latents (tools/encode_latents.py, li_dit.data.latent_datasets) has LATENT_MEAN and
LATENT_LOGVAR in place of image: the encoder's Gaussian of the image fitted to its bucket.

Inputs (`iter_items`): a folder of images with sidecar `.txt`/`.json` captions, a JSONL, CSV or
Parquet table of image paths and captions, or WebDataset tar shards. Every path may be `gs://`.
"""
from __future__ import annotations

import csv
import dataclasses
import functools
import io
import json
import tarfile
from typing import Any, Iterator, Sequence

import numpy as np
from etils import epath

from li_dit.data import images

# Skip reasons of captions and records (images.IMAGE_REASONS for the image itself).
MISSING_CAPTION = "missing_caption"  # no sidecar file, no caption column, nothing in the tar
EMPTY_CAPTION = "empty_caption"  # empty or whitespace only
CAPTION_NOT_UTF8 = "caption_not_utf8"
MISSING_IMAGE = "missing_image"  # a table row or a tar key without its image
REASONS = images.IMAGE_REASONS + (MISSING_CAPTION, EMPTY_CAPTION, CAPTION_NOT_UTF8,
                                  MISSING_IMAGE)

LATENT_MEAN, LATENT_LOGVAR = "latent_mean", "latent_logvar"  # float [H/f, W/f, C] each.

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TABLE_EXTENSIONS = (".jsonl", ".csv", ".parquet")
# Column (or JSON key) names, first match wins.
IMAGE_COLUMNS = ("image", "image_path", "path", "file", "filename")
CAPTION_COLUMNS = ("captions", "caption", "text", "prompt")
DEFAULT_MAX_CAPTION_CHARS = 1000


def features():
  """The TFDS feature spec of a record (imported lazily: only the tool and reader need TFDS)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(None, None, 3)),
      "width": np.int32,
      "height": np.int32,
      "captions": tfds.features.Sequence(tfds.features.Text()),
      "key": tfds.features.Text(),
  })


def clean_caption(raw: str | bytes, max_chars: int = DEFAULT_MAX_CAPTION_CHARS
                  ) -> tuple[str, bool]:
  """Raw caption -> (cleaned caption, whether it was truncated).

  Whitespace runs (newlines, tabs) become one space; a caption over `max_chars` is cut at the
  last word boundary before the limit.

  Raises:
    images.BadInput: not UTF-8 (EMPTY_CAPTION for empty or whitespace only).
  """
  if isinstance(raw, bytes):
    try:
      raw = raw.decode("utf-8")
    except UnicodeDecodeError as e:
      raise images.BadInput(CAPTION_NOT_UTF8, f"{e}") from e
  text = " ".join(raw.replace("\x00", " ").split())
  if not text:
    raise images.BadInput(EMPTY_CAPTION, "empty or whitespace only")
  if len(text) <= max_chars:
    return text, False
  cut = text[:max_chars + 1].rsplit(" ", 1)[0] if " " in text[:max_chars + 1] else ""
  return (cut or text[:max_chars]).rstrip(), True


def clean_captions(raws: Sequence[str | bytes], max_chars: int = DEFAULT_MAX_CAPTION_CHARS
                   ) -> tuple[list[str], int]:
  """The valid captions among `raws` (duplicates removed) and how many were truncated.

  Raises:
    images.BadInput: when none is valid (the first caption's reason; MISSING_CAPTION if none).
  """
  kept, truncated, first_error = [], 0, None
  for raw in raws:
    try:
      text, cut = clean_caption(raw, max_chars)
    except images.BadInput as e:
      first_error = first_error or e
      continue
    if text not in kept:
      kept.append(text)
      truncated += cut
  if not kept:
    raise first_error or images.BadInput(MISSING_CAPTION, "no caption")
  return kept, truncated


@dataclasses.dataclass
class Item:
  """One example as read from the input, before validation.

  `image` holds the bytes, or None with `error` saying why there are none.
  `captions` are raw (str or bytes); None when the input had no caption for this image.
  """
  key: str
  image: bytes | None
  captions: list[str | bytes] | None
  error: images.BadInput | None = None


def make_example(item: Item, min_size: int = 1, max_pixels: int = images.DEFAULT_MAX_PIXELS,
                 max_caption_chars: int = DEFAULT_MAX_CAPTION_CHARS
                 ) -> tuple[dict[str, Any], int]:
  """Validates an item: (record dict for `features()`, number of truncated captions).

  The image is fully decoded (not just its header), so a truncated file is caught here and not
  in the middle of a training run.

  Raises:
    images.BadInput: the item is skipped, under `reason`.
  """
  if item.error is not None:
    raise item.error
  if item.captions is None:
    raise images.BadInput(MISSING_CAPTION, f"{item.key}: no caption")
  captions, truncated = clean_captions(item.captions, max_caption_chars)
  rgb = images.decode_rgb(item.image, min_size, max_pixels)
  return {"image": item.image, "width": rgb.shape[1], "height": rgb.shape[0],
          "captions": captions, "key": item.key}, truncated


# -- input formats --------------------------------------------------------------------------------

def input_format(path: str) -> str:
  """"folder", "table" or "webdataset", from the path."""
  p = epath.Path(path)
  if not p.exists():
    raise ValueError(f"input {path}: no such file or folder")
  if p.is_dir():
    return "folder"
  if p.suffix.lower() in TABLE_EXTENSIONS:
    return "table"
  if p.suffix.lower() == ".tar":
    return "webdataset"
  raise ValueError(f"{path}: not a folder, a table ({', '.join(TABLE_EXTENSIONS)}) or a "
                   "WebDataset .tar shard")


def list_units(paths: Sequence[str], examples_per_shard: int) -> list[tuple[str, Any]]:
  """Splits the inputs into work units, one per output shard, in a fixed order.

  A unit is ("files", [image paths]) for folders, ("rows", (table, start, stop)) for tables and
  ("tar", path) for WebDataset shards.
  """
  units = []
  for path in paths:
    kind = input_format(path)
    if kind == "folder":
      files = sorted(str(f) for f in _walk(epath.Path(path))
                     if f.suffix.lower() in IMAGE_EXTENSIONS)
      units += [("files", files[i:i + examples_per_shard])
                for i in range(0, len(files), examples_per_shard)]
    elif kind == "table":
      n = len(read_table(path))
      units += [("rows", (path, i, min(i + examples_per_shard, n)))
                for i in range(0, n, examples_per_shard)]
    else:
      units.append(("tar", path))
  return units


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
  """Every file under `folder`, recursively (one listing per folder, also on GCS)."""
  for child in folder.iterdir():
    if child.is_dir():
      yield from _walk(child)
    else:
      yield child


def iter_items(unit: tuple[str, Any]) -> Iterator[Item]:
  """The items of one work unit (see `list_units`)."""
  kind, arg = unit
  if kind == "files":
    for f in arg:
      yield _folder_item(epath.Path(f))
  elif kind == "rows":
    path, start, stop = arg
    rows = read_table(path)
    base = epath.Path(path).parent
    for i in range(start, stop):
      yield _row_item(rows[i], f"{path}#{i}", base)
  elif kind == "tar":
    yield from _tar_items(arg)
  else:
    raise ValueError(f"unknown work unit {kind!r}")


def _read_bytes(path: epath.Path, key: str) -> Item | bytes:
  try:
    return path.read_bytes()
  except (FileNotFoundError, IsADirectoryError) as e:
    return Item(key, None, None, images.BadInput(MISSING_IMAGE, f"{key}: {e}"))


def _folder_item(image_path: epath.Path) -> Item:
  key = str(image_path)
  data = _read_bytes(image_path, key)
  if isinstance(data, Item):
    return data
  captions = None
  txt, js = image_path.with_suffix(".txt"), image_path.with_suffix(".json")
  if txt.exists():
    captions = [line for line in txt.read_bytes().splitlines() if line.strip()] or [b""]
  elif js.exists():
    try:
      captions = _json_captions(json.loads(js.read_bytes()))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      return Item(key, None, None, images.BadInput(CAPTION_NOT_UTF8, f"{js}: {e}"))
  return Item(key, data, captions)


def _json_captions(obj: Any) -> list[str] | None:
  if isinstance(obj, str):
    return [obj]
  if isinstance(obj, list):
    return [c for c in obj if isinstance(c, (str, bytes))]
  if isinstance(obj, dict):
    for name in CAPTION_COLUMNS:
      if name in obj and obj[name] is not None:
        return _json_captions(obj[name])
  return None


@functools.lru_cache(maxsize=2)
def read_table(path: str) -> list[dict[str, Any]]:
  """The rows of a JSONL, CSV or Parquet table as dicts (read once per process: every work unit
  of a table reads its rows from the same copy)."""
  p = epath.Path(path)
  suffix = p.suffix.lower()
  if suffix == ".jsonl":
    rows = []
    for n, line in enumerate(p.read_text().splitlines()):
      if line.strip():
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{n + 1}: not a JSON object: {e}") from e
    return rows
  if suffix == ".csv":
    return list(csv.DictReader(io.StringIO(p.read_text())))
  if suffix == ".parquet":
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    return pq.read_table(io.BytesIO(p.read_bytes())).to_pylist()
  raise ValueError(f"{path}: unknown table format {suffix!r}; use one of {TABLE_EXTENSIONS}")


def _row_item(row: dict[str, Any], key: str, base: epath.Path) -> Item:
  image_col = next((c for c in IMAGE_COLUMNS if row.get(c)), None)
  if image_col is None:
    return Item(key, None, None, images.BadInput(
        MISSING_IMAGE, f"{key}: no image path in columns {IMAGE_COLUMNS}"))
  value = row[image_col]
  if isinstance(value, dict) and "bytes" in value:  # Parquet tables often embed the image.
    data = value["bytes"]
  else:
    path = epath.Path(value)
    data = _read_bytes(path if path.is_absolute() or "://" in str(value) else base / path, key)
    if isinstance(data, Item):
      return data
  captions = None
  for name in CAPTION_COLUMNS:
    if name in row and row[name] is not None:
      value = row[name]
      if isinstance(value, str) and name == "captions" and value.startswith("["):
        value = json.loads(value)  # CSV cells hold lists as JSON.
      captions = [value] if isinstance(value, (str, bytes)) else list(value)
      break
  return Item(key, data, captions)


def _tar_items(path: str) -> Iterator[Item]:
  """WebDataset convention: members sharing a key (path up to the basename's first dot)."""
  groups: dict[str, dict[str, bytes]] = {}
  with epath.Path(path).open("rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
    for member in tar:
      if not member.isfile():
        continue
      dirname, _, base = member.name.rpartition("/")
      stem, _, ext = base.partition(".")
      key = f"{dirname}/{stem}" if dirname else stem
      groups.setdefault(key, {})[ext.lower()] = tar.extractfile(member).read()
  for key, parts in groups.items():
    full_key = f"{path}#{key}"
    image_ext = next((e for e in parts if "." + e in IMAGE_EXTENSIONS), None)
    if image_ext is None:
      yield Item(full_key, None, None, images.BadInput(MISSING_IMAGE, f"{full_key}: no image"))
      continue
    captions = None
    if "txt" in parts:
      captions = [parts["txt"]]
    elif "json" in parts:
      try:
        captions = _json_captions(json.loads(parts["json"]))
      except (json.JSONDecodeError, UnicodeDecodeError) as e:
        yield Item(full_key, None, None, images.BadInput(CAPTION_NOT_UTF8, f"{full_key}: {e}"))
        continue
    yield Item(full_key, parts[image_ext], captions)

