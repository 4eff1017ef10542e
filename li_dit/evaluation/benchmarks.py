"""The benchmarks `li_dit.evaluate` runs on a trained run, by name (`BENCHMARKS`).

A benchmark gives the prompts of a run (from its config) and scores the images sampled for them;
`evaluate` samples and scores.

  shapes  images for every held-out prompt of the synthetic shapes data (prompts never used in
          training), scored by li_dit.evaluation.shapes_score for colour, count, shape and
          position accuracy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import ml_collections
import numpy as np

from li_dit.data.synthetic import shapes
from li_dit.evaluation import shapes_score
from li_dit.generation import generator as generator_lib


@dataclasses.dataclass(frozen=True)
class Benchmark:
  """prompts: a run's config -> the prompts to sample; score: (uint8 images [N,H,W,3], the
  prompt of each) -> the report's figures (JSON-able)."""
  prompts: Callable[[ml_collections.ConfigDict], list[str]]
  score: Callable[[np.ndarray, list[str]], dict[str, Any]]


def _shapes_prompts(config: ml_collections.ConfigDict) -> list[str]:
  """The held-out captions of the run's shapes data (its data_seed and relation words)."""
  return shapes.heldout_captions(config.input.data_seed, config.input.relations)


BENCHMARKS: dict[str, Benchmark] = {
    "shapes": Benchmark(prompts=_shapes_prompts, score=shapes_score.score_images),
}


def evaluate(benchmark: Benchmark, generator: generator_lib.Generator, params: Any,
             prompts: list[str], samples_per_prompt: int, seed: int, steps: int, cfg: float,
             sampler: str, batch_size: int) -> tuple[dict, np.ndarray]:
  """Samples `samples_per_prompt` images per prompt and scores them. Returns (report, images)."""
  captions = [p for p in prompts for _ in range(samples_per_prompt)]
  images = []
  for start in range(0, len(captions), batch_size):
    part = captions[start:start + batch_size]
    padded = part + [part[-1]] * (batch_size - len(part))  # One compiled batch shape.
    images.append(generator(params, padded, seed=seed + start, steps=steps, cfg_scale=cfg,
                            sampler=sampler)[:len(part)])
  images = np.concatenate(images)
  return benchmark.score(images, captions), images
