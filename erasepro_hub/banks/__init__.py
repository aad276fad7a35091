"""Prompt data shipped with the package, written for this project.

* ``<kind>.txt`` — a bank of prompt templates (one per line, ``{}`` where the concept goes) for each
  kind of concept a manifest may name in ``prompts.kind``; the most generic come first, and a
  manifest takes the first ``prompts.bank_size`` of them.
* ``captions.txt`` — the default preserve set ``default-v1``: short, varied captions (objects,
  animals, scenes, people, art styles, food, vehicles) whose conditioning an erasure keeps in place
  by soft preservation. Lines starting with ``#`` name the groups.

Changing a file changes what manifests that name it compute: add a new set or bank version instead.
"""

from __future__ import annotations

from functools import lru_cache
from importlib import resources

KINDS = ("style", "object", "person", "nudity", "other")
CAPTION_SETS = {"default-v1": "captions.txt"}


def _lines(name: str) -> tuple[str, ...]:
    text = resources.files(__name__).joinpath(name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


@lru_cache(maxsize=None)
def bank(kind: str) -> tuple[str, ...]:
    """The template bank of a kind of concept, most generic first."""
    if kind not in KINDS:
        raise ValueError(f"unknown prompt kind {kind!r}; choose one of {', '.join(KINDS)}")
    return _lines(f"{kind}.txt")


@lru_cache(maxsize=None)
def captions(name: str) -> tuple[str, ...]:
    """A caption set shipped with the package, by name (``default-v1``)."""
    if name not in CAPTION_SETS:
        raise ValueError(f"unknown caption set {name!r}; choose one of {', '.join(CAPTION_SETS)}")
    return _lines(CAPTION_SETS[name])
