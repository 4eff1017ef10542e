"""Real image files made offline for the data tests: good ones of many modes and broken ones.

`write_folder(root)` writes an image folder with sidecar captions and returns what a correct
build must produce: the good keys with their captions and (width, height), and the number of
broken inputs per skip reason.
"""
from __future__ import annotations

import io
import json
import os

import numpy as np
from PIL import Image

MIN_SIZE = 8
MAX_PIXELS = 1_000_000
MAX_CAPTION_CHARS = 60


def _pattern(width: int, height: int, seed: int) -> np.ndarray:
  """A smooth colourful uint8 [H,W,3] picture (compresses like a photo, not like noise)."""
  rng = np.random.default_rng(seed)
  y, x = np.mgrid[0:height, 0:width] / max(width, height)
  phase = rng.uniform(0, 6, size=3)
  return (127.5 + 127 * np.sin(np.stack([x * 5 + phase[0], y * 7 + phase[1],
                                          (x + y) * 3 + phase[2]], -1))).astype(np.uint8)


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
  buf = io.BytesIO()
  img.save(buf, fmt, **kw)
  return buf.getvalue()


def good_images() -> dict[str, tuple[bytes, tuple[int, int]]]:
  """name (with extension) -> (file bytes, (width, height) after EXIF orientation)."""
  rgb = Image.fromarray(_pattern(48, 32, 0))
  out = {
      "rgb.jpg": (_encode(rgb, "JPEG", quality=90), (48, 32)),
      "big.jpg": (_encode(Image.fromarray(_pattern(640, 480, 1)), "JPEG"), (640, 480)),
      "cmyk.jpg": (_encode(rgb.convert("CMYK"), "JPEG"), (48, 32)),
      "grey.png": (_encode(rgb.convert("L"), "PNG"), (48, 32)),
      "grey_alpha.png": (_encode(rgb.convert("LA"), "PNG"), (48, 32)),
      "palette.png": (_encode(rgb.convert("P"), "PNG"), (48, 32)),
      "rgba.png": (_encode(rgb.convert("RGBA"), "PNG"), (48, 32)),
      "tall.webp": (_encode(Image.fromarray(_pattern(24, 64, 2)), "WEBP"), (24, 64)),
      "anim.gif": (_encode(rgb.convert("P"), "GIF"), (48, 32)),
      "plain.bmp": (_encode(rgb, "BMP"), (48, 32)),
  }
  # Palette with a transparent colour.
  p = rgb.convert("P")
  out["palette_transparent.png"] = (_encode(p, "PNG", transparency=0), (48, 32))
  # 16-bit greyscale.
  deep = Image.fromarray(_pattern(40, 30, 3)[..., 0].astype(np.uint16) * 257)  # mode I;16
  out["deep16.png"] = (_encode(deep, "PNG"), (40, 30))
  # EXIF orientation 6 (rotate 90 degrees on display): stored 48x32, shown 32x48.
  exif = Image.Exif()
  exif[0x0112] = 6
  out["rotated.jpg"] = (_encode(rgb, "JPEG", exif=exif.tobytes()), (32, 48))
  return out


