"""What a solve produces and the writers read: the loaded base model and a computed erasure."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, Union, runtime_checkable

from .manifest import BaseModelRef, Recipe
from .solver import LowRankDelta

#: The steps a computation announces to a :class:`Progress` before they begin.
LOADING_STEP = "loading base weights"
SOLVING_STEP = "solving"


@runtime_checkable
class Progress(Protocol):
    """A progress report that also hears when each step begins (a progress bar, say).

    A plain ``Callable[[str], None]`` is enough to hear each stage finish; an object that also has
    ``start`` hears ``start(LOADING_STEP)`` before the base model is loaded (which can take longer than
    the solve) and ``start(SOLVING_STEP, n)`` before the first of the ``n`` stages is solved.
    """

    def __call__(self, stage: str) -> None:
        """A stage was solved."""

    def start(self, step: str, total: int | None = None) -> None:
        """``step`` begins; ``total``: how many stages it will report (``None``: it reports none)."""


ProgressCallback = Union[Callable[[str], None], Progress]


@dataclass
class LoadedBase:
    model: object  # EditModel
    ref: BaseModelRef  # with the revision resolved to a commit for Hub ids
    license: str | None = None  # the base model's licence, from its model card


@dataclass
class Computation:
    """A recipe solved: the resolved recipe, the model, the solution and the deltas as they are stored.

    The solution's deltas are the stored ones (the zero update where nothing is stored), not the solver's
    float64 updates; ``update_ranks`` is each site's ``outputs.sites[*].update_rank``."""

    recipe: Recipe
    base: LoadedBase
    solution: object  # ErasureSolution
    stored: dict[str, LowRankDelta]
    update_ranks: dict[str, int]

    @property
    def model(self):
        return self.base.model
