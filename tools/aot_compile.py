r"""Compiles a config's real train step, or its sampling program, for a TPU topology on this
machine and plans its memory.

  python tools/aot_compile.py --config configs/li_dit_1b.py --topology v5e:16x16 \
      [--config.a.b=v ...] [--json plan.json] [--prefix_tokens 64 --suffix_tokens 8] \
      [--num_slices 2 --config.dcn_mesh.data=2] [--program sample [--sample_batch N]]

--program sample compiles what li_dit.sample runs on the mesh: the EMA parameters, both LLMs
and the VAE placed by the training rules, one batch of prompts encoded, the run's sampler
(config.sample.steps, .sampler) with classifier-free guidance, the latents decoded to pixels.

Needs libtpu (`pip install -e .[tpu]`), not a TPU: the TPU compiler runs on the CPU, on the devices
of `--topology` (e.g. v4:4x4x4, v5e:16x16, v5p:8x8x16, v6e:8x8). The step is the one `li_dit.train`
runs (li_dit.training.plan.plan_step), with the config's mesh, sharding rules, remat and dtypes;
with online text encoding the frozen LLMs' forward is part of it. LLM weights are not read: their
architecture and tokenizer come from their files when the path exists here, else the architecture
from `li_dit.io.architectures` (the paper's LLaMA3-8B and Qwen1.5-7B) and the chat template's prefix
and suffix lengths, which a tokenizer would decide, from --prefix_tokens and --suffix_tokens. With
config.vae.path, the VAE's encoder is part of the step too (its config.json is read, or a published
VAE's architecture, li_dit.io.architectures; never its weights). --json includes the run card
(li_dit.training.run_card).

Prints per-chip memory (arguments, outputs, temporaries, peak) against the chip's HBM, model TFLOPs
per step (li_dit.training.flops) and the step time at 100% and 50% MFU; --json writes the same.
Exits 1 when the step does not fit (the compiler's out-of-memory report is printed as such).
"""
from __future__ import annotations

import functools
import json
import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The TPU compiler (libtpu) runs on this CPU machine: every platform, not li_dit's CPU default.
os.environ.setdefault("JAX_PLATFORMS", "")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from absl import app, flags  # noqa: E402
from jax.experimental import topologies  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from li_dit import cli  # noqa: E402
from li_dit import config_lib  # noqa: E402
from li_dit.diffusion import flow  # noqa: E402
from li_dit.diffusion import image_space  # noqa: E402
from li_dit.generation import generator as generator_lib  # noqa: E402
from li_dit.models import lidit  # noqa: E402
from li_dit.parallel import sharding  # noqa: E402
from li_dit.parallel import tpu  # noqa: E402
from li_dit.text import conditioning  # noqa: E402
from li_dit.training import plan as plan_lib  # noqa: E402
from li_dit.training import run_card  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology, e.g. v5e:16x16 or v5p:8x8x16.")
_JSON = flags.DEFINE_string("json", None, "Also write the plan here as JSON.")
_PREFIX = flags.DEFINE_integer("prefix_tokens", 64, "Template prefix tokens per LLM (system "
                               "prompt + instruction; the paper's is ~50 with LLaMA3's template).")
_SUFFIX = flags.DEFINE_integer("suffix_tokens", 8, "Template suffix tokens per LLM.")
_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of --topology joined over DCN "
                               "(multi-slice); the config's dcn_mesh spans them.")
_PROGRAM = flags.DEFINE_enum("program", "train", ["train", "sample"],
                             "train: the train step; sample: li_dit.sample's program (prompt "
                             "encoding, the run's sampler with guidance, VAE decoding).")
_SAMPLE_BATCH = flags.DEFINE_integer("sample_batch", None, "--program sample: prompts per batch "
                                     "(default: one per data-parallel device).", lower_bound=1)
flags.mark_flags_as_required(["config", "topology"])

_GIB = 2 ** 30


