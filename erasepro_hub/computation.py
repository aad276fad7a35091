"""What a solve produces and the writers read: the loaded base model and a computed erasure."""

from __future__ import annotations

from dataclasses import dataclass

from .manifest import BaseModelRef, Recipe
from .solver import LowRankDelta


@dataclass
class LoadedBase:
    model: object  # EditModel
    ref: BaseModelRef  # with the revision resolved to a commit for Hub ids
    license: str | None = None  # the base model's licence, from its model card


@dataclass
class Computation:
    """A recipe solved: the resolved recipe, the model, the solution and the deltas as they are stored."""

    recipe: Recipe
    base: LoadedBase
    solution: object  # ErasureSolution
    stored: dict[str, LowRankDelta]

    @property
    def model(self):
        return self.base.model
