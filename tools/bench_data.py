r"""Input-pipeline throughput against the raw decode limit, measured in the same run.

  python tools/bench_data.py [--images DIR] [--num 512] [--batch 32] [--batches 24] \
      [--workers 0,1,2] [--json bench_data.json]

Writes `--num` JPEGs (quality 90, 384-640 px, five aspect ratios; cut from the photos shipped in
scikit-image's skimage/data when it is installed, else synthetic textures) or takes every image
of --images, builds them into an ArrayRecord dataset with tools/build_dataset.py's code, then
measures samples/s of:

  raw       a plain loop in this process: Pillow decode, convert to RGB, resize and centre-crop
            to the image's bucket (the same files, bytes already in memory);
  pipeline  li_dit.data.pipeline at 256 px with aspect-ratio buckets of about 256^2 pixels,
            global shuffle, caption choice, batches of --batch, for each --workers count (0: in
            this process; n: n grain worker processes).

The first batches (worker start-up) are not timed. Prints a table and writes the JSON.
"""
from __future__ import annotations

import importlib.util
import io
import json
import os
import pathlib
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from PIL import Image  # noqa: E402

from li_dit import config_lib  # noqa: E402
from li_dit.data import build, images, pipeline, sources  # noqa: E402
from li_dit.text import transforms  # noqa: E402

_IMAGES = flags.DEFINE_string("images", None, "Folder of captioned images (default: generated).")
_NUM = flags.DEFINE_integer("num", 512, "Images to generate.", lower_bound=8)
_BATCH = flags.DEFINE_integer("batch", 32, "Batch size.", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 24, "Timed batches per pipeline run.", lower_bound=1)
_WARMUP = flags.DEFINE_integer("warmup", 4, "Untimed batches first.", lower_bound=0)
_WORKERS = flags.DEFINE_list("workers", ["0", "1", "2"], "Worker process counts to measure.")
_JSON = flags.DEFINE_string("json", "bench_data.json", "Output JSON.")

# About 256^2 pixels each, multiples of 32: square, 4:5, 5:4, 4:7 and 7:4.
BUCKETS = ((256, 256), (288, 224), (224, 288), (352, 192), (192, 352))
_SIZES = ((512, 512), (640, 480), (480, 640), (640, 360), (384, 640))  # (width, height)
_PHOTOS = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "motorcycle_left.png",
           "motorcycle_right.png", "hubble_deep_field.jpg", "retina.jpg", "color.png")


def _photos() -> list[Image.Image]:
  """The RGB photos of skimage/data, found without importing scikit-image."""
  spec = importlib.util.find_spec("skimage")
  if spec is None or not spec.submodule_search_locations:
    return []
  folder = os.path.join(list(spec.submodule_search_locations)[0], "data")
  return [Image.open(os.path.join(folder, n)).convert("RGB") for n in _PHOTOS
          if os.path.exists(os.path.join(folder, n))]


def write_images(folder: str, num: int) -> str:
  """`num` JPEGs with captions in `folder`; returns where the pixels came from."""
  os.makedirs(folder, exist_ok=True)
  photos = _photos()
  rng = np.random.default_rng(0)
  for i in range(num):
    width, height = _SIZES[i % len(_SIZES)]
    if photos:
      photo = photos[i % len(photos)]
      scale = max(width / photo.width, height / photo.height) * rng.uniform(1.0, 1.3)
      big = photo.resize((round(photo.width * scale) + 1, round(photo.height * scale) + 1))
      left = rng.integers(0, big.width - width + 1)
      top = rng.integers(0, big.height - height + 1)
      img = big.crop((left, top, left + width, top + height))
    else:  # Texture: smooth colour fields plus grain, which JPEG cannot compress away.
      y, x = np.mgrid[0:height, 0:width] / 64.0
      base = 127 + 100 * np.sin(np.stack([x + i, y * 1.3, x + y], -1))
      img = Image.fromarray(np.clip(base + rng.normal(0, 20, base.shape), 0, 255)
                            .astype(np.uint8))
    img.save(os.path.join(folder, f"{i:05d}.jpg"), quality=90)
    with open(os.path.join(folder, f"{i:05d}.txt"), "w") as f:
      f.write(f"photo number {i}\n")
  return "skimage/data photos" if photos else "synthetic textures"


def raw_limit(files: list[bytes]) -> float:
  """Samples/s of Pillow decode + RGB + resize/crop to the bucket, in a plain loop."""
  start = time.perf_counter()
  for data in files:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    bucket = images.nearest_buckets([img.size], BUCKETS)[0]
    height, width = BUCKETS[bucket]
    images.resize_center_crop(np.asarray(img), height, width)
  return len(files) / (time.perf_counter() - start)


def pipeline_rate(input_config, captions: list[str], warmup: int, batches: int) -> float:
  """Samples/s of the training pipeline over `batches` batches after `warmup` ones."""
  with iter(pipeline.make_train_dataset(input_config,
                                        transforms.CaptionIds(captions))) as iterator:
    for _ in range(warmup):
      next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
      batch = next(iterator)
    elapsed = time.perf_counter() - start
  assert batch["image"].shape[1:3] in BUCKETS
  return batches * input_config.batch_size / elapsed


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  with tempfile.TemporaryDirectory() as tmp:
    folder = _IMAGES.value or os.path.join(tmp, "images")
    origin = f"images of {folder}" if _IMAGES.value else write_images(folder, _NUM.value)
    summary = build.build([folder], os.path.join(tmp, "data"), "bench", workers=0)
    files = [pathlib.Path(folder, f).read_bytes() for f in sorted(os.listdir(folder))
             if f.lower().endswith((".jpg", ".jpeg", ".png", ".webp"))]
    raw = raw_limit(files)
    config = config_lib.default_config().input
    config.update(source="tfds", tfds_name="bench", data_dir=os.path.join(tmp, "data"),
                  buckets=BUCKETS, batch_size=_BATCH.value)
    captions = sources.source_captions(config) + [""]  # "": caption dropout.
    rows = []
    for workers in (int(w) for w in _WORKERS.value):
      config.num_workers = workers
      rate = pipeline_rate(config, captions, _WARMUP.value, _BATCHES.value)
      rows.append({"workers": workers, "samples_per_sec": rate, "ratio_to_raw": rate / raw})
  print(f"{summary['written']} JPEGs ({origin}), buckets {BUCKETS}, batch {_BATCH.value}, "
        f"{os.cpu_count()} cores")
  print(f"{'':<22}{'samples/s':>10}{'x raw':>8}")
  print(f"{'raw Pillow loop':<22}{raw:>10.1f}{1.0:>8.2f}")
  for r in rows:
    print(f"{'pipeline, ' + str(r['workers']) + ' workers':<22}{r['samples_per_sec']:>10.1f}"
          f"{r['ratio_to_raw']:>8.2f}")
  result = {"images": summary["written"], "source": origin, "buckets": BUCKETS,
            "batch": _BATCH.value, "cores": os.cpu_count(), "raw_samples_per_sec": raw,
            "pipeline": rows}
  with open(_JSON.value, "w") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  app.run(main)
