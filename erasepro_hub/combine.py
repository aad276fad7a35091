"""One erasure for several concepts: manifests combined into one recipe and solved jointly.

Two erasure adapters active together are not an exact erasure: each was solved on the original
model, so the second sees features the first already moved, and a fractional adapter weight scales
``ΔW`` — it leaves part of the residual in place (``docs/design.md`` §2.6 has the measured table).
:func:`combine` instead builds one recipe from several — the union of their concepts, their prompt
templates (bank templates written out), preserve concepts and evaluation prompts — and solves it
jointly, so every concept's constraints hold at once (within capacity; the per-site capacity is
reported like any erasure's). The combined manifest records its sources (name, where it was read
from, recipe hash) in ``sources``.

Every concept is solved in every source's templates (the union, bank templates included), so the
joint erasure constrains each concept on at least the prompts its own recipe did. A concept one source
erases and another keeps in place is erased (with a warning) and left out of the preserve lists.

Settings that decide how the solve runs must agree across the sources (base model, method, solver,
text encoder, UCE and adapter settings, preservation mode and weights, misspelling settings); a
difference is refused naming the field and the source.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from pydantic import ValidationError

from .errors import ManifestError, warn
from .manifest import Recipe, load_manifest, recipe_sha256, to_data
from .recipe import prompt_templates

#: Sections (or fields) that must be equal in every source; every other field of ``prompts`` and
#: ``preserve`` is merged in :func:`combined_recipe` (the tests hold the two lists to the schema).
SHARED = (
    "base_model",
    "method",
    "solver",
    "text_encoder",
    "uce",
    "adapter",
    "preserve.mode",
    "preserve.weight",
    "preserve.captions",
    "preserve.caption_weight",
    "preserve.positions",
    "prompts.misspellings",
    "prompts.misspelling_weight",
)


def _get(data: dict, dotted: str):
    for part in dotted.split("."):
        data = data[part]
    return data


def _union(lists) -> list:
    return list(dict.fromkeys(item for items in lists for item in items))


def combined_recipe(sources: Sequence[str | Path], *, name: str | None = None) -> Recipe:
    """The joint recipe of ``sources`` (manifests or erasure folders), in the order given."""
    if len(sources) < 2:
        raise ManifestError("combine: give at least two manifests or erasure folders")
    recipes = [load_manifest(source).recipe() for source in sources]  # a manifest file or an erasure folder
    datas = [to_data(recipe) for recipe in recipes]
    first = datas[0]
    for source, data in zip(sources[1:], datas[1:]):
        for field in SHARED:
            if _get(data, field) != _get(first, field):
                raise ManifestError(
                    f"{field}: {source} differs from {sources[0]}; combined erasures are solved in one run, so "
                    f"{field} must be the same in every source"
                )
    targets = [c.target for recipe in recipes for c in recipe.concepts]
    repeated = sorted({t for t in targets if targets.count(t) > 1})
    if repeated:
        raise ManifestError(f"concepts: {repeated[0]!r} is erased by more than one source; keep it in one")
    erased = {t.casefold() for t in targets}
    kept = [(src, text) for src, d in zip(sources, datas) for text in d["preserve"]["concepts"] + d["evaluation"]["preserve_prompts"]]
    dropped = sorted({text for _, text in kept if text.casefold() in erased})
    if dropped:
        warn(
            f"combine: {', '.join(map(repr, dropped))} is kept in place by one source and erased by another; "
            "it is erased, and left out of the combined preserve concepts and prompts"
        )
    data = dict(first)
    stems = (re.sub(r"[^A-Za-z0-9._-]+", "_", recipe.name or Path(str(src)).stem) for recipe, src in zip(recipes, sources))
    data["name"] = name or "_".join(stems).strip("._-")[:96]
    data["description"] = "Combined erasure of " + ", ".join(recipe.name or str(src) for recipe, src in zip(recipes, sources))
    data["concepts"] = [to_data(c) for recipe in recipes for c in recipe.concepts]
    data["prompts"] = {
        **first["prompts"],
        "templates": _union(prompt_templates(recipe) for recipe in recipes),
        "kind": None,  # the bank templates are written out above
    }
    data["preserve"] = {
        **first["preserve"],
        "concepts": [c for c in _union(d["preserve"]["concepts"] for d in datas) if c.casefold() not in erased],
        "templates": None if all(d["preserve"]["templates"] is None for d in datas)
        else _union(d["preserve"]["templates"] or prompt_templates(r) for d, r in zip(datas, recipes)),
    }
    data["evaluation"] = {
        "heldout_templates": _union(d["evaluation"]["heldout_templates"] for d in datas),
        "heldout_prompts": [p for d in datas for p in d["evaluation"]["heldout_prompts"]],
        "preserve_prompts": [
            p for p in _union(d["evaluation"]["preserve_prompts"] for d in datas) if p.casefold() not in erased
        ],
    }
    data["sources"] = [
        {"name": recipe.name, "ref": str(src), "recipe_sha256": recipe_sha256(recipe)}
        for recipe, src in zip(recipes, sources)
    ]
    try:
        return Recipe.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(f"combine: the joint recipe is not valid: {exc.errors()[0]['loc']} {exc.errors()[0]['msg']}") from None


def combine(
    sources: Sequence[str | Path],
    out: str | Path,
    *,
    name: str | None = None,
    overwrite: bool = False,
    device: str = "cpu",
    progress=None,
    command: list[str] | None = None,
) -> Path:
    """Solve the joint recipe of ``sources`` and write its erasure folder; returns the folder."""
    from .erase import erase

    recipe = combined_recipe(sources, name=name)
    return erase(recipe, out, overwrite=overwrite, device=device, progress=progress, command=command)
