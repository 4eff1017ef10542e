"""A trained run -> PyTorch: the state dict of `li_dit.export.torch.model.LIDiT` (names and
layouts), config.json and a model card. `tools/export_torch.py` is the command line.

Linear weights go [in, out] -> [out, in], conv kernels HWIO -> OIHW; scanned DiT blocks become
`dit.blocks.<i>`. Nothing but the checkpoint is read (no LLM or VAE weights).
"""
from __future__ import annotations

import json
import math
import os
import re
from typing import Any

import jax
import ml_collections
import numpy as np
import safetensors.torch
import torch
from flax import traverse_util

from li_dit.export.torch import model as torch_model
from li_dit.io import checkpoints
from li_dit.io import packaged

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# The objectives the PyTorch pipeline samples (li_dit.diffusion.flow: x_t = (1 - t) x0 + t noise,
# the network predicts the velocity noise - x0).
OBJECTIVES = ("rectified_flow",)


def restore_params(workdir: str, step: int | None, ema: bool
                   ) -> tuple[ml_collections.ConfigDict, dict[str, Any], int]:
  """(config, parameters as a nested dict of numpy arrays, step) of a run's checkpoint.

  The parameters are restored from the shapes the checkpoint records, so neither the LLMs nor
  the VAE are needed. Without `step`, the newest checkpoint that restores whole (a damaged one
  is moved aside, li_dit.io.checkpoints.Checkpointer.restore_whole). Raises CheckpointError
  naming the step and the available ones.
  """
  if not os.path.isdir(checkpoints.checkpoint_dir(workdir)):
    raise checkpoints.CheckpointError(f"no checkpoints in {workdir} (no "
                                      f"{checkpoints.checkpoint_dir(workdir)})")
  with checkpoints.Checkpointer(workdir, async_save=False) as ckpt:
    item = "ema_params" if ema else "params"
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])

    def abstract_at(candidate: int) -> dict[str, Any]:
      ckpt.restore_config(candidate)  # A config that does not read is damage too.
      return {item: jax.tree_util.tree_map(
          lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
          dict(ckpt.manager.item_metadata(candidate)[item]))}

    step, restored = ckpt.restore_whole(abstract_at, step)
    params = restored[item]
    config = ckpt.restore_config(step)
  return config, jax.tree_util.tree_map(np.asarray, params), step


def torch_name(path: tuple[str, ...]) -> str:
  """A Flax parameter path -> its name in li_dit.export.torch.model.LIDiT's state_dict.

  ("token_refiner_0", "block_1", "attn", "qkv", "kernel")
      -> "token_refiners.0.blocks.1.attn.qkv.weight";
  ("collaborative_refiner", "branch_1_mlp", "fc1", "bias")
      -> "collaborative_refiner.branches.1.mlp.fc1.bias".
  """
  name = ".".join(path)
  name = re.sub(r"token_refiner_(\d+)", r"token_refiners.\1", name)
  name = re.sub(r"\bblock_(\d+)", r"blocks.\1", name)
  name = re.sub(r"\bbranch_(\d+)_", r"branches.\1.", name)
  return re.sub(r"\.(kernel|scale)$", ".weight", name)


