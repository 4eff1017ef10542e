r"""Writes a captioned image folder (image + same-stem .txt) for tools/build_dataset.py.

  python tools/make_image_folder.py --source shapes --out DIR [--num 5000] [--image_size 32]
  python tools/make_image_folder.py --source emoji --out DIR [--image_size 64]

shapes: the synthetic shapes source's training split (li_dit.data.synthetic.shapes), records
0..num-1, as PNG. emoji: the 3,655 fully-qualified Noto colour emoji (Debian fonts-noto-color-emoji
and unicode-data), captioned with their Unicode names, as PNG.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit.data.synthetic import emoji, shapes  # noqa: E402

_SOURCE = flags.DEFINE_enum("source", None, ["shapes", "emoji"], "What to write.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_NUM = flags.DEFINE_integer("num", 5000, "Number of images (shapes).", lower_bound=1)
_SIZE = flags.DEFINE_integer("image_size", None, "Side in pixels (shapes: 32, emoji: 64).",
                             lower_bound=8)
flags.mark_flags_as_required(["source", "out"])


def _write(folder: str, index: int, image: Image.Image, caption: str) -> None:
  image.save(os.path.join(folder, f"{index:06d}.png"))
  with open(os.path.join(folder, f"{index:06d}.txt"), "w", encoding="utf-8") as f:
    f.write(caption + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with cli.one_line_failures("make_image_folder"):
    count = write_folder(_SOURCE.value, _OUT.value, _NUM.value, _SIZE.value)
  print(f"wrote {count} images with captions to {_OUT.value}")


def write_folder(source_name: str, out: str, num: int, size: int | None) -> int:
  """Writes the images and captions; returns how many."""
  os.makedirs(out, exist_ok=True)
  if source_name == "shapes":
    source = shapes.ShapesSource(image_size=size or 32)
    for i in range(num):
      record = source[i]
      _write(out, i, Image.fromarray(record["image"]), record["caption"])
    return num
  items = emoji.read_emoji()
  for i, (text, name) in enumerate(items):
    _write(out, i, emoji.render(text, size or 64), name)
  return len(items)


if __name__ == "__main__":
  app.run(main)
