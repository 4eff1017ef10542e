r"""Exports a trained LI-DiT run to PyTorch: safetensors weights, config.json and a model card.

  python tools/export_torch.py --workdir W [--step N] [--ema] [--dtype float32|bfloat16] --out OUT

Reads checkpoint N (default: the latest) of the run in W, its raw parameters or with --ema its
EMA parameters, and writes

  OUT/model.safetensors   the token refiners, the collaborative refiner and the DiT under the
                          names of `li_dit.export.torch.model.LIDiT`'s state_dict, in PyTorch
                          layouts (Linear weights [out, in], Conv2d weights [out, in, kh, kw]),
                          --dtype;
  OUT/config.json         format_version, the architecture, the LLMs (path or registry name,
                          feature layer, template, token limit, dtype, width) in branch order,
                          the VAE (diffusers folder and dtype; null in pixel space), the image
                          size, the objective, the default sampler settings and where it came from;
  OUT/README.md           a model card: what the model is and how to run it.

Load it with `li_dit.export.torch.model.LIDiT.from_pretrained(OUT)` (torch + safetensors only), or
generate images with `python -m li_dit.torch_pipeline --model OUT --prompt ... --out image.png`.
The frozen LLMs and the VAE are not copied: config.json refers to them, as the run did.
Nothing but the checkpoint is read (no LLM or VAE weights), and the export is loaded back with
li_dit.export.torch.model before the command reports success.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.export.torch import exporter  # noqa: E402
from li_dit.export.torch import model as torch_model  # noqa: E402
from li_dit.io import checkpoints  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_EMA = flags.DEFINE_boolean("ema", False, "Export the EMA parameters (default: the raw ones).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Stored weight dtype.")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
flags.mark_flags_as_required(["workdir", "out"])


def main(argv):
  del argv
  config_lib.quiet_library_logs()
  with cli.one_line_failures("export_torch", checkpoints.CheckpointError,
                             torch_model.ExportError):
    cfg = exporter.export(_WORKDIR.value, _OUT.value, _STEP.value, _EMA.value, _DTYPE.value)
  print(f"export_torch: step {cfg['source']['step']} of {_WORKDIR.value} "
        f"({cfg['source']['params']}, {cfg['dtype']}) -> {_OUT.value}")


if __name__ == "__main__":
  app.run(main)
