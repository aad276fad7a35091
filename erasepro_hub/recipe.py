"""From a recipe to what the solver and the metrics read: prompts, pairs and the solver's plan.

The recipe (the pydantic manifest without its outputs) is the one source of settings; this module
spells out the prompt templates (a kind's bank included), the training, soft, held-out and preserve
prompts, and builds the :class:`~erasepro_hub.models.progressive.ErasurePlan` from it.
"""

from __future__ import annotations

from .manifest import BaseModelRef, Recipe, to_data
from .models import prompts


def prompt_templates(recipe: Recipe) -> list[str]:
    """The manifest's own templates, then the first ``bank_size`` of its kind's bank that it lacks."""
    own = list(recipe.prompts.templates)
    if recipe.prompts.kind is None:
        return own
    from .banks import bank

    return own + [t for t in bank(recipe.prompts.kind)[: recipe.prompts.bank_size] if t not in own]


def training_pairs(recipe: Recipe):
    """The exact pairs: every concept in every template (its own and its kind's bank)."""
    return prompts.make_pairs([(c.target, c.anchor) for c in recipe.concepts], prompt_templates(recipe))


def misspelled_pairs(recipe: Recipe):
    """Soft pairs: each target's one-letter deletions, alone, with the bare anchor (ErasePro methods only)."""
    if not recipe.prompts.misspellings or recipe.method == "uce":
        return []
    taken = {text.casefold() for c in recipe.concepts for text in (c.target, c.anchor)}
    return [
        prompts.PromptPair(variant, c.anchor, "", index)
        for index, c in enumerate(recipe.concepts)
        for variant in prompts.misspellings(c.target)
        if variant.casefold() not in taken
    ]


def preserve_prompts(recipe: Recipe):
    """The manifest's preserve concepts in their templates (none when ``preserve.mode`` is ``none``)."""
    if recipe.preserve.mode == "none":
        return []
    templates = recipe.preserve.templates or prompt_templates(recipe)
    return prompts.make_prompts(recipe.preserve.concepts, templates)


def preserve_captions(recipe: Recipe):
    """The caption set kept in place by soft preservation (ErasePro methods only; UCE keeps its published form)."""
    if recipe.preserve.captions == "none" or recipe.method == "uce":
        return []
    from .banks import captions

    return [prompts.Prompt(text) for text in captions(recipe.preserve.captions)]


def heldout_pairs(recipe: Recipe):
    """Held-out pairs: the evaluation templates filled, then the pairs written out in full."""
    pairs = prompts.make_pairs([(c.target, c.anchor) for c in recipe.concepts], recipe.evaluation.heldout_templates)
    pairs += [prompts.PromptPair(h.target, h.anchor) for h in recipe.evaluation.heldout_prompts]
    return pairs


def drift_prompts(recipe: Recipe):
    """Prompts that should not move: the preserve concepts in their templates, then the unrelated prompts."""
    templates = recipe.preserve.templates or prompt_templates(recipe)
    kept = prompts.make_prompts(recipe.preserve.concepts, templates)
    return kept + [prompts.Prompt(text) for text in recipe.evaluation.preserve_prompts]


def plan_from_recipe(recipe: Recipe):
    """The solver's plan: the prompts above, with the recipe itself passed through for every setting."""
    from .models.progressive import ErasurePlan

    return ErasurePlan(
        recipe=recipe,
        pairs=tuple(training_pairs(recipe)),
        soft_pairs=tuple(misspelled_pairs(recipe)),
        preserve=tuple(preserve_prompts(recipe)),
        captions=tuple(preserve_captions(recipe)),
    )


def resolve_recipe(recipe: Recipe, ref: BaseModelRef) -> Recipe:
    """The recipe as it is recorded: the base pinned to ``ref`` and every template it uses spelled out."""
    data = to_data(recipe)
    data["base_model"] = to_data(ref)
    data["prompts"]["templates"] = prompt_templates(recipe)
    return Recipe.model_validate(data)