def _with_shardings(shapes, shardings):
  return jax.tree_util.tree_map(
      lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def plan(config, topology: str, prefix_tokens: int, suffix_tokens: int,
         num_slices: int = 1, program: str = "train", sample_batch: int | None = None) -> dict:
  """Compiles `program` ("train": the train step; "sample": the sampling loop) of `config` for
  `topology`; returns the plan (see module doc)."""
  config_lib.validate(config)
  if config.text.encode != conditioning.ONLINE:
    raise config_lib.ConfigError(
        "config.text.encode: tools/aot_compile.py plans online encoding (cached features are "
        "for small runs); pass --config.text.encode=online")
  try:
    # v4 and v5p chips have two TensorCores that run as one device (megacore), as on the pods.
    chip_config = "megacore" if topology.split(":")[0] in ("v4", "v5p") else "default"
    devices = topologies.get_topology_desc(topology_name=topology, platform="tpu",
                                           chip_config_name=chip_config,
                                           num_slices=num_slices).devices
  except jax.errors.JaxRuntimeError as e:
    raise ValueError(f"--topology={topology}: {e}") from e
  chip = tpu.chip(devices[0].device_kind)
  mesh = plan_lib.make_mesh(config, devices)
  encoders = run_card.planned_encoders(config, prefix_tokens, suffix_tokens)
  conditioner = conditioning.TextConditioner(encoders, config.text.encode)
  space = image_space.from_config(config, load=False)
  card = run_card.make(config, encoders, space, mesh.shape)
  if program == "train":
    rules, lower, args, flops = _train_program(config, mesh, conditioner, space)
    batch = config.input.batch_size
  else:
    rules, lower, args, flops, batch = _sample_program(config, mesh, conditioner, space,
                                                       sample_batch)
  result = {
      "program": program, "topology": topology, "slices": num_slices, "chips": len(devices),
      "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
      "remat": config.model.remat, "attention": config.model.attention,
      "dtype": config.model.dtype,
      "global_batch": batch, "image_size": config.input.image_size,
      "llms": {n: os.path.basename(os.path.normpath(e.path)) for n, e in encoders.items()},
      "hbm_per_chip_gib": chip.hbm_bytes / _GIB,
      "tflops_per_step": {k: v / 1e12 for k, v in flops.items()},
      "seconds_per_step_at_mfu": {
          f"{m:.0%}": flops["total"] / (m * chip.peak_flops * len(devices))
          for m in (1.0, 0.5)},
      "run_card": card}
  if program == "sample":
    result.update(sampler=config.sample.sampler, sample_steps=config.sample.steps)
  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      compiled = lower(*args).compile()
  except Exception as e:  # pylint: disable=broad-except
    message = str(e)
    if not re.search(r"RESOURCE_EXHAUSTED|[Oo]ut of memory", message):
      raise
    result.update(fits=False, compiler_message=message.strip().splitlines()[0][:500])
    # The compiler states what it needed in one of two forms.
    scale = {"G": 1.0, "M": 1 / 1024, "K": 1 / 2**20}
    for key, pattern in (("peak_gib", r"[Uu]sed ([0-9.]+)([GMK]) of [0-9.]+[GMK] hbm"),
                         ("temporaries_gib", r"temporaries \(([0-9.]+)([GMK])\) exceeds")):
      found = re.search(pattern, message)
      if found:
        result[key] = float(found.group(1)) * scale[found.group(2)]
    return result
  memory = compiled.memory_analysis()
  arguments = memory.argument_size_in_bytes
  outputs = memory.output_size_in_bytes
  temporaries = memory.temp_size_in_bytes
  aliased = memory.alias_size_in_bytes  # donated state: outputs reuse the arguments' buffers
  peak = arguments + outputs - aliased + temporaries + memory.generated_code_size_in_bytes
  result.update(
      arguments_gib=arguments / _GIB, outputs_gib=outputs / _GIB,
      aliased_gib=aliased / _GIB, temporaries_gib=temporaries / _GIB, peak_gib=peak / _GIB,
      # Activations that remat="offload" keeps in host memory instead of HBM.
      host_temporaries_gib=memory.host_temp_size_in_bytes / _GIB,
      fits=peak <= chip.hbm_bytes)
  return result


def _train_program(config, mesh, conditioner, space):
  """(rules, the train step's `lower`, its abstract arguments, model FLOPs by part)."""
  step = plan_lib.plan_step(config, mesh, conditioner, space)
  state = _with_shardings(jax.eval_shape(step.init_state, jax.random.key(0)),
                          step.state_shardings)
  frozen = _with_shardings(plan_lib.frozen_arrays(conditioner, space), step.frozen_shardings)
  local = plan_lib.example_batch(config, conditioner, space)
  batch_specs = {k: jax.ShapeDtypeStruct(v.shape, v.dtype,
                                         sharding=sharding.batch_sharding(mesh, v.ndim, step.rules))
                 for k, v in local.items()}
  flops = run_card.step_flops(config, conditioner.encoders, space)
  return step.rules, step.train_step.lower, (state, frozen, batch_specs), flops


def _sample_program(config, mesh, conditioner, space, batch: int | None):
  """(rules, `lower` of the sampling program of li_dit.generation.generator, its abstract
  arguments, model FLOPs by part, the prompt batch): EMA parameters, LLMs and VAE on the mesh as
  li_dit.sample places them, one batch of prompts (default: one per data-parallel device) at the
  square image size, the run's sampler, steps and classifier-free guidance."""
  rules = plan_lib.check_batch_divides(config, mesh)
  model = lidit.build_model(config, len(conditioner.names))
  generator = generator_lib.Generator(model, conditioner, space, config, mesh, rules)
  batch = batch or generator.batch_multiple
  if batch % generator.batch_multiple:
    raise config_lib.ConfigError(f"--sample_batch={batch} does not divide over the "
                                 f"{generator.batch_multiple} data-parallel devices")
  abstract = run_card.abstract_params(config, conditioner.encoders, space)
  params = _with_shardings(nn.unbox(abstract), sharding.divisible_shardings(
      nn.get_partition_spec(abstract), nn.unbox(abstract), mesh, rules))
  llm_state = _with_shardings(conditioner.llm_state(), sharding.divisible_shardings(
      conditioner.frozen_logical_specs(), conditioner.llm_state(), mesh, rules))
  vae = _with_shardings(space.frozen(), sharding.divisible_shardings(
      space.frozen_logical_specs(), space.frozen(), mesh, rules))
  size = config.input.image_size
  split = lambda shape, dtype: jax.ShapeDtypeStruct(
      shape, dtype, sharding=sharding.batch_sharding(mesh, len(shape), rules))
  tokens = {k: split((batch,) + v.shape[1:], v.dtype)
            for k, v in plan_lib.example_text_batch(conditioner, 1).items()}
  noise = split((batch,) + space.latent_shape(size, size), jnp.float32)
  cfg = jax.ShapeDtypeStruct((), jnp.float32)
  lower = functools.partial(generator.program.lower, steps=config.sample.steps,
                            sampler=config.sample.sampler, shift=flow.time_shift(config))
  calls = config.sample.steps if config.sample.sampler == "euler" else 2 * config.sample.steps - 1
  forward = run_card.forward_flops(config, conditioner.encoders, space)
  flops = {"dit": forward["dit"] * 2 * batch * calls,
           "refiners": forward["refiners"] * 2 * batch * calls,
           "llms": forward["llms"] * 2 * batch}
  flops["total"] = sum(flops.values())
  return rules, lower, (params, llm_state, vae, tokens, tokens, noise, cfg), flops, batch


def _print(result: dict) -> None:
  slices = f" x {result['slices']} slices" if result["slices"] > 1 else ""
  program = (f"sampling ({result['sampler']}, {result['sample_steps']} steps, guidance), "
             f"{result['global_batch']} prompts" if result["program"] == "sample"
             else f"train step, global batch {result['global_batch']}")
  print(f"{result['topology']}{slices} ({result['chips']} x {result['device_kind']}, "
        f"{result['hbm_per_chip_gib']:.0f} GiB HBM each), mesh {result['mesh']}, remat "
        f"{result['remat']}, attention {result['attention']}, {result['dtype']}, {program} at "
        f"{result['image_size']}px, LLMs {', '.join(result['llms'].values()) or 'none'}")
  rows = [("arguments", "arguments_gib"), ("outputs (not aliased)", None),
          ("temporaries", "temporaries_gib"), ("peak", "peak_gib"),
          ("host (offloaded)", "host_temporaries_gib")]
  print(f"{'per chip':<24}{'GiB':>10}")
  for label, key in rows:
    if key is None and "outputs_gib" in result:
      value = result["outputs_gib"] - result["aliased_gib"]
    elif key in result and (key != "host_temporaries_gib" or result[key]):
      value = result[key]
    else:
      continue
    print(f"{label:<24}{value:>10.2f}")
  flops = result["tflops_per_step"]
  what = "batch" if result["program"] == "sample" else "step"
  print(f"model TFLOPs per {what}: {flops['total']:.1f} (DiT {flops['dit']:.1f}, refiners "
        f"{flops['refiners']:.1f}, LLMs {flops['llms']:.1f}); {what} time at 100% / 50% MFU: "
        f"{result['seconds_per_step_at_mfu']['100%']:.2f} s / "
        f"{result['seconds_per_step_at_mfu']['50%']:.2f} s")
  if result["fits"]:
    print(f"fits: peak {result['peak_gib']:.2f} of {result['hbm_per_chip_gib']:.0f} GiB")
  else:
    print(f"OUT OF MEMORY: {result.get('compiler_message', '')}"
          + (f" (peak {result['peak_gib']:.2f} GiB)" if "peak_gib" in result else ""))


def main(argv):
  del argv
  with cli.one_line_failures("aot_compile", config_lib.ConfigError, ValueError):
    result = plan(_CONFIG.value, _TOPOLOGY.value, _PREFIX.value, _SUFFIX.value, _SLICES.value,
                  _PROGRAM.value, _SAMPLE_BATCH.value)
    _print(result)
    if _JSON.value:
      with open(_JSON.value, "w") as f:
        json.dump(result, f, indent=2)
      print(f"wrote {_JSON.value}")
  if not result["fits"]:
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