def torch_layout(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
  """One Flax parameter -> the PyTorch layout of the tensor `torch_name(path)` names.

  Dense kernels [in..., out...] -> Linear weights [out, in] (an attention's `out` projection
  contracts two input axes, heads and head_dim; every other Dense one); conv kernels
  [kh, kw, in, out] -> [out, in, kh, kw]; biases flattened; RMSNorm scales as they are.
  """
  leaf, module = path[-1], path[-2]
  if leaf == "bias":
    return value.reshape(-1)
  if leaf == "scale":
    return value
  if path[-3:-1] in (("pos_embed", "conv1"), ("pos_embed", "conv2")):
    return value.transpose(3, 2, 0, 1)
  in_axes = 2 if module == "out" else 1
  return value.reshape(math.prod(value.shape[:in_axes]), -1).T


def torch_state_dict(params: dict[str, Any]) -> dict[str, np.ndarray]:
  """Flax parameters of li_dit.models.lidit.LIDiT (nested dict) -> {torch name: array}.

  Scanned DiT blocks (config.model.scan_layers) are stacked on a leading axis under
  dit/blocks; they become dit.blocks.<i>, as unscanned ones (dit/block_<i>) do.
  """
  out = {}
  for path, value in traverse_util.flatten_dict(params).items():
    value = np.asarray(value)
    if path[:2] == ("dit", "blocks"):
      for i, layer in enumerate(value):
        layer_path = ("dit", f"block_{i}") + path[2:]
        out[torch_name(layer_path)] = np.ascontiguousarray(torch_layout(layer_path, layer))
    else:
      out[torch_name(path)] = np.ascontiguousarray(torch_layout(path, value))
  return out


def _reference(path: str) -> str:
  """A registry name as it is, a file or folder as an absolute path (the export may move)."""
  if path in packaged.PACKAGED_LLMS or not path:
    return path
  return os.path.abspath(path)


def export_config(config: ml_collections.ConfigDict, state: dict[str, np.ndarray],
                  workdir: str, step: int, ema: bool, dtype: str) -> dict[str, Any]:
  """config.json of an export (see the module docstring); `state` gives the LLM widths."""
  objective = config.flow.get("objective", "rectified_flow")
  if objective not in OBJECTIVES:
    raise torch_model.ExportError(f"config.flow.objective {objective!r}: the PyTorch export samples "
                     f"{OBJECTIVES} only")
  m = config.model
  names = sorted(config.text.llms)  # The branch order (li_dit.text.encoders.build_encoders).
  llms = []
  for i, name in enumerate(names):
    llm = config.text.llms[name]
    llms.append(dict(name=name, path=_reference(llm.path), layer=llm.layer,
                     template=llm.template, max_tokens=llm.max_tokens, dtype=llm.dtype,
                     hidden_size=int(state[f"token_refiners.{i}.input_proj.weight"].shape[1])))
  vae = config.get("vae") or {}
  return dict(
      format_version=torch_model.FORMAT_VERSION,
      architecture=dict(patch_size=m.patch_size, channels=m.channels, width=m.width,
                        depth=m.depth, num_heads=m.num_heads, mlp_ratio=m.mlp_ratio,
                        qk_norm=m.qk_norm, pos_kernel_size=m.pos_kernel_size,
                        refiner_depth=m.refiner_depth),
      dtype=dtype,
      layout="NCHW",
      llms=llms,
      vae=(dict(path=_reference(vae["path"]), dtype=vae["dtype"]) if vae.get("path") else None),
      image_size=config.input.image_size,
      objective=dict(name=objective, prediction="velocity",
                     interpolation="x_t = (1 - t) * x0 + t * noise, t = 1 is noise"),
      sampler=dict(sampler=config.sample.sampler, steps=config.sample.steps,
                   cfg=config.sample.cfg, seed=config.sample.seed,
                   shift_base_size=config.flow.base_size, shift_base=config.flow.base_shift),
      source=dict(workdir=os.path.abspath(workdir), step=step,
                  params="ema_params" if ema else "params"),
  )


def model_card(cfg: dict[str, Any]) -> str:
  """OUT/README.md: what the exported model is and how to use it."""
  a = cfg["architecture"]
  llms = "\n".join(f"- `{l['name']}`: `{l['path']}`, hidden_states[{l['layer']}], template "
                   f"`{l['template']}`, at most {l['max_tokens']} prompt tokens, {l['dtype']}"
                   for l in cfg["llms"])
  space = (f"the latent space of the diffusers VAE `{cfg['vae']['path']}`" if cfg["vae"]
           else "pixel space")
  s = cfg["sampler"]
  return f"""# LI-DiT (exported from li-dit)

A text-to-image diffusion transformer with frozen LLMs as prompt encoders (LI-DiT, Ma et al.,
NeurIPS 2024), trained with li-dit and exported by `tools/export_torch.py` from step
{cfg['source']['step']} of `{cfg['source']['workdir']}` ({cfg['source']['params']}).

- DiT: width {a['width']}, depth {a['depth']}, {a['num_heads']} heads, patch {a['patch_size']},
  {a['channels']} channels, in {space}; {cfg['image_size']}x{cfg['image_size']} pixel images.
- Prompt encoders (not included; `config.json` refers to them), in branch order:
{llms}
- Objective: rectified flow, velocity prediction. Defaults: {s['sampler']} sampler, {s['steps']}
  steps, classifier-free guidance {s['cfg']}.
- Weights: `model.safetensors` ({cfg['dtype']}), names and layouts of
  `li_dit.export.torch.model.LIDiT` (PyTorch; images NCHW).

## Usage

```bash
python -m li_dit.torch_pipeline --model THIS_FOLDER --prompt "a red circle" --out image.png
```

```python
from li_dit.export.torch import model as torch_model  # needs torch and safetensors only
model = torch_model.LIDiT.from_pretrained("THIS_FOLDER")
velocity = model(x, t, [torch_model.TextFeatures(prefix, tokens, mask), ...])
```

`x` [B,C,H,W], `t` [B] in [0, 1] (1 is noise); per LLM the instruction prefix's features
[P,D], the prompt rows' [B,L,D] and their mask [B,L].
"""


def export(workdir: str, out: str, step: int | None = None, ema: bool = False,
           dtype: str = "float32") -> dict[str, Any]:
  """Writes OUT/{model.safetensors,config.json,README.md}; returns the config written."""
  config, params, step = restore_params(workdir, step, ema)
  state = torch_state_dict(params)
  cfg = export_config(config, state, workdir, step, ema, dtype)
  os.makedirs(out, exist_ok=True)
  tensors = {name: torch.tensor(value).to(TORCH_DTYPES[dtype])
             for name, value in state.items()}
  safetensors.torch.save_file(tensors, os.path.join(out, torch_model.WEIGHTS_NAME),
                              metadata={"format": "pt"})
  with open(os.path.join(out, torch_model.CONFIG_NAME), "w", encoding="utf-8") as f:
    json.dump(cfg, f, indent=2)
  with open(os.path.join(out, "README.md"), "w", encoding="utf-8") as f:
    f.write(model_card(cfg))
  torch_model.LIDiT.from_pretrained(out)  # Every tensor present and of its shape.
  return cfg