def broken_images() -> dict[str, tuple[bytes, str]]:
  """name -> (file bytes, the reason it must be skipped under)."""
  jpeg = _encode(Image.fromarray(_pattern(64, 64, 4)), "JPEG")
  png = _encode(Image.fromarray(_pattern(64, 64, 5)), "PNG")
  bomb = _encode(Image.new("L", (1200, 1000)), "PNG")  # 1.2 MP > MAX_PIXELS, a few KB.
  return {
      "truncated.jpg": (jpeg[:len(jpeg) // 2], "unreadable_image"),
      "truncated.png": (png[:len(png) // 2], "unreadable_image"),
      "empty.jpg": (b"", "empty_file"),
      "noise.jpg": (np.random.default_rng(0).bytes(2000), "unreadable_image"),
      "text.png": (b"this is not an image\n" * 20, "unreadable_image"),
      "bomb.png": (bomb, "decompression_bomb"),
      "tiny.png": (_encode(Image.new("RGB", (MIN_SIZE - 1, 20), "red"), "PNG"), "too_small"),
      "header_only.png": (png[:40], "unreadable_image"),
  }


# Caption files of the good image "rgb.jpg" copies: name -> (sidecar name, bytes, reason or None).
BAD_CAPTIONS = {
    "no_caption.jpg": (None, None, "missing_caption"),
    "empty_caption.jpg": ("empty_caption.txt", b"", "empty_caption"),
    "blank_caption.jpg": ("blank_caption.txt", b"  \n\t \n", "empty_caption"),
    "latin1_caption.jpg": ("latin1_caption.txt", "caf\xe9 au lait".encode("latin-1"),
                           "caption_not_utf8"),
    "bad_json.jpg": ("bad_json.json", b"{not json", "caption_not_utf8"),
}
LONG_CAPTION = "a very long caption " * 10  # 200 characters: cut to MAX_CAPTION_CHARS.


def write_folder(root: str) -> dict:
  """Writes the fixture folder; returns {"good": {stem: (captions, (w, h))}, "skipped": {...}}."""
  os.makedirs(root, exist_ok=True)
  expected_good, skipped = {}, {}
  for i, (name, (data, size)) in enumerate(sorted(good_images().items())):
    stem = os.path.splitext(name)[0]
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    if i % 2:  # Half of them with a .json sidecar holding two captions.
      captions = [f"a picture called {stem}", f"another caption of {stem}"]
      with open(os.path.join(root, stem + ".json"), "w") as f:
        json.dump({"captions": captions}, f)
    else:
      captions = [f"a picture called {stem}"]
      with open(os.path.join(root, stem + ".txt"), "w") as f:
        f.write(captions[0] + "\n")
    expected_good[stem] = (captions, size)
  for name, (data, reason) in broken_images().items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(data)
    with open(os.path.join(root, os.path.splitext(name)[0] + ".txt"), "w") as f:
      f.write("a broken picture\n")
    skipped[reason] = skipped.get(reason, 0) + 1
  rgb = good_images()["rgb.jpg"][0]
  for name, (sidecar, data, reason) in BAD_CAPTIONS.items():
    with open(os.path.join(root, name), "wb") as f:
      f.write(rgb)
    if sidecar:
      with open(os.path.join(root, sidecar), "wb") as f:
        f.write(data)
    skipped[reason] = skipped.get(reason, 0) + 1
  with open(os.path.join(root, "long_caption.jpg"), "wb") as f:
    f.write(rgb)
  with open(os.path.join(root, "long_caption.txt"), "w") as f:
    f.write(LONG_CAPTION)
  cut = LONG_CAPTION[:MAX_CAPTION_CHARS + 1].rsplit(" ", 1)[0].strip()
  expected_good["long_caption"] = ([cut], (48, 32))
  return {"good": expected_good, "skipped": skipped}


def write_aspect_folder(folder: str, num: int) -> dict[str, tuple[int, int]]:
  """`num` JPEG/PNG images of three aspect ratios (2:1, 1:1, 1:2), two captions each.

  Returns caption -> (width, height) of its image.
  """
  os.makedirs(folder, exist_ok=True)
  sizes = {}
  for i in range(num):
    w, h = ((80, 40), (50, 50), (40, 80))[i % 3]
    name = f"img{i:03d}." + ("jpg" if i % 2 else "png")
    Image.fromarray(_pattern(w, h, i)).save(os.path.join(folder, name))
    with open(os.path.join(folder, f"img{i:03d}.txt"), "w") as f:
      f.write(f"picture {i}\nanother caption of picture {i}\n")
    sizes[f"picture {i}"] = sizes[f"another caption of picture {i}"] = (w, h)
  return sizes


def write_rotted_dataset(data_dir: str, name: str, num: int, rotten: int) -> list[str]:
  """A TFDS dataset of `num` grey 40x40 JPEGs captioned "grey <i>", as build_dataset writes it,
  whose record `rotten` was cut in half afterwards (a file that rotted on disk). Returns the
  captions."""
  from li_dit.data import build, records
  directory = build.dataset_dir(data_dir, name, "1.0.0")
  directory.mkdir(parents=True)
  encoded = [_encode(Image.fromarray(np.full((40, 40, 3), 30 * i % 256, np.uint8)), "JPEG")
             for i in range(num)]
  encoded[rotten] = encoded[rotten][:len(encoded[rotten]) // 2]
  spec = records.features()
  examples = [({"image": data, "width": 40, "height": 40, "captions": [f"grey {i}"],
                "key": str(i)}, 0) for i, data in enumerate(encoded)]
  counts = build.write_shard(build.shard_path(directory, name, 0, 1), lambda _: iter(examples),
                             spec)
  build.write_metadata(directory, name, "1.0.0", spec, [num], counts["num_bytes"],
                       [(40, 40)] * num)
  return [f"grey {i}" for i in range(num)]
