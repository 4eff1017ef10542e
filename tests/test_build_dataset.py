"""tools/build_dataset.py and li_dit.data.images on real files made here: good images of many
modes and sizes, and broken inputs of every kind, from folders, tables and WebDataset tars."""
import csv
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from li_dit.data import build, images, records

import image_fixtures as fx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIMITS = dict(min_size=fx.MIN_SIZE, max_pixels=fx.MAX_PIXELS,
              max_caption_chars=fx.MAX_CAPTION_CHARS)


def _read_all(data_dir, name):
  source = tfds.data_source(name, data_dir=data_dir,
                            decoders={"image": tfds.decode.SkipDecoding()})["train"]
  return [source[i] for i in range(len(source))]


@pytest.mark.parametrize("name", sorted(fx.good_images()))
def test_decode_gives_rgb_of_the_displayed_size(name):
  data, (width, height) = fx.good_images()[name]
  rgb = images.decode_rgb(data)
  assert rgb.dtype == np.uint8 and rgb.shape == (height, width, 3)
  assert 10 < rgb.mean() < 245  # The picture, not a blank or black frame.


def test_decode_composites_transparency_on_white_and_scales_16_bit():
  transparent = Image.new("RGBA", (16, 16), (255, 0, 0, 0))
  buf = io.BytesIO()
  transparent.save(buf, "PNG")
  assert (images.decode_rgb(buf.getvalue()) == 255).all()
  deep, _ = fx.good_images()["deep16.png"]
  expected = np.asarray(Image.open(io.BytesIO(deep)), np.float64) / 257  # Back to 8 bits.
  got = images.decode_rgb(deep)
  assert np.abs(got[..., 0] - expected).max() <= 1 and (got[..., 0] == got[..., 2]).all()


@pytest.mark.parametrize("name", sorted(fx.broken_images()))
def test_decode_rejects_broken_input_with_its_reason(name):
  data, reason = fx.broken_images()[name]
  with pytest.raises(images.BadInput) as e:
    images.decode_rgb(data, min_size=fx.MIN_SIZE, max_pixels=fx.MAX_PIXELS)
  assert e.value.reason == reason


def test_clean_caption():
  assert records.clean_caption(b"  a  red\n circle \t") == ("a red circle", False)
  assert records.clean_caption("one two three", max_chars=9) == ("one two", True)
  assert records.clean_caption("abcdefghij", max_chars=4) == ("abcd", True)
  for raw, reason in ((b"", "empty_caption"), (" \n\t", "empty_caption"),
                      (b"caf\xe9", "caption_not_utf8")):
    with pytest.raises(images.BadInput) as e:
      records.clean_caption(raw)
    assert e.value.reason == reason
  assert records.clean_captions([b"", "a cat", "a  cat", "a dog"]) == (["a cat", "a dog"], 0)


def test_folder_every_good_image_arrives_every_broken_one_is_counted(tmp_path):
  expected = fx.write_folder(str(tmp_path / "in"))
  summary = build.build([str(tmp_path / "in")], str(tmp_path / "out"), "fixtures",
                        examples_per_shard=7, workers=2, **LIMITS)
  assert summary["written"] == len(expected["good"])
  assert summary["skipped"] == expected["skipped"]
  assert summary["skipped_total"] >= 10  # At least ten kinds of broken input.
  assert summary["captions_truncated"] == 1
  on_disk = json.loads((tmp_path / "out/fixtures/1.0.0/summary.json").read_text())
  assert on_disk == summary

  stored = _read_all(str(tmp_path / "out"), "fixtures")
  assert len(stored) == len(expected["good"])
  sizes = np.load(tmp_path / "out/fixtures/1.0.0/sizes.npy")
  by_key = {}
  for i, record in enumerate(stored):
    stem = os.path.splitext(os.path.basename(record["key"].decode()))[0]
    by_key[stem] = record
    captions, (width, height) = expected["good"][stem]
    assert [c.decode() for c in record["captions"]] == captions
    assert (record["width"], record["height"]) == (width, height)
    assert tuple(sizes[i]) == (width, height)  # sizes.npy is in the dataset's order.
    assert images.decode_rgb(record["image"]).shape == (height, width, 3)
  assert sorted(by_key) == sorted(expected["good"])
  # The original bytes are stored, not a re-encoding.
  assert by_key["rgb"]["image"] == fx.good_images()["rgb.jpg"][0]


