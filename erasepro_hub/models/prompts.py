"""Prompt sets built from templates, and the token positions each policy constrains (DESIGN §2.5).

Target and anchor prompts come from the same template, so their tokens agree up
to the concept start ``k`` (the token length of the template text before ``{}``).
CLIP is causal: positions before ``k`` do not see the concept; from ``k`` on, every
position carries it. Policies (by name, recorded in the manifest):

* ``concept-suffix`` (default): positions ``k .. L−1`` of the padded sequence,
  target ``k + j`` paired with anchor ``k + j`` (same ``k``, same padded length ``L``);
* ``eos``: the first end-of-text token of each (positions may differ);
* ``last-token``: the token just before it (UCE's newer script);
* ``all``: every position ``0 .. L−1``, paired by index (bidirectional encoders).

A prompt without a known template prefix (an explicit held-out pair) uses the
first position where the target and anchor token ids differ as ``k``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import PromptError

POLICIES = ("concept-suffix", "last-token", "eos", "all")


@dataclass(frozen=True)
class Prompt:
    """A prompt and the text in front of its concept (``None`` when unknown)."""

    text: str
    prefix: str | None = None


@dataclass(frozen=True)
class PromptPair:
    """A target prompt and its anchor counterpart, built from the same template."""

    target: str
    anchor: str
    prefix: str | None = None
    concept: int = 0


def fill(template: str, concept: str) -> Prompt:
    """``template`` with ``{}`` replaced by ``concept`` (no ``str.format``: braces in concepts are data)."""
    head, _, tail = template.partition("{}")
    return Prompt(head + concept + tail, head)


def make_pairs(concepts: Sequence[tuple[str, str]], templates: Sequence[str]) -> list[PromptPair]:
    """Every (target, anchor) concept in every template, concept-major."""
    pairs = []
    for index, (target, anchor) in enumerate(concepts):
        for template in templates:
            t, a = fill(template, target), fill(template, anchor)
            pairs.append(PromptPair(t.text, a.text, t.prefix, index))
    return pairs


def make_prompts(concepts: Sequence[str], templates: Sequence[str]) -> list[Prompt]:
    return [fill(template, concept) for concept in concepts for template in templates]


# ----------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Encoded:
    """Token ids padded to the tokenizer's length, with per-prompt concept start and EOS index."""

    ids: torch.Tensor
    starts: tuple[int | None, ...]
    eos: tuple[int, ...]

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def encode(tokenizer, prompts: Sequence[Prompt]) -> Encoded:
    """Tokenise like the diffusers pipelines do: pad to ``model_max_length``, truncate."""
    length = int(tokenizer.model_max_length)
    texts = [p.text for p in prompts]
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    # the end-of-text token: CLIP's <|endoftext|>, BERT's [SEP]
    eos_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    eos = []
    for row, text in zip(ids, texts):
        hits = (row == eos_id).nonzero()
        if hits.numel() == 0:  # pragma: no cover - CLIP tokenizers always end with EOS
            raise PromptError(f"prompt {text!r} has no end-of-text token after tokenisation")
        eos.append(int(hits[0]))
    starts: list[int | None] = []
    for prompt, e in zip(prompts, eos):
        if prompt.prefix is None:
            starts.append(None)
            continue
        k = len(tokenizer(prompt.prefix, truncation=True, max_length=length).input_ids) - 1
        if k >= e and prompt.text.strip() != prompt.prefix.strip():
            raise PromptError(
                f"prompt {prompt.text!r} is longer than the tokenizer's {length} tokens and its concept was cut "
                "off; shorten the template"
            )
        starts.append(min(k, e))
    return Encoded(ids, tuple(starts), tuple(eos))


@dataclass(frozen=True)
class PairPositions:
    """Constrained token positions: target ``(t_rows[i], t_pos[i])`` ↔ anchor ``(a_rows[i], a_pos[i])``."""

    t_rows: torch.Tensor
    t_pos: torch.Tensor
    a_rows: torch.Tensor
    a_pos: torch.Tensor

    def __len__(self) -> int:
        return int(self.t_rows.numel())

    def equals(self, other: "PairPositions") -> bool:
        return all(
            torch.equal(getattr(self, name), getattr(other, name)) for name in ("t_rows", "t_pos", "a_rows", "a_pos")
        )


def _concept_start(target: Encoded, anchor: Encoded, i: int, j: int, pair: PromptPair) -> int:
    k = target.starts[i]
    if k is not None:
        if anchor.starts[j] != k or not torch.equal(target.ids[i, :k], anchor.ids[j, :k]):
            raise PromptError(
                f"target {pair.target!r} and anchor {pair.anchor!r} tokenise differently before the concept; "
                "put a space between the concept and the template text"
            )
        return k
    differ = (target.ids[i] != anchor.ids[j]).nonzero()
    if differ.numel() == 0:
        raise PromptError(f"held-out pair {pair.target!r} → {pair.anchor!r}: target and anchor are the same tokens")
    return int(differ[0])


def pair_positions(policy: str, pairs: Sequence[PromptPair], target: Encoded, anchor: Encoded, anchor_rows: Sequence[int]) -> PairPositions:
    """The constrained positions of every pair under ``policy``."""
    if policy not in POLICIES:
        raise PromptError(f"unknown token policy {policy!r}; choose one of {', '.join(POLICIES)}")
    t_rows, t_pos, a_rows, a_pos = [], [], [], []
    length = target.length
    for i, (pair, j) in enumerate(zip(pairs, anchor_rows)):
        if policy == "concept-suffix":
            k = _concept_start(target, anchor, i, j, pair)
            tp = ap = list(range(k, length))
        elif policy == "all":
            tp = ap = list(range(length))
        elif policy == "eos":
            tp, ap = [target.eos[i]], [anchor.eos[j]]
        else:  # last-token
            tp, ap = [max(target.eos[i] - 1, 0)], [max(anchor.eos[j] - 1, 0)]
        t_rows += [i] * len(tp)
        a_rows += [j] * len(ap)
        t_pos += tp
        a_pos += ap
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PairPositions(as_long(t_rows), as_long(t_pos), as_long(a_rows), as_long(a_pos))


def single_positions(policy: str, encoded: Encoded) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of unpaired prompts (preserve sets); prompts without a prefix use every position."""
    rows, pos = [], []
    for i, (k, e) in enumerate(zip(encoded.starts, encoded.eos)):
        if policy == "all" or k is None:
            p = list(range(encoded.length))
        elif policy == "concept-suffix":
            p = list(range(k, encoded.length))
        elif policy == "eos":
            p = [e]
        else:
            p = [max(e - 1, 0)]
        rows += [i] * len(p)
        pos += p
    return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)


def eos_pair_positions(target: Encoded, anchor: Encoded, anchor_rows: Sequence[int]) -> PairPositions:
    """First end-of-text token of each target ↔ of its anchor (where CLIP's pooled output is read)."""
    n = len(anchor_rows)
    return PairPositions(
        torch.arange(n),
        torch.tensor(target.eos[:n], dtype=torch.long),
        torch.tensor(list(anchor_rows), dtype=torch.long),
        torch.tensor([anchor.eos[j] for j in anchor_rows], dtype=torch.long),
    )
