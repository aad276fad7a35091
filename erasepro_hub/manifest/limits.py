"""Input limits of a manifest (docs/design.md §4.2, "Input limits").

A manifest is untrusted input: a pulled erasure folder carries one. Every number in it must be
finite, its file size, YAML nesting and lists and strings are capped, and the prompts one erasure
encodes are counted against one budget, the bound on the solver's memory and time. The limits are
far above any real manifest; a limit that is reached is a validation error that names the field.
"""

from __future__ import annotations

import math
from typing import Any

#: the largest manifest file read; a resolved SDXL manifest is a few hundred KiB
MAX_MANIFEST_BYTES = 4 * 2**20
#: the deepest nesting of YAML collections (a manifest needs about 6 levels)
MAX_YAML_DEPTH = 64
#: nesting of the free-form ``metrics`` mapping
MAX_METRICS_DEPTH = 32
#: erasure concepts (``concepts``)
MAX_CONCEPTS = 256
#: templates in each list: ``prompts.templates`` (with the bank templates ``kind`` adds),
#: ``preserve.templates``, ``evaluation.heldout_templates``
MAX_TEMPLATES = 256
#: ``preserve.concepts``, ``evaluation.heldout_prompts``, ``evaluation.preserve_prompts``
MAX_PROMPT_LIST = 2048
#: characters in one concept, anchor, template or prompt
MAX_TEXT = 1000
#: characters in ``description``
MAX_DESCRIPTION = 10_000
#: characters in ``base_model.id`` (a local path may be long) and ``base_model.revision``
MAX_MODEL_ID = 4096
MAX_REVISION = 256
#: prompts one erasure encodes in all (training pairs, misspelled forms, preserve prompts, held-out
#: pairs and prompts, unrelated prompts): the bound on the solver's memory
MAX_PROMPTS = 4096


def misspelling_bound(target: str) -> int:
    """At most how many misspelled forms a target has: one per letter after the first of each 4+-letter word."""
    return sum(sum(c.isalpha() for c in word[1:]) for word in target.split(" ") if sum(c.isalpha() for c in word) >= 4)


def prompt_counts(recipe: Any) -> dict[str, int]:
    """The prompts an erasure of ``recipe`` encodes, by kind (misspelled forms: an upper bound)."""
    templates = recipe.prompts.resolved_count()
    preserve_templates = len(recipe.preserve.templates) if recipe.preserve.templates else templates
    soft = recipe.prompts.misspellings and recipe.method != "uce"
    return {
        "concepts × prompts.templates": len(recipe.concepts) * templates,
        "misspelled forms": sum(misspelling_bound(c.target) for c in recipe.concepts) if soft else 0,
        "preserve.concepts × templates": len(recipe.preserve.concepts) * preserve_templates,
        "concepts × evaluation.heldout_templates": len(recipe.concepts) * len(recipe.evaluation.heldout_templates),
        "evaluation.heldout_prompts": len(recipe.evaluation.heldout_prompts),
        "evaluation.preserve_prompts": len(recipe.evaluation.preserve_prompts),
    }


def check_prompt_budget(recipe: Any) -> None:
    """Raise ``ValueError`` when an erasure of ``recipe`` would encode more than :data:`MAX_PROMPTS` prompts."""
    counts = prompt_counts(recipe)
    total = sum(counts.values())
    if total > MAX_PROMPTS:
        parts = ", ".join(f"{name} {n:,}" for name, n in counts.items() if n)
        raise ValueError(
            f"the erasure would encode {total:,} prompts ({parts}); at most {MAX_PROMPTS:,} are allowed: "
            "use fewer concepts, prompts.templates, preserve.concepts or evaluation prompts"
        )


def check_json_data(value: Any, root: str) -> None:
    """Raise ``ValueError`` unless ``value`` is JSON data: finite numbers, string keys, at most
    :data:`MAX_METRICS_DEPTH` levels deep. The message names the path below ``root``."""
    stack: list[tuple[str, Any, int]] = [(root, value, 0)]
    while stack:
        path, node, depth = stack.pop()
        if depth > MAX_METRICS_DEPTH:
            raise ValueError(f"{path} is nested more than {MAX_METRICS_DEPTH} levels deep")
        if isinstance(node, float) and not math.isfinite(node):
            raise ValueError(f"{path} must be a finite number, got {node}")
        if not isinstance(node, (type(None), bool, int, float, str, list, tuple, dict)):
            raise ValueError(f"{path} must be JSON data (numbers, strings, lists, mappings), got {type(node).__name__}")
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise ValueError(f"{path} has a key {key!r} that is not a string")
            stack.extend((f"{path}.{key}", item, depth + 1) for key, item in node.items())
        elif isinstance(node, (list, tuple)):
            stack.extend((f"{path}.{index}", item, depth + 1) for index, item in enumerate(node))