def _write_tables_and_tar(root):
  """JSONL, CSV and Parquet tables and a WebDataset tar; returns (inputs, good, skipped)."""
  import pyarrow as pa
  import pyarrow.parquet as pq
  os.makedirs(os.path.join(root, "img"))
  good = fx.good_images()
  for name, (data, _) in good.items():
    with open(os.path.join(root, "img", name), "wb") as f:
      f.write(data)
  rows = [{"image": "img/rgb.jpg", "caption": "a jsonl caption"},
          {"path": "img/grey.png", "captions": ["first", "second"]},
          {"image": "img/missing.jpg", "caption": "no such file"},
          {"image": "img/rgba.png"}]
  with open(os.path.join(root, "t.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  with open(os.path.join(root, "t.csv"), "w", newline="") as f:
    w = csv.DictWriter(f, ["file", "text"])
    w.writeheader()
    w.writerows([{"file": "img/tall.webp", "text": "a csv caption"},
                 {"file": "img/plain.bmp", "text": "   "}])
  pq.write_table(pa.table({
      "image": [{"bytes": good["cmyk.jpg"][0]}, {"bytes": b"\x89PNG broken"}],
      "caption": ["an embedded image", "embedded and broken"]}), os.path.join(root, "t.parquet"))
  with tarfile.open(os.path.join(root, "shard-000.tar"), "w") as tar:
    def add(name, data):
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    add("a/000.jpg", good["rotated.jpg"][0])
    add("a/000.txt", b"a tar caption")
    add("a/001.png", good["palette.png"][0])
    add("a/001.json", json.dumps({"caption": "a json caption"}).encode())
    add("a/002.jpg", fx.broken_images()["truncated.jpg"][0])
    add("a/002.txt", b"broken")
    add("a/003.txt", b"a caption without an image")
    add("a/004.jpg", good["rgb.jpg"][0])
  inputs = [os.path.join(root, n) for n in ("t.jsonl", "t.csv", "t.parquet", "shard-000.tar")]
  good_captions = {"a jsonl caption", "first", "a csv caption", "an embedded image",
                   "a tar caption", "a json caption"}
  skipped = {"missing_image": 2, "missing_caption": 2, "empty_caption": 1,
             "unreadable_image": 2}
  return inputs, good_captions, skipped


def test_tables_and_webdataset(tmp_path):
  inputs, good_captions, skipped = _write_tables_and_tar(str(tmp_path))
  summary = build.build(inputs, str(tmp_path / "out"), "mixed", workers=1, **LIMITS)
  assert summary["skipped"] == skipped
  stored = _read_all(str(tmp_path / "out"), "mixed")
  assert {r["captions"][0].decode() for r in stored} == good_captions
  grey = next(r for r in stored if r["captions"][0] == b"first")
  assert [c.decode() for c in grey["captions"]] == ["first", "second"]
  rotated = next(r for r in stored if r["captions"][0] == b"a tar caption")
  assert (rotated["width"], rotated["height"]) == (32, 48)


def test_rerun_after_interruption_keeps_finished_shards(tmp_path):
  expected = fx.write_folder(str(tmp_path / "in"))
  out = str(tmp_path / "out")
  first = build.build([str(tmp_path / "in")], out, "fixtures", examples_per_shard=5,
                      workers=1, **LIMITS)
  directory = build.dataset_dir(out, "fixtures", "1.0.0")
  shards = sorted(p for p in directory.iterdir() if p.name.endswith(
      f"-of-{first['num_shards']:05d}"))
  assert len(shards) == first["num_shards"] >= 4
  content = {p.name: p.read_bytes() for p in shards}
  # An interruption while shard 2 was being written: no counts file, a partial temporary.
  victim = shards[2]
  victim.unlink()
  (directory / f"{victim.name}.counts.json").unlink()
  (directory / f"{victim.name}.tmp").write_bytes(b"partial")
  mtimes = {p.name: os.stat(p).st_mtime_ns for p in shards if p != victim}
  second = build.build([str(tmp_path / "in")], out, "fixtures", examples_per_shard=5,
                       workers=1, **LIMITS)
  assert {k: v for k, v in second.items() if k != "seconds"} == {
      k: v for k, v in first.items() if k != "seconds"}
  assert victim.read_bytes() == content[victim.name]
  assert all(os.stat(p).st_mtime_ns == mtimes[p.name] for p in shards if p != victim)
  assert len(_read_all(out, "fixtures")) == len(expected["good"])


def test_cli_writes_summary_and_names_a_bad_input(tmp_path):
  fx.write_folder(str(tmp_path / "in"))
  tool = os.path.join(ROOT, "tools", "build_dataset.py")
  run = subprocess.run([sys.executable, tool, "--input", str(tmp_path / "in"), "--out",
                        str(tmp_path / "out"), "--name", "cli", "--workers", "1",
                        "--min_size", str(fx.MIN_SIZE)], capture_output=True, text=True)
  assert run.returncode == 0, run.stderr
  assert json.loads(run.stdout)["written"] > 0
  missing = str(tmp_path / "nowhere")
  run = subprocess.run([sys.executable, tool, "--input", missing, "--out", str(tmp_path / "o"),
                        "--name", "cli"], capture_output=True, text=True)
  assert run.returncode != 0 and missing in run.stderr


def test_bench_data_runs_at_a_tiny_size(tmp_path):
  out = tmp_path / "bench.json"
  run = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "bench_data.py"),
                        "--num", "16", "--batch", "4", "--batches", "2", "--warmup", "1",
                        "--workers", "0,1", "--json", str(out)],
                       capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["images"] == 16 and [r["workers"] for r in result["pipeline"]] == [0, 1]
  assert result["raw_samples_per_sec"] > 0 and "raw Pillow loop" in run.stdout
