"""Every command-line entry point turns an expected failure (a missing or damaged file, a wrong
path, a config error, no checkpoint, an unwritable output, a full disk while saving) into one
line, `prog: message` naming the file or field, and exit code 1 (2 for argparse's usage errors);
a traceback is for bugs only (li_dit.cli)."""
import os
import re
import resource
import shutil
import signal
import subprocess
import sys

import pytest

import smoke_runs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(REPO, "configs", "demo.py") + ":smoke"


def _run(args, cwd=REPO, timeout=300, **kwargs):
  return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True,
                        timeout=timeout, **kwargs)


def _assert_one_line(result, prog, *named, code=1):
  """Exit `code`, no traceback, and the last line of stderr `prog: ...` naming each of `named`."""
  assert result.returncode == code, (result.returncode, result.stderr[-3000:])
  assert "Traceback" not in result.stderr, result.stderr[-3000:]
  line = result.stderr.strip().splitlines()[-1]
  assert line.startswith(f"{prog}: "), line
  for what in named:
    assert what in line, (what, line)
  print(line)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
  """A file (paths under it cannot be created), a workdir without checkpoints, a damaged file."""
  root = tmp_path_factory.mktemp("cli")
  (root / "a_file").write_text("not a directory\n")
  (root / "empty_run").mkdir()
  (root / "model").mkdir()
  (root / "model" / "config.json").write_text("{not json")
  return root


CASES = {
    # name: (argv, prog, what the line must name); {root} is the fixture's folder.
    "train: workdir under a file": (
        ["-m", "li_dit.train", "--config", SMOKE, "--workdir", "{root}/a_file/run"],
        "li_dit.train", ["{root}/a_file/run"]),
    "train: an LLM path that does not exist": (
        ["-m", "li_dit.train", "--config", SMOKE, "--workdir", "{root}/run_llm",
         "--config.text.llms.smollm2.path={root}/no_llm"], "li_dit.train", ["{root}/no_llm"]),
    "train: init_from without checkpoints": (
        ["-m", "li_dit.train", "--config", SMOKE, "--workdir", "{root}/run_init",
         "--config.init_from={root}/empty_run"], "li_dit.train",
        ["config.init_from", "{root}/empty_run"]),
    "sample: no checkpoint": (
        ["-m", "li_dit.sample", "--workdir", "{root}/empty_run", "--prompt", "x", "--out",
         "{root}/x.png"], "li_dit.sample", ["no checkpoints in {root}/empty_run"]),
    "sample: a bad --mesh": (
        ["-m", "li_dit.sample", "--workdir", "{root}/empty_run", "--prompt", "x", "--out",
         "{root}/x.png", "--mesh", "dp=2"], "li_dit.sample", ["--mesh", "'dp=2'"]),
    "evaluate: a workdir that does not exist": (
        ["-m", "li_dit.evaluate", "--workdir", "{root}/missing", "--benchmark", "shapes",
         "--out", "{root}/r.json"], "li_dit.evaluate", ["{root}/missing"]),
    "export_torch: no checkpoint": (
        ["tools/export_torch.py", "--workdir", "{root}/empty_run", "--out", "{root}/export"],
        "export_torch", ["{root}/empty_run"]),
    "torch_pipeline: a damaged config.json": (
        ["-m", "li_dit.torch_pipeline", "--model", "{root}/model", "--prompt", "x", "--out",
         "{root}/t.png"], "torch_pipeline", ["{root}/model"]),
    "run_card: an unwritable --json": (
        ["tools/run_card.py", "--config", SMOKE, "--json", "{root}/a_file/card.json"],
        "run_card", ["{root}/a_file/card.json"]),
    "param_count: a config error": (
        ["tools/param_count.py", "--config", SMOKE, "--config.model.num_heads=5"], "param_count",
        ["config.model.width"]),
    "aot_compile: an unknown topology": (
        ["tools/aot_compile.py", "--config", SMOKE, "--topology", "v9:1x1"], "aot_compile",
        ["v9"]),
    "build_dataset: a missing input": (
        ["tools/build_dataset.py", "--input", "{root}/no_images", "--out", "{root}/tfds",
         "--name", "x"], "build_dataset", ["{root}/no_images"]),
    "encode_latents: a config without a VAE": (
        ["tools/encode_latents.py", "--config", SMOKE, "--out", "{root}/latents", "--name", "x"],
        "encode_latents", ["config.vae.path"]),
    "encode_prompts: a missing prompts file": (
        ["tools/encode_prompts.py", "--llm", "smollm2-135m-instruct", "--prompts",
         "{root}/no_prompts.txt", "--out", "{root}/p.npz"], "encode_prompts",
        ["{root}/no_prompts.txt"]),
    "make_image_folder: an output under a file": (
        ["tools/make_image_folder.py", "--source", "shapes", "--num", "2", "--out",
         "{root}/a_file/images"], "make_image_folder", ["{root}/a_file/images"]),
    "rehearse: an unwritable --json": (
        ["tools/rehearse.py", "--config", "configs/li_dit_1b.py", "--json",
         "{root}/a_file/r.json"], "rehearse", ["{root}/a_file/r.json"]),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_expected_failures_are_one_line(case, paths):
  argv, prog, named = CASES[case]
  fill = lambda s: s.replace("{root}", str(paths))
  _assert_one_line(_run([fill(a) for a in argv]), prog, *map(fill, named))


def _file_size_limit(limit):
  """preexec_fn: a disk that fills up at `limit` bytes per file (writes fail with EFBIG)."""
  def apply():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return apply


@pytest.mark.slow
def test_a_full_disk_while_saving_is_one_line_and_leaves_the_last_checkpoint(tmp_path):
  """A checkpoint write fails part-way (its files outgrow the limit): one line naming the step,
  the file and the cause, exit 1, and no half-written checkpoint: the one before it stays the
  newest."""
  workdir = tmp_path / "run"
  overrides = ("--config.total_steps=4", "--config.checkpoint_every=2", "--config.sample_every=0")
  smoke_runs.train(str(workdir), 1, {}, *overrides)
  # Resumed from step 2, with the programs of the first run in the compilation cache (read, not
  # written), so only the checkpoint's files grow past the limit.
  shutil.rmtree(workdir / "checkpoints" / "4")
  full = subprocess.run(smoke_runs.command(str(workdir), {}, *overrides), cwd=REPO,
                        env=smoke_runs.environment(1), capture_output=True, text=True,
                        timeout=600, preexec_fn=_file_size_limit(200_000))
  assert full.returncode == 1, full.stderr[-3000:]
  # Searched for, not taken as the last line: orbax's background writers may still log the same
  # error while the process exits, on the same stream.
  found = re.findall(r"li_dit\.train: saving checkpoint step 4 in (\S+) failed: ([^\n]*)",
                     full.stderr)
  assert len(found) == 1, full.stderr[-3000:]
  print(found[0])
  where, cause = found[0]
  assert where == f"{workdir}/checkpoints"
  assert "File too large" in cause and "4.orbax-checkpoint-tmp" in cause
  # No traceback of the main thread.
  assert "li_dit/train.py" not in full.stderr, full.stderr[-3000:]
  assert sorted(s for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == ["2"]
