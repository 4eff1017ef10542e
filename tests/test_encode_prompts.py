"""tools/encode_prompts.py run as a command on the real SmolLM2-135M-Instruct GGUF."""
import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from li_dit.text import encoders

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "encode_prompts.py")
MODEL = "smollm2-135m-instruct"
NUM_LAYERS = 30
MAX_TOKENS = 8
PROMPTS = [
    "A red cube balanced on a small blue sphere, studio lighting.",  # > 8 tokens.
    "Two cats",
    "A wooden sign that reads 'OPEN' hanging on a green door next to a potted fern.",  # > 8.
]


def _write(path, data: bytes) -> str:
  path.write_bytes(data)
  return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """name -> (process, output path) of every run, all started at once.

  Each successful run spends ~10 s parsing and dequantizing the GGUF and ~6 s compiling; running
  them side by side (and beside the in-process `encoder`) keeps the module's wall time down.
  """
  tmp = tmp_path_factory.mktemp("encode_prompts")
  # The same prompts as text (a blank line, CRLF endings) and as JSON lines.
  txt = _write(tmp / "prompts.txt", "\r\n".join([PROMPTS[0], "", *PROMPTS[1:]]).encode() + b"\r\n")
  jsonl = _write(tmp / "prompts.jsonl",
                 "".join(json.dumps({"prompt": p}) + "\n" for p in PROMPTS).encode())
  common = ["--llm", MODEL, "--max-tokens", str(MAX_TOKENS)]
  commands = {
      "one": common + ["--prompts", txt, "--layer", "-3"],
      "all": common + ["--prompts", jsonl, "--layers", "all"],
      "missing": common + ["--prompts", str(tmp / "nope.txt")],
      "empty": common + ["--prompts", _write(tmp / "blank.txt", b"\n  \n")],
      "not_utf8": common + ["--prompts", _write(tmp / "latin1.txt", b"caf\xe9 au lait\n")],
      "both_layer_flags": common + ["--prompts", txt, "--layer", "-3", "--layers", "all"],
      "bad_layer": common + ["--prompts", txt, "--layer", str(NUM_LAYERS + 1)],
  }
  started = {}
  for name, args in commands.items():
    out = str(tmp / f"{name}.npz")
    started[name] = (subprocess.Popen([sys.executable, TOOL, *args, "--out", out], cwd=ROOT,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
                     out)
  yield started
  for process, _ in started.values():
    if process.poll() is None:
      process.kill()
      process.wait()


@pytest.fixture(scope="module")
def encoder(runs):
  del runs  # Started first, so that they run while this loads.
  return encoders.PromptEncoder(name="smollm2", path=MODEL, max_tokens=MAX_TOKENS)


@pytest.fixture(scope="module")
def finished(runs, encoder):
  """name -> (return code, stdout, stderr) of every run."""
  del encoder  # Loaded before the runs are waited for.
  results = {}
  for name, (process, _) in runs.items():
    stdout, stderr = process.communicate(timeout=600)
    results[name] = (process.returncode, stdout, stderr)
  return results


@pytest.fixture(scope="module")
def outputs(runs, finished):
  """name -> the saved arrays of the runs "one" and "all"."""
  arrays = {}
  for name in ("one", "all"):
    returncode, _, stderr = finished[name]
    assert returncode == 0, stderr
    with np.load(runs[name][1]) as saved:
      arrays[name] = {key: saved[key] for key in saved.files}
  return arrays


def _scale(features, mask, prefix_len):
  """The largest |feature| over valid prompt-row tokens (the prefix holds larger outliers)."""
  return float(np.abs(features[:, prefix_len:][mask[:, prefix_len:]]).max())


def test_single_layer_file(outputs, finished, encoder):
  saved = outputs["one"]
  prefix_len, length = encoder.layout.prefix_len, encoder.layout.length
  assert set(saved) == {"features", "mask", "token_ids", "prefix_len", "instruction_span", "layer",
                        "prompts", "num_truncated", "llm", "template", "max_tokens", "dtype"}
  assert saved["features"].shape == (3, prefix_len + length, 576)
  assert saved["features"].dtype == np.float32
  assert saved["mask"].shape == saved["token_ids"].shape == (3, prefix_len + length)
  assert saved["mask"].dtype == bool and saved["token_ids"].dtype == np.int32
  assert int(saved["prefix_len"]) == prefix_len > 0
  np.testing.assert_array_equal(saved["instruction_span"], [0, prefix_len])
  assert int(saved["layer"]) == -3
  assert saved["prompts"].tolist() == PROMPTS  # The blank line is skipped, CRLF removed.
  assert int(saved["num_truncated"]) == 2
  assert (str(saved["template"]), int(saved["max_tokens"]), str(saved["dtype"])) == (
      "paper", MAX_TOKENS, "float32")
  summary = finished["one"][1]
  assert "3 prompts (1 blank line(s) skipped), 2 truncated to 8 tokens, layer -3 of 30" in summary
  assert "tokens/s" in summary


def test_single_layer_matches_encode_full(outputs, encoder):
  saved = outputs["one"]
  rows = encoder.tokenize(PROMPTS)
  assert rows.num_truncated == 2
  full = np.asarray(jax.jit(encoder.encode_full)(encoder.params, rows.tokens, rows.mask))
  prefix_len = encoder.layout.prefix_len
  prefix = np.broadcast_to(np.asarray(encoder.layout.prefix_ids, np.int32), (3, prefix_len))
  np.testing.assert_array_equal(saved["token_ids"], np.concatenate([prefix, rows.tokens], 1))
  np.testing.assert_array_equal(saved["mask"][:, :prefix_len], True)
  np.testing.assert_array_equal(saved["mask"][:, prefix_len:], rows.mask)
  mask = saved["mask"]
  diff = float(np.abs(saved["features"] - full)[mask].max())
  scale = _scale(full, mask, prefix_len)
  print(f"max |tool - encode_full|: {diff:.3g} (prompt features up to {scale:.3g})")
  # The tool reuses the encoded prefix, which is exact but not bitwise (see test_llm.py's
  # test_prefix_reuse_matches_full_encoding).
  assert diff <= 1e-5 * scale


def test_all_layers_file(outputs, finished, encoder):
  saved, one = outputs["all"], outputs["one"]
  prefix_len, length = encoder.layout.prefix_len, encoder.layout.length
  assert "layer" not in saved
  np.testing.assert_array_equal(saved["layers"], np.arange(NUM_LAYERS + 1))
  assert saved["features"].shape == (3, NUM_LAYERS + 1, prefix_len + length, 576)
  assert saved["features"].dtype == np.float32
  # The .jsonl file held the same prompts as the .txt file.
  assert saved["prompts"].tolist() == PROMPTS and int(saved["num_truncated"]) == 2
  np.testing.assert_array_equal(saved["token_ids"], one["token_ids"])
  np.testing.assert_array_equal(saved["mask"], one["mask"])
  mask = saved["mask"]
  # hidden_states[0] is the token embedding, exactly.
  embedding = np.asarray(encoder.params["embed_tokens"]["embedding"])
  np.testing.assert_array_equal(saved["features"][:, 0][mask], embedding[saved["token_ids"][mask]])
  # Layer -3 is index NUM_LAYERS + 1 - 3; the single-layer run reused the prefix, this one not.
  minus_3 = saved["features"][:, NUM_LAYERS + 1 - 3]
  diff = float(np.abs(minus_3 - one["features"])[mask].max())
  assert diff <= 1e-5 * _scale(one["features"], mask, prefix_len)
  assert np.isfinite(saved["features"]).all()
  assert f"layers 0..{NUM_LAYERS} of {NUM_LAYERS}" in finished["all"][1]


@pytest.mark.parametrize("name, message", [
    ("missing", r"Cannot read prompts file .*nope\.txt: No such file or directory"),
    ("empty", r"Prompts file .*blank\.txt has no prompts \(2 line\(s\), all blank\)"),
    ("not_utf8", r"Prompts file .*latin1\.txt is not UTF-8 text: byte 0xe9 at offset 3"),
    ("both_layer_flags", r"At most one of \(layer, layers\)"),
    ("bad_layer", r"layer 31 is out of range for a 30-block model: valid layers are -31\.\.30"),
])
def test_errors(name, message, runs, finished):
  returncode, _, stderr = finished[name]
  assert returncode != 0
  assert re.search(message, stderr), stderr
  assert not os.path.exists(runs[name][1])
