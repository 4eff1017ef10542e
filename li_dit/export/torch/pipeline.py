"""Text-to-image in PyTorch with an exported LI-DiT: its LLMs in transformers, the model and
sampler of li_dit.export.torch.model, and the diffusers VAE of a latent model (no jax).
`python -m li_dit.torch_pipeline` is its command line, which says what it computes.
"""
from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np
import torch
import transformers

from li_dit.export.torch import model as torch_model
from li_dit.io import packaged
from li_dit.text import prompts as prompts_lib

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class LLMEncoder:
  """One frozen LLM in transformers, with its tokenizer and prompt layout (a config.json entry)."""

  def __init__(self, reference: dict[str, Any], device: str | torch.device = "cpu"):
    path = packaged.resolve_llm_path(reference["path"])
    # transformers reads a GGUF file as (its folder, gguf_file=its name); needs gguf+accelerate.
    folder, kwargs = ((os.path.dirname(path), dict(gguf_file=os.path.basename(path)))
                      if path.endswith(".gguf") else (path, {}))
    self.tokenizer = transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False,
                                                                **kwargs)
    self.model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=DTYPES[reference["dtype"]], trust_remote_code=False, **kwargs)
    self.model = self.model.to(device).eval()
    width = self.model.config.get_text_config().hidden_size
    if width != reference["hidden_size"]:
      raise torch_model.ExportError(
          f"LLM {reference['name']!r} at {path} has hidden_size {width}; the model was trained "
          f"on features of width {reference['hidden_size']}")
    self.layer = reference["layer"]
    self.layout = prompts_lib.build_layout(self.tokenizer, reference["template"],
                                           reference["max_tokens"])
    self.device = device

  @torch.no_grad()
  def __call__(self, prompts: Sequence[str]) -> torch_model.TextFeatures:
    """Features of `prompts`: prefix [P,D], rows [B,L,D] float32 and their mask [B,L]."""
    rows = prompts_lib.tokenize_prompts(self.tokenizer, self.layout, prompts)
    batch, prefix_len = len(prompts), self.layout.prefix_len
    prefix = torch.tensor(self.layout.prefix_ids, dtype=torch.long).expand(batch, prefix_len)
    row_mask = torch.from_numpy(rows.mask)
    tokens = torch.cat([prefix, torch.from_numpy(rows.tokens).long()], dim=1)
    mask = torch.cat([torch.ones(batch, prefix_len, dtype=torch.long), row_mask.long()], dim=1)
    # Right padding under a causal mask: valid tokens never see the padding, so the full
    # sequences give the features training got from the prefix encoded once.
    hidden = self.model(input_ids=tokens.to(self.device), attention_mask=mask.to(self.device),
                        output_hidden_states=True).hidden_states[self.layer].float().cpu()
    # Padding features are never read (masked); zeros keep them finite whatever the LLM does
    # with rows that have no valid token.
    row_features = torch.where(row_mask[..., None], hidden[:, prefix_len:], 0.0)
    return torch_model.TextFeatures(hidden[0, :prefix_len], row_features, row_mask)


class VAEDecoder:
  """Diffusion latents -> pixels through a diffusers AutoencoderKL (a config.json "vae")."""

  def __init__(self, reference: dict[str, Any], device: str | torch.device = "cpu"):
    import diffusers  # Only latent models need it (pip install li-dit[torch]).
    path = reference["path"]
    subfolder = None if os.path.isfile(os.path.join(path, "config.json")) else "vae"
    self.vae = diffusers.AutoencoderKL.from_pretrained(
        path, subfolder=subfolder, torch_dtype=DTYPES[reference["dtype"]]).to(device).eval()
    self.factor = 2 ** (len(self.vae.config.block_out_channels) - 1)

  @torch.no_grad()
  def __call__(self, x: torch.Tensor) -> torch.Tensor:
    """Normalised latents [B,C,h,w] -> images [B,3,h*f,w*f] float32, about [-1, 1]."""
    cfg = self.vae.config
    z = x.float() / cfg.scaling_factor + (cfg.shift_factor or 0.0)
    return self.vae.decode(z.to(self.vae.dtype)).sample.float()


class Pipeline:
  """An exported LI-DiT with its LLMs (and VAE): prompts -> uint8 images [B,H,W,3]."""

  def __init__(self, folder: str, device: str | torch.device = "cpu"):
    self.config = torch_model.read_config(folder)
    objective = self.config["objective"]["name"]
    if objective != "rectified_flow":
      raise torch_model.ExportError(f"{folder}: objective {objective!r} is not sampled here")
    self.model = torch_model.LIDiT.from_pretrained(folder, device=device)
    self.encoders = [LLMEncoder(reference, device) for reference in self.config["llms"]]
    self.vae = VAEDecoder(self.config["vae"], device) if self.config["vae"] else None
    self.device = device

  @property
  def factor(self) -> int:
    """f: pixels per model position along each side (1 in pixel space)."""
    return 1 if self.vae is None else self.vae.factor

  def encode(self, prompts: Sequence[str]) -> list[torch_model.TextFeatures]:
    """One TextFeatures per LLM, in branch order."""
    return [torch_model.TextFeatures(*(a.to(self.device) for a in encoder(prompts)))
            for encoder in self.encoders]

  def __call__(self, prompts: Sequence[str], steps: int | None = None,
               cfg_scale: float | None = None, sampler: str | None = None,
               seed: int | None = None, noise: torch.Tensor | np.ndarray | None = None,
               size: int | None = None) -> np.ndarray:
    """uint8 images [B,H,W,3] of `prompts`; None arguments take config.json's defaults.

    noise: the initial noise [B,C,h,w] float32 (NCHW); None draws it from `seed` with torch.
    size: the images' side in pixels (default: the trained size).
    """
    defaults = self.config["sampler"]
    size = size or self.config["image_size"]
    if size % (self.factor * self.config["architecture"]["patch_size"]):
      raise ValueError(f"size {size} is not divisible by f * patch size = "
                       f"{self.factor} * {self.config['architecture']['patch_size']}")
    shape = (len(prompts), self.config["architecture"]["channels"], size // self.factor,
             size // self.factor)
    if noise is None:
      generator = torch.Generator().manual_seed(defaults["seed"] if seed is None else seed)
      noise = torch.randn(shape, generator=generator)
    if isinstance(noise, np.ndarray):
      noise = torch.from_numpy(np.array(noise, np.float32))  # A copy: np.load may be read-only.
    noise = noise.float()
    if tuple(noise.shape) != shape:
      raise ValueError(f"noise has shape {tuple(noise.shape)}; {len(prompts)} prompt(s) at "
                       f"{size}x{size} pixels need {shape} (NCHW)")
    shift = torch_model.resolution_shift(size, size, defaults["shift_base_size"],
                                         defaults["shift_base"])
    x = torch_model.generate(
        self.model, self.encode(prompts), self.encode([""]), noise.to(self.device),
        steps or defaults["steps"], defaults["cfg"] if cfg_scale is None else cfg_scale,
        sampler or defaults["sampler"], shift)
    if self.vae is not None:
      x = self.vae(x)
    return torch_model.to_uint8(x).cpu().numpy()
