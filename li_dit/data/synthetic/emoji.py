"""A real captioned image set that installs offline: the Noto colour emoji named by Unicode.

Debian's `unicode-data` ships emoji-test.txt (every emoji with its name) and
`fonts-noto-color-emoji` the font. The 3,655 fully-qualified emoji, rendered with Pillow, are
images whose captions are their names ("man cook: light skin tone").
"""
from __future__ import annotations

import re

from PIL import Image, ImageDraw, ImageFont

EMOJI_TEST = "/usr/share/unicode/emoji/emoji-test.txt"
FONT = "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
_FONT_SIZE = 109  # The one size of the font's colour bitmaps (CBDT).
# "1F468 200D 1F373  ; fully-qualified  # 👨‍🍳 E4.0 man cook"
_LINE = re.compile(r"^([0-9A-F ]+?)\s*;\s*fully-qualified\s*#\s*\S+\s+E\d+\.\d+\s+(.+)$")


def read_emoji(path: str = EMOJI_TEST) -> list[tuple[str, str]]:
  """(emoji string, name) of every fully-qualified emoji of emoji-test.txt, in file order."""
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError as e:
    raise FileNotFoundError(f"{path} is missing: install Debian's unicode-data") from e
  out = []
  for line in lines:
    match = _LINE.match(line)
    if match:
      codes, name = match.groups()
      out.append(("".join(chr(int(c, 16)) for c in codes.split()), name.strip()))
  return out


def render(emoji: str, size: int = 64, font_path: str = FONT) -> Image.Image:
  """The emoji centred on white, RGB `size` x `size`."""
  font = _font(font_path)
  canvas = Image.new("RGB", (136, 136), "white")
  ImageDraw.Draw(canvas).text((68, 68), emoji, font=font, embedded_color=True, anchor="mm")
  return canvas.resize((size, size), Image.Resampling.LANCZOS)


_FONTS: dict[str, ImageFont.FreeTypeFont] = {}


def _font(path: str) -> ImageFont.FreeTypeFont:
  if path not in _FONTS:
    try:
      _FONTS[path] = ImageFont.truetype(path, _FONT_SIZE)
    except OSError as e:
      raise FileNotFoundError(f"{path}: cannot load the emoji font (install Debian's "
                              f"fonts-noto-color-emoji): {e}") from e
  return _FONTS[path]
