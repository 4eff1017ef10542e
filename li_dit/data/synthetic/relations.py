"""The relation words of the synthetic shapes captions (li_dit.data.synthetic.shapes).

A module of their own, without the dataset, so the config schema (li_dit.config_lib) checks
config.input.relations without importing the renderer.
"""
from __future__ import annotations

# Relation keyword -> its phrase in a caption. "A <phrase> B" puts A on the named side of B.
RELATIONS: dict[str, str] = {
    "left": "to the left of",
    "right": "to the right of",
    "above": "above",
    "below": "below",
}
READING_ORDER: tuple[str, ...] = ("left", "above")  # the first-named object is the left/top one
