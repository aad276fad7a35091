"""Prompt sets built from templates, and which token of a target prompt pairs with which of its anchor (docs/design.md §2.5).

Target and anchor usually tokenise to different lengths ("Vincent van Gogh" is three
tokens, "art" one, "" none), so positions are paired **by structure**, in one place —
:func:`align` — for the solver, the pooled stage and every metric:

* the shared prefix (the template text before the concept, BOS included): position ``i ↔ i``;
* the concept spans right-aligned: the target's last concept token with the anchor's last,
  and so on backwards;
* everything after the concept — the template's remaining words, the end-of-text token (EOS),
  the padding — from the concept end: target ``e_t + j ↔`` anchor ``e_a + j``, cut where either
  side reaches the window end;
* the target's *surplus* leading concept tokens (when its concept is longer than the anchor's)
  pair with the anchor's EOS — chosen by measurement (docs/defaults.md): the end-of-text token
  is the one every prompt has, it summarises the prompt in a causal encoder, and the padding of
  a causal encoder repeats it. An empty anchor (``""``) is the case where every concept token
  is surplus.

A template fixes the prefix; an explicit pair (a held-out prompt written out in full) finds it
as the longest common prefix of the two token sequences, and the concept end as the longest
common suffix. Both give the same offset ``len(target) − len(anchor)`` for everything after the
concept.

Token policies (by name, recorded in the manifest) choose which of those pairs are constrained:

* ``concept-eos`` (default): the concept, the words after it and EOS — and the prefix, where the
  encoder is bidirectional (in a causal encoder the prefix cannot see the concept). Padding is
  paired but not constrained (measured: constraining it costs unrelated prompts their
  conditioning, docs/defaults.md);
* ``concept-suffix``: ``concept-eos`` and the padding up to the window end;
* ``all``: every pair, the prefix included whatever the encoder;
* ``eos``: the end-of-text token only; ``last-token``: the token before it (UCE's newer script).

Why one module of this length: templates, tokenisation and the position pairing are one
contract (the solver, the pooled stage and every metric must pair the same tokens); splitting it
would put the two halves of :func:`align`'s rule in different files.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import PromptError

POLICIES = ("concept-eos", "concept-suffix", "all", "eos", "last-token")

#: The parts of an alignment (see :class:`Alignment`).
PREFIX, CONCEPT, SURPLUS, SUFFIX, EOS, PADDING = "prefix", "concept", "surplus", "suffix", "eos", "padding"
#: What a surplus target concept token pairs with: the anchor's end-of-text token (default, by
#: measurement), the anchor's first concept token, the token before the concept, the anchor positions
#: that fall off the window end (the target then holds the anchor's tokens, permuted), or nothing.
SURPLUS_RULES = ("anchor-eos", "anchor-first", "before-concept", "window-end", "none")
DEFAULT_SURPLUS = "anchor-eos"
_POLICY_PARTS = {
    "concept-eos": (CONCEPT, SURPLUS, SUFFIX, EOS),
    "concept-suffix": (CONCEPT, SURPLUS, SUFFIX, EOS, PADDING),
    "all": (PREFIX, CONCEPT, SURPLUS, SUFFIX, EOS, PADDING),
    "eos": (EOS,),
}


@dataclass(frozen=True)
class Prompt:
    """A prompt and the text in front of its concept (``None`` when unknown)."""

    text: str
    prefix: str | None = None


@dataclass(frozen=True)
class PromptPair:
    """A target prompt and its anchor counterpart (from one template, or written out in full)."""

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


def misspellings(concept: str, *, min_letters: int = 4) -> list[str]:
    """Every one-letter deletion of each word of ``concept`` with at least ``min_letters`` letters.

    The first letter of a word is kept (a misspelling rarely drops it); variants are deduplicated, in order.
    ``"Van Gogh"`` → ``["Van Ggh", "Van Goh", "Van Gog"]``.
    """
    words = concept.split(" ")
    found: list[str] = []
    for index, word in enumerate(words):
        if sum(c.isalpha() for c in word) < min_letters:
            continue
        for i in range(1, len(word)):
            if word[i].isalpha():
                variant = " ".join(words[:index] + [word[:i] + word[i + 1 :]] + words[index + 1 :])
                if variant != concept:
                    found.append(variant)
    return list(dict.fromkeys(found))


def make_prompts(concepts: Sequence[str], templates: Sequence[str]) -> list[Prompt]:
    return [fill(template, concept) for concept in concepts for template in templates]


# ----------------------------------------------------------------------------- tokens
@dataclass(frozen=True)
class Encoded:
    """Prompts tokenised as the pipelines do (padded and truncated to the window), with their structure.

    ``tokens``: each prompt's untruncated token ids, BOS to EOS; ``eos``: where its first end-of-text
    token sits in ``ids``; ``starts``: the prefix length (BOS + template text before the concept),
    ``None`` for a prompt without a known template.
    """

    ids: torch.Tensor
    tokens: tuple[tuple[int, ...], ...]
    eos: tuple[int, ...]
    starts: tuple[int | None, ...]

    @property
    def length(self) -> int:
        return self.ids.shape[1]


def _eos_id(tokenizer) -> int:
    # the end-of-text token: CLIP's <|endoftext|>, BERT's [SEP]
    return tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id


def encode(tokenizer, prompts: Sequence[Prompt], *, length: int | None = None) -> Encoded:
    """Tokenise like the diffusers pipelines do: pad to ``length`` (default: ``model_max_length``), truncate.

    The prompts are tokenised once, untruncated; only those longer than the window are tokenised again with the
    tokenizer's own truncation, and the padding (``pad_token_id``, on the tokenizer's ``padding_side``) is added
    here: the tokenizer's padded call costs several times more, and a few hundred captions are encoded per solve.
    """
    length = int(length or tokenizer.model_max_length)
    texts = [p.text for p in prompts]
    full = tokenizer(texts, truncation=False).input_ids if texts else []
    ids = _padded(tokenizer, texts, full, length)
    eos_id = _eos_id(tokenizer)
    hits = ids == eos_id
    missing = (~hits.any(dim=1)).nonzero()
    if missing.numel():  # pragma: no cover - CLIP, BERT and T5 tokenizers always end with EOS
        raise PromptError(f"prompt {texts[int(missing[0])]!r} has no end-of-text token after tokenisation")
    eos = tuple(hits.to(torch.int8).argmax(dim=1).tolist())  # the first end-of-text token of each row
    prefixes = list(dict.fromkeys(p.prefix for p in prompts if p.prefix is not None))
    prefix_len = dict(zip(prefixes, (len(t) - 1 for t in tokenizer(prefixes, truncation=False).input_ids))) if prefixes else {}
    starts: list[int | None] = []
    for prompt, tokens in zip(prompts, full):
        if prompt.prefix is None:
            starts.append(None)
            continue
        k = prefix_len[prompt.prefix]
        if k >= length - 1 and prompt.text.strip() != prompt.prefix.strip():
            raise PromptError(
                f"prompt {prompt.text!r} is longer than the tokenizer's {length} tokens and its concept was cut "
                "off; shorten the template"
            )
        starts.append(min(k, len(tokens) - 1))
    return Encoded(ids, tuple(tuple(t) for t in full), eos, tuple(starts))


def _padded(tokenizer, texts: list[str], full: list[list[int]], length: int) -> torch.Tensor:
    """``(len(texts), length)`` ids as ``tokenizer(texts, padding="max_length", max_length=length, truncation=True)``
    gives them, from the untruncated ids ``full``."""
    pad = tokenizer.pad_token_id
    if pad is None:  # the tokenizer's own call names the problem
        return tokenizer(texts, padding="max_length", max_length=length, truncation=True, return_tensors="pt").input_ids
    rows = list(full)
    long = [i for i, tokens in enumerate(rows) if len(tokens) > length]
    if long:
        cut = tokenizer([texts[i] for i in long], max_length=length, truncation=True).input_ids
        for i, tokens in zip(long, cut):
            rows[i] = tokens
    left = getattr(tokenizer, "padding_side", "right") == "left"
    rows = [[pad] * (length - len(r)) + r if left else r + [pad] * (length - len(r)) for r in rows]
    return torch.tensor(rows, dtype=torch.long).reshape(len(rows), length)


# ----------------------------------------------------------------------------- the alignment
@dataclass(frozen=True)
class Alignment:
    """How one target token sequence pairs with its anchor, by structure.

    Positions are in the untruncated sequences (BOS at 0, EOS at ``len − 1``); :meth:`pairs` cuts
    them at the ``window``. The target's concept is ``[prefix, target_end)``, the anchor's
    ``[prefix, anchor_end)``; everything from ``target_end`` on pairs with ``anchor_end`` on, i.e.
    target position ``q`` with anchor position ``q − offset``.
    """

    prefix: int
    target_end: int
    anchor_end: int
    target_len: int
    anchor_len: int
    window: int

    @property
    def offset(self) -> int:
        """``len(target) − len(anchor)``: the shift of everything after the concept."""
        return self.target_len - self.anchor_len

    @property
    def anchor_eos(self) -> int:
        return min(self.anchor_len, self.window) - 1

    def surplus_partner(self, q: int, rule: str = DEFAULT_SURPLUS) -> int | None:
        """The anchor position a surplus target concept token ``q`` pairs with under ``rule`` (see :data:`SURPLUS_RULES`)."""
        if rule == "anchor-eos":
            return self.anchor_eos
        if rule == "anchor-first":
            return self.prefix
        if rule == "before-concept":
            return self.prefix - 1
        if rule == "window-end":
            return self.window - self.offset + (q - self.prefix)
        return None

    def pairs(self, parts: Sequence[str], surplus: str = DEFAULT_SURPLUS) -> list[tuple[int, int]]:
        """``(target position, anchor position)`` of the chosen parts, inside the window, in target order."""
        d, w = self.offset, self.window
        found: list[tuple[int, int]] = []
        if PREFIX in parts:
            found += [(i, i) for i in range(self.prefix)]
        if SURPLUS in parts:
            for q in range(self.prefix, self.prefix + max(d, 0)):
                partner = self.surplus_partner(q, surplus)
                if partner is not None:
                    found.append((q, partner))
        for q in range(self.prefix + max(d, 0), w):
            if q < self.target_end:
                part = CONCEPT
            elif q < self.target_len - 1:
                part = SUFFIX
            elif q == self.target_len - 1:
                part = EOS
            else:
                part = PADDING
            if part in parts:
                found.append((q, q - d))
        return sorted((t, a) for t, a in found if t < w and a < w)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def align(target: Sequence[int], anchor: Sequence[int], *, window: int, prefix: int | None = None) -> Alignment:
    """Pair a target token sequence with its anchor (both untruncated, BOS to EOS).

    ``prefix`` is the number of shared tokens before the concept (BOS included) when a template
    says so; otherwise the longest common prefix. The concept ends where the longest common suffix
    begins (at most up to the prefix), so both spans lie between the shared prefix and suffix.
    """
    if prefix is None:
        prefix = _common_prefix(target, anchor)
    prefix = min(prefix, len(target) - 1, len(anchor) - 1)  # EOS is never part of the prefix
    suffix = min(_common_prefix(target[::-1], anchor[::-1]), len(target) - prefix, len(anchor) - prefix)
    return Alignment(prefix, len(target) - suffix, len(anchor) - suffix, len(target), len(anchor), window)


def _known(policy: str) -> str:
    if policy not in POLICIES:
        raise PromptError(f"unknown token policy {policy!r}; choose one of {', '.join(POLICIES)}")
    return policy


def policy_parts(policy: str, *, causal: bool) -> tuple[str, ...]:
    """The alignment parts a token policy constrains (the prefix only where the encoder is bidirectional)."""
    _known(policy)
    parts = _POLICY_PARTS.get(policy, ())
    if policy in ("concept-eos", "concept-suffix") and not causal:
        parts = (PREFIX, *parts)
    return parts


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


def _pair_alignment(target: Encoded, anchor: Encoded, i: int, j: int, pair: PromptPair) -> Alignment:
    t, a = target.tokens[i], anchor.tokens[j]
    k = target.starts[i]
    if k is not None:
        if anchor.starts[j] != k or t[:k] != a[:k]:
            raise PromptError(
                f"target {pair.target!r} and anchor {pair.anchor!r} tokenise differently before the concept; "
                "put a space between the concept and the template text"
            )
    elif t == a:
        raise PromptError(f"held-out pair {pair.target!r} → {pair.anchor!r}: target and anchor are the same tokens")
    return align(t, a, window=target.length, prefix=k)


def pair_positions(
    policy: str,
    pairs: Sequence[PromptPair],
    target: Encoded,
    anchor: Encoded,
    anchor_rows: Sequence[int],
    *,
    causal: bool = True,
    surplus: str = DEFAULT_SURPLUS,
) -> PairPositions:
    """The constrained positions of every pair under ``policy`` — the one place positions are decided."""
    parts = policy_parts(policy, causal=causal)
    if surplus not in SURPLUS_RULES:
        raise PromptError(f"unknown surplus rule {surplus!r}; choose one of {', '.join(SURPLUS_RULES)}")
    t_rows, t_pos, a_rows, a_pos = [], [], [], []
    for i, (pair, j) in enumerate(zip(pairs, anchor_rows)):
        if policy == "last-token":
            found = [(max(target.eos[i] - 1, 0), max(anchor.eos[j] - 1, 0))]
        else:
            found = _pair_alignment(target, anchor, i, j, pair).pairs(parts, surplus)
        t_rows += [i] * len(found)
        a_rows += [j] * len(found)
        t_pos += [q for q, _ in found]
        a_pos += [p for _, p in found]
    as_long = lambda values: torch.tensor(values, dtype=torch.long)  # noqa: E731
    return PairPositions(as_long(t_rows), as_long(t_pos), as_long(a_rows), as_long(a_pos))


def single_rule(policy: str) -> str:
    """Which positions :func:`single_positions` keeps under ``policy``: ``eos``, ``last-token`` or ``window``."""
    return policy if _known(policy) in ("eos", "last-token") else "window"


def single_positions(policy: str, encoded: Encoded, *, padding: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of unpaired prompts (preserve sets, captions): what soft preservation keeps in place.

    Every position of the window — the UNet attends to all of them, padding included — or, with
    ``padding=False``, each prompt's own tokens (BOS to its end-of-text token); under ``eos`` and
    ``last-token`` the one token they constrain either way.
    """
    rule = single_rule(policy)
    rows, pos = [], []
    for i, e in enumerate(encoded.eos):
        if rule == "eos":
            p = [e]
        elif rule == "last-token":
            p = [max(e - 1, 0)]
        else:
            p = list(range(encoded.length if padding else e + 1))
        rows += [i] * len(p)
        pos += p
    return torch.tensor(rows, dtype=torch.long), torch.tensor(pos, dtype=torch.long)
