"""The progressive driver (docs/design.md §2.4): shallow text-encoder stages first, UNet K/V last.

Stages and their inputs
-----------------------
For ``method: erasepro`` each text-encoder layer ``i < depth`` is a stage with one
site (``text_encoder.site``). The final stage is every UNet cross-attention
``to_k``/``to_v``; they all read the prompt embedding, so they share one
factorisation. ``erasepro-kv`` and ``uce`` have the final stage only.

On SDXL the prompt embedding is the concatenation of both encoders'
penultimate hidden states, so the last layer of each encoder does not feed it.
The pooled embedding (``text_encoder_2``'s projected, normalised EOS state) also
conditions the UNet; with ``text_encoder.pooled: match`` (default) one more
stage edits ``text_encoder_2``'s last ``mlp.fc2`` in ``stream`` mode at the EOS
positions, so the pooled embedding of every target prompt equals the anchor's
exactly (that layer feeds nothing else). The edit loads with plain diffusers,
which recognises ``fc2`` modules only — a ``text_projection`` edit would not.

Incremental propagation
-----------------------
The whole progressive text-encoder solve is *one* forward pass over the target
prompts. A forward hook on each stage's site receives the site's input ``x`` for
the whole batch, gathers the constrained columns ``X``, solves the stage, and
returns ``y + ΔW x`` — so deeper layers already see the edited features, exactly
as the adapter-loaded pipeline will compute them (``ΔW x`` is applied with the
factors in the adapter's dtype, the way PEFT does). One pass over the anchor
prompts through the original model gives the targets ``T``, and one over the
preserve prompts the features preservation keeps (the original model's, as for
the caption summary). In a causal encoder (CLIP) the target and anchor passes
stop at the last position they read: a token's features depend only on the tokens
before it. Cost: about one text-encoder pass per prompt set, whatever the depth.

Why one module of this length: tokenising, staging, the anchor pass, the target pass and the
final K/V stage all read the same ``_Tokens`` and ``_Stage`` records and must agree position for
position; keeping them together keeps that agreement visible in one file.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from functools import cache, partial
from typing import Any, Callable, Protocol

import torch
from torch import nn

from ..errors import ManifestError, PromptError
from ..solver import (
    LowRankDelta,
    SolveReport,
    factorize_uce,
    factorize_zero_residual,
    iter_solve_shared,
    merge_equal_columns,
    solve,
)
from .base import EditModel, TextEncoder, get_module, prompt_embeddings, run_encoder
from .conditioning import (
    compose,
    compose_segment,
    join_pairs,
    joint_single_positions,
    pooled_vector,
    read_length,
)
from .loading import DTYPES
from .packing import PackedPrompts, pack_prefixes
from .preservation import caption_summaries
from .prompts import (
    Encoded,
    PairPositions,
    Prompt,
    PromptPair,
    pair_positions,
    single_positions,
)

logger = logging.getLogger(__name__)

FINAL_STAGE = "unet.cross_attention"
#: how an MMDiT's final-stage sites are recorded (the stage reads the transformer's text inputs)
MMDIT_STAGE = "transformer.text_input"
#: the caption summary of the pooled vector (families whose pooled vector is read at a denoiser site)
FINAL_POOLED = "pooled"


class RecipeSettings(Protocol):
    """What the driver reads of a recipe: the manifest's frozen ``Recipe`` satisfies it as it is."""

    method: str
    prompts: Any  # misspelling_weight
    preserve: Any  # mode, weight, caption_weight
    text_encoder: Any  # site, first_layer, depth, target_mode, pooled
    solver: Any  # token_policy, surplus, rank_rtol, ridge, residual_tol, strict
    uce: Any  # lam, erase_scale, preserve_scale, tokens
    adapter: Any  # dtype


@dataclass(frozen=True)
class ErasurePlan:
    """What the driver solves: the prompts a recipe spells out, and the recipe itself for every setting.

    ``recipe`` is passed through unchanged (the driver reads ``plan.recipe.solver.rank_rtol``,
    ``plan.recipe.text_encoder.depth``, …), so the schema is the one place that holds settings and their
    defaults. :func:`erasepro_hub.recipe.plan_from_recipe` builds the plan.
    """

    recipe: RecipeSettings
    pairs: tuple[PromptPair, ...]
    soft_pairs: tuple[PromptPair, ...] = ()  # misspelled targets, kept near their anchors (soft)
    preserve: tuple[Prompt, ...] = ()  # the manifest's preserve prompts
    captions: tuple[Prompt, ...] = ()  # the default preserve set (soft)

    def __post_init__(self) -> None:
        if self.method not in ("erasepro", "erasepro-kv", "uce"):
            raise ManifestError(f"method: unknown method {self.method!r}; choose erasepro, erasepro-kv or uce")
        if not self.pairs:
            raise ManifestError("concepts: at least one target → anchor concept is needed")

    @property
    def method(self) -> str:
        return self.recipe.method

    @property
    def token_policy(self) -> str:
        """The positions this method constrains: the recipe's ``solver.token_policy``, except that ``uce`` with
        ``uce.tokens: last-token`` (the default) follows the published procedure, one token per prompt."""
        if self.method == "uce" and self.recipe.uce.tokens == "last-token":
            return "last-token"
        return self.recipe.solver.token_policy

    @property
    def factor_dtype(self) -> torch.dtype:
        """The adapter's dtype: ``ΔW x`` is applied with factors in it, as the loaded pipeline will."""
        return DTYPES[self.recipe.adapter.dtype]


@dataclass(frozen=True)
class SiteSolution:
    key: str
    stage: str
    delta: LowRankDelta
    report: SolveReport


@dataclass
class ErasureSolution:
    """Per-site deltas (float64 factors, or what :func:`solve_erasure`'s ``keep`` made of them) in shallow → deep
    order, with their reports."""

    sites: list[SiteSolution]
    stages: list[str]
    n_pairs: int
    n_constrained_tokens: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: the original prompt embedding (``(L, D)``, whole window) of each preserve prompt, by text, when the solve
    #: read the whole window (the metrics reuse it); empty otherwise
    original_embeddings: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def deltas(self) -> dict[str, LowRankDelta]:
        return {s.key: s.delta for s in self.sites}



@dataclass(frozen=True)
class _Stage:
    name: str
    layer: int
    site: str
    mode: str  # "site" | "stream"
    eos: bool  # constrained at EOS positions (the pooled stage) instead of the token policy's


@dataclass
class _EncoderTokens:
    """One encoder's tokenised prompt sets and constrained positions (in its own window).

    ``targets`` holds the exact pairs' target prompts, then the soft pairs'; ``soft`` / ``soft_eos`` mark
    the entries of ``positions`` / ``eos_positions`` that belong to soft pairs.
    """

    targets: Encoded
    anchors: Encoded
    preserve: Encoded | None
    positions: PairPositions
    eos_positions: PairPositions
    soft: torch.Tensor
    soft_eos: torch.Tensor
    preserve_positions: tuple[torch.Tensor, torch.Tensor]
    preserve_eos: tuple[torch.Tensor, torch.Tensor]
    weight: torch.Tensor | None = None  # per entry of ``positions``: √(copies merged into it) (:func:`_merge_soft`)


@dataclass
class _Tokens:
    """Every encoder's :class:`_EncoderTokens`, and the final stage's positions in the rows of the prompt
    embedding (:func:`~.conditioning.join_pairs`; the same as the encoders' own on SD 1.x/2.x/XL)."""

    encoders: list[_EncoderTokens]
    final: PairPositions
    final_soft: torch.Tensor
    final_weight: torch.Tensor | None
    final_preserve: tuple[torch.Tensor, torch.Tensor]
    anchor_rows: torch.Tensor
    n_exact: int


# ----------------------------------------------------------------------------- hooks
def _tensor_output(output):
    return output[0] if isinstance(output, tuple) else output


def _bias(module: nn.Linear) -> torch.Tensor | None:
    return None if module.bias is None else module.bias.detach()


# ----------------------------------------------------------------------------- planning
def _tokenize(model: EditModel, plan: ErasurePlan) -> _Tokens:
    pairs = plan.pairs + plan.soft_pairs
    anchor_keys: dict[tuple[str, str | None], int] = {}
    anchor_rows = [anchor_keys.setdefault((p.anchor, p.prefix), len(anchor_keys)) for p in pairs]
    anchors = [Prompt(text, prefix) for text, prefix in anchor_keys]
    targets = [Prompt(p.target, p.prefix) for p in pairs]
    n_exact = len(plan.pairs)
    padding = _preserve_padding(plan)
    empty = (torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
    per_encoder = []
    for te in model.text_encoders:
        t, a = te.encode(targets), te.encode(anchors)
        causal, policy = te.arch.causal, plan.token_policy
        positions = pair_positions(policy, pairs, t, a, anchor_rows, causal=causal, surplus=plan.recipe.solver.surplus)
        eos = pair_positions("eos", pairs, t, a, anchor_rows, causal=causal)
        p = te.encode(plan.preserve) if plan.preserve else None
        per_encoder.append(
            _EncoderTokens(
                t, a, p, positions, eos, positions.t_rows >= n_exact, eos.t_rows >= n_exact,
                single_positions(policy, p, padding=padding) if p is not None else empty,
                single_positions("eos", p) if p is not None else empty,
            )
        )
    for segment in model.conditioning.segments:  # side by side in the prompt embedding: one position each
        for i in segment[1:]:
            if not per_encoder[i].positions.equals(per_encoder[segment[0]].positions):
                raise PromptError(
                    f"the tokenizers of {model.text_encoders[segment[0]].component} and "
                    f"{model.text_encoders[i].component} place the constrained tokens at different positions; "
                    "use plain words around the concept"
                )
    in_segments = {i for segment in model.conditioning.segments for i in segment}
    groups = list(model.conditioning.segments) + [(i,) for i in range(len(per_encoder)) if i not in in_segments]
    for group in groups:  # encoders side by side read the same positions: merged alike
        first = per_encoder[group[0]]
        causal = all(model.text_encoders[i].arch.causal for i in group)
        ids = [per_encoder[i].targets.ids for i in group]
        keep, weight = _merge_soft(first.positions, first.soft, ids, causal=causal)
        merged = {"positions": _select(first.positions, keep), "soft": first.soft[keep], "weight": weight}
        for i in group:
            per_encoder[i] = replace(per_encoder[i], **merged)
    # the final stage's rows: each segment's own positions, shifted (the alignment is not computed again)
    final = join_pairs(model, [e.targets for e in per_encoder], {i: e.positions for i, e in enumerate(per_encoder)})
    final_weight = torch.cat([per_encoder[segment[0]].weight for segment in model.conditioning.segments])
    final_preserve = (
        joint_single_positions(model, plan.token_policy, [e.preserve for e in per_encoder], padding=padding)
        if plan.preserve
        else empty
    )
    return _Tokens(
        per_encoder, final, final.t_rows >= n_exact, final_weight, final_preserve, torch.tensor(anchor_rows), n_exact
    )


def _preserve_padding(plan: ErasurePlan) -> bool:
    """Whether the preserve prompts are kept at their padding too (``preserve.positions``): under ``auto`` where no
    caption summary keeps the window in place."""
    positions = plan.recipe.preserve.positions
    return positions == "window" or (positions == "auto" and not plan.captions)


def _select(positions: PairPositions, keep: torch.Tensor) -> PairPositions:
    return PairPositions(positions.t_rows[keep], positions.t_pos[keep], positions.a_rows[keep], positions.a_pos[keep])


def _merge_soft(
    positions: PairPositions, soft: torch.Tensor, ids: list[torch.Tensor], *, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft entries that are the same column: one entry each, weighted ``√k`` for its ``k`` copies.

    A soft pair's column enters the objective as ``λ_v ||ΔW v − r||²``; ``k`` identical columns with the same
    target are ``k λ_v ||ΔW v − r||²``, which the one column scaled by ``√k`` (with its target) gives exactly.
    Columns are identical where the tokens they depend on are: in a causal encoder the prefix up to the
    position (the misspellings of one name share the tokens of the word they leave intact), in a
    bidirectional one the whole prompt. Returns the entries kept (exact ones all, in order) and every kept
    entry's weight (``1`` for exact ones), exactly representable in float32 so that columns in either dtype
    carry the same weight.
    """
    keep: list[int] = []
    count: list[int] = []
    seen: dict[tuple, int] = {}
    rows, pos, a_rows, a_pos = (t.tolist() for t in (positions.t_rows, positions.t_pos, positions.a_rows, positions.a_pos))
    for i, is_soft in enumerate(soft.tolist()):
        if is_soft:
            tokens = tuple(tuple(t[rows[i], : pos[i] + 1].tolist() if causal else t[rows[i]].tolist()) for t in ids)
            key = (pos[i], tokens, a_rows[i], a_pos[i])
            if key in seen:
                count[seen[key]] += 1
                continue
            seen[key] = len(keep)
        keep.append(i)
        count.append(1)
    weight = torch.tensor(count, dtype=torch.float64).sqrt().float().double()
    return torch.tensor(keep, dtype=torch.long), weight


def text_encoder_stages(model: EditModel, plan: ErasurePlan) -> dict[str, list[_Stage]]:
    """The text-encoder stages of each encoder, shallow to deep."""
    stages: dict[str, list[_Stage]] = {te.component: [] for te in model.text_encoders}
    if plan.method != "erasepro":
        return stages
    for te in model.text_encoders:
        if not te.spec.editable:
            continue
        usable = te.embed_layers
        first = min(plan.recipe.text_encoder.first_layer, usable - 1)
        depth = usable - first if plan.recipe.text_encoder.depth is None else plan.recipe.text_encoder.depth
        if first + depth > usable:
            raise ManifestError(
                f"text_encoder.depth: {depth} layers from layer {first} exceed the {usable} layers of "
                f"{te.component} that feed the prompt embedding in {model.source}; use at most {usable - first} "
                "(or null for all)"
            )
        for layer in range(first, first + depth):
            stages[te.component].append(
                _Stage(te.site_key(layer, plan.recipe.text_encoder.site), layer, plan.recipe.text_encoder.site, plan.recipe.text_encoder.target_mode, eos=False)
            )
        if plan.recipe.text_encoder.target_mode == "stream" and plan.recipe.text_encoder.site not in te.arch.stream:
            raise ManifestError(
                f"text_encoder.target_mode: 'stream' is not available for site {plan.recipe.text_encoder.site} of {te.component}"
            )
        if te.spec.pooled and model.conditioning.pooled_match and plan.recipe.text_encoder.pooled == "match":
            last = te.num_layers - 1
            stages[te.component].append(_Stage(te.site_key(last, "mlp.fc2"), last, "mlp.fc2", "stream", eos=True))
    return stages


# ----------------------------------------------------------------------------- the solve
#: what the solution keeps of a site's float64 update: ``keep(site, ΔW)`` (see :func:`solve_erasure`)
Keep = Callable[[str, LowRankDelta], LowRankDelta]


class _Recorder:
    def __init__(self, progress: Callable[[str], None] | None, keep: Keep | None = None):
        self.sites: list[SiteSolution] = []
        self.progress = progress
        self.keep = keep
        self.keep_seconds = 0.0  # time in ``keep``: storage, not the solve
        self.stage_bytes = 0  # the float64 updates of the stage under way: how large its working set was
        self._last_A: torch.Tensor | None = None  # the K/V sites of a stage share one A: counted once

    def add(self, key: str, stage: str, result) -> None:
        delta = result.delta
        shared = delta.A is self._last_A
        self.stage_bytes += sum(t.numel() * t.element_size() for t in ((delta.B,) if shared else (delta.B, delta.A)))
        self._last_A = delta.A
        if self.keep is not None:
            start = time.perf_counter()
            delta = self.keep(key, delta)
            self.keep_seconds += time.perf_counter() - start
        self.sites.append(SiteSolution(key, stage, delta, result.report))
        logger.debug("%s: constraint rank %d residual %.3e", key, result.report.constraint_rank, result.report.residual)

    def stage_done(self, name: str) -> None:
        if self.stage_bytes >= TRIM_BYTES:
            _return_freed_memory()
        self.stage_bytes = 0
        self._last_A = None
        if self.progress is not None:
            self.progress(name)


#: A stage whose float64 updates take at least this much hands the memory it freed back to the system at its end
#: (:func:`_return_freed_memory`); its working set (metric, soft columns, temporaries) grows with its columns as
#: they do. Below it there is little to hand back, and the trim walks the whole heap on every call.
TRIM_BYTES = 4 * 2**20


@cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's ``malloc_trim``; ``None`` elsewhere (macOS, Windows, a C library without it)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # no C library to open, or no such function in it (musl)
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


def _return_freed_memory() -> None:
    """Hand the memory a finished stage freed back to the system (glibc keeps freed blocks of a few MB in the
    process otherwise): each stage's working set (its ``d × d`` metric, soft columns, temporaries) is freed
    when the stage ends, and what the next one allocates is laid out afresh instead of around the gaps.
    Changes no allocation setting; a no-op where the C library has no ``malloc_trim``."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _factorize(
    plan: ErasurePlan,
    X: torch.Tensor,
    P: torch.Tensor | None,
    *,
    soft: torch.Tensor | None = None,
    soft_targets: torch.Tensor | None = None,
    uce: bool = False,
    one_site: bool = False,
):
    """The shared factorisation of one stage: ``X`` (``d × N``) targets, ``P`` (``d × M``) preserve inputs,
    ``soft`` (``d × r``) the caption summary of the stage (weighted by ``plan.recipe.preserve.caption_weight``), ``soft_targets``
    (``d × N_v``) the soft pairs' inputs (weighted by ``plan.recipe.prompts.misspelling_weight``)."""
    if uce:
        return factorize_uce(
            X,
            preserve=P,
            lam=plan.recipe.uce.lam,
            erase_scale=plan.recipe.uce.erase_scale,
            preserve_scale=plan.recipe.uce.preserve_scale,
            rtol=plan.recipe.solver.rank_rtol,
        )
    return factorize_zero_residual(
        X,
        preserve=P,
        preserve_mode=plan.recipe.preserve.mode,
        preserve_weight=plan.recipe.preserve.weight,
        soft=soft,
        soft_weight=plan.recipe.preserve.caption_weight,
        soft_orthogonal=True,  # an eigenbasis scaled (.preservation.summarize)
        soft_targets=soft_targets,
        soft_target_weight=plan.recipe.prompts.misspelling_weight,
        rtol=plan.recipe.solver.rank_rtol,
        ridge=plan.recipe.solver.ridge,
        one_site=one_site,
    )


def _caption_summaries(model: EditModel, plan: ErasurePlan, stages: dict[str, list[_Stage]]) -> dict[str, torch.Tensor]:
    """The default preserve set, summarised at every stage (cached on disk; see :mod:`.preservation`)."""
    if not plan.captions:
        return {}
    sites = {
        stage.name: (te, te.site_module(stage.layer, stage.site), stage.eos)
        for te in model.text_encoders
        for stage in stages[te.component]
    }
    embed = partial(prompt_embeddings, model)
    pooled = FINAL_POOLED if model.pooled_weights else None
    return caption_summaries(
        model, plan.captions, sites, FINAL_STAGE, policy=plan.token_policy, embed=embed, pooled_stage=pooled
    )


def _gather(t: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return t[rows.to(t.device), pos.to(t.device)]


def _split(
    rows: torch.Tensor, soft: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows (one per constrained token) → the exact pairs' columns and the soft pairs' (``None`` without), each
    soft column times its ``weight`` (:func:`_merge_soft`): every soft quantity of a solve — inputs, ``W x``,
    targets — goes through here (or :func:`_split_rows`), so a merged column and its target are scaled alike."""
    return _split_rows(lambda keep: rows[keep.to(rows.device)], soft, weight)


def _split_rows(
    take: Callable[[torch.Tensor], torch.Tensor], soft: torch.Tensor, weight: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`_split` of the rows ``take(mask)`` gives for the exact and the soft entries: each part is formed on its
    own, never the rows of both at once (at a hundred concepts, thousands of ``d``-wide rows)."""
    soft = soft.cpu()
    exact = take(~soft).T
    if not bool(soft.any()):
        return exact, None
    columns = take(soft)
    if weight is not None:
        columns = columns * weight[soft].to(device=columns.device, dtype=columns.dtype)[:, None]
    return exact, columns.T


def _window(te: TextEncoder, ids: torch.Tensor, *positions: torch.Tensor) -> torch.Tensor:
    """``ids`` cut after the last position any of ``positions`` reads, where that changes nothing
    (:func:`~.conditioning.read_length`): the target and anchor passes of a ``concept-eos`` solve read a few tokens of a
    77-token window."""
    length = read_length(te.arch.causal, *positions)
    return ids if length is None else ids[:, :length]


@dataclass(frozen=True)
class _AnchorRows:
    """A stage's anchor capture: the values at each distinct anchor position read (``values``, one row each) and,
    per constrained row, which of them it wants (``index``). Many targets share an anchor ("art" for a hundred
    names): the capture then holds a few rows where the solve reads thousands."""

    values: torch.Tensor
    index: torch.Tensor

    def rows(self, keep: torch.Tensor) -> torch.Tensor:
        """The rows of the constrained rows ``keep`` selects (a mask), as :func:`_solve_stage` reads them."""
        return self.values[self.index[keep].to(self.values.device)]


def _distinct(rows: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct ``(row, pos)`` pairs (as two tensors) and, per pair given, the index of its distinct one."""
    pairs, index = torch.unique(torch.stack([rows, pos]), dim=1, return_inverse=True)
    return pairs[0], pairs[1], index


def _anchor_captures(te: TextEncoder, stages: list[_Stage], ids: torch.Tensor, tokens: _EncoderTokens) -> tuple[dict, tuple]:
    """Through the original encoder: what each stage's targets need (:class:`_AnchorRows`), and the anchors'
    ``(sequence output, pooled output)``."""
    captured: dict[str, _AnchorRows] = {}

    def site_hook(stage: _Stage, where: tuple, mod, args, output):
        rows, pos, index = where
        out = _gather(output, rows, pos)
        bias = _bias(mod)
        captured[stage.name] = _AnchorRows(out - bias if bias is not None else out, index)

    def out_hook(stage: _Stage, where: tuple, mod, args, output):
        rows, pos, index = where
        captured[stage.name] = _AnchorRows(_gather(_tensor_output(output), rows, pos), index)

    def in_hook(stage: _Stage, where: tuple, mod, args):
        rows, pos, index = where
        captured[stage.name] = _AnchorRows(_gather(args[0], rows, pos), index)

    # every stage reads the same anchor positions (or the EOS ones): their distinct pairs, once each
    distinct = {eos: _distinct(p.a_rows, p.a_pos) for eos, p in ((False, tokens.positions), (True, tokens.eos_positions))}
    with ExitStack() as hooks:
        for stage in stages:
            where = distinct[stage.eos]
            if stage.mode == "site":  # what the site itself output for the anchors
                handle = te.site_module(stage.layer, stage.site).register_forward_hook(partial(site_hook, stage, where))
            else:  # stream: the residual-stream value the anchor prompts produce at this point
                module, kind = te.arch.stream[stage.site].anchor
                point = get_module(te.layers[stage.layer], module)
                if kind == "output":
                    handle = point.register_forward_hook(partial(out_hook, stage, where))
                else:
                    handle = point.register_forward_pre_hook(partial(in_hook, stage, where))
            hooks.callback(handle.remove)
        outputs = run_encoder(te, _window(te, ids, tokens.positions.a_pos, tokens.eos_positions.a_pos))
    return captured, outputs


def _preserve_captures(
    te: TextEncoder, stages: list[_Stage], ids: torch.Tensor, tokens: _EncoderTokens
) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], tuple]:
    """Through the original encoder: each stage's preserve inputs ``P`` and ``W P`` (``d × M``, ``m × M``, in the
    model's dtype: every stage's are held until the target pass reaches it; on the prefix tree, the column of a
    position several prompts share is read once, times √(prompts): the BOS and a template's prefix), and the
    preserve prompts' ``(sequence output, pooled output)``.

    Preservation keeps the inputs the preserve prompts have in the **original** model, as the caption summary
    does (:mod:`.preservation`): what should stay is what the model did before the erasure, and the preserve
    features then do not depend on the solve, so they are read in one pass of their own: cut after the last
    position read (the whole window under ``preserve.positions: window``), on the prompts' prefix tree where that
    saves work (:func:`_packed`).
    """
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    where = {False: tokens.preserve_positions, True: tokens.preserve_eos}
    ids = _window(te, ids, tokens.preserve_positions[1], tokens.preserve_eos[1])
    # an uncut pass is rectangular: its whole window is what the metrics reuse (solve_erasure's ``kept``)
    cut = ids.shape[1] < tokens.preserve.length
    packed = _packed(te, ids, tokens.preserve.length, *where.values()) if cut else None
    copies = {eos: None for eos in where}
    if packed is not None:  # the hooks then read the packed batch, each position of the tree once
        for eos, rows_pos in where.items():
            rows, pos, index = _distinct(*packed.locate(*rows_pos))
            where[eos], copies[eos] = (rows, pos), torch.bincount(index, minlength=len(rows)).sqrt()[:, None]

    def hook(stage: _Stage, mod, args, output):
        rows, pos = where[stage.eos]
        bias = _bias(mod)
        plain = output - bias if bias is not None else output  # W p
        P, WP = _gather(args[0], rows, pos), _gather(plain, rows, pos)
        scale = copies[stage.eos]  # a column read k times is the column once times √k (merge_equal_columns)
        captured[stage.name] = (P.T, WP.T) if scale is None else ((P * scale.to(P.dtype)).T, (WP * scale.to(WP.dtype)).T)

    with ExitStack() as hooks:
        for stage in stages:
            module = te.site_module(stage.layer, stage.site)
            hooks.callback(module.register_forward_hook(partial(hook, stage)).remove)
        return captured, _run(te, ids, packed)


def _run(te: TextEncoder, ids: torch.Tensor, packed: PackedPrompts | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The encoder's ``(sequence output, pooled output)`` for ``ids``, run on their prefix tree where ``packed`` is
    given (the sequence output then holds the positions the tree reads, zero elsewhere)."""
    if packed is None:
        return run_encoder(te, ids)
    mask = packed.additive_mask(te.model.dtype)
    embeds, pooled = run_encoder(te, packed.ids, attention_mask=mask, position_ids=packed.position_ids)
    return packed.unpack(embeds), pooled


@dataclass(frozen=True)
class _StageInputs:
    """What one stage's solve reads, gathered from the forward pass at its site.

    ``X``/``WX``: the exact pairs' site inputs and ``W x`` (bias removed) as columns, ``V``/``WV`` the soft pairs'
    (weighted, :func:`_split`; ``None`` without); ``P``/``WP``: the preserve prompts' (``d × M``, or ``None``);
    ``residual(keep)``: the residual-stream input of the layer at the target rows ``keep`` selects (``stream``
    mode), else ``None``.
    """

    X: torch.Tensor
    V: torch.Tensor | None
    WX: torch.Tensor
    WV: torch.Tensor | None
    P: torch.Tensor | None
    WP: torch.Tensor | None
    residual: Callable[[torch.Tensor], torch.Tensor] | None
    bias: torch.Tensor | None


def _solve_stage(
    stage: _Stage,
    weight: torch.Tensor,
    inputs: _StageInputs,
    anchor: _AnchorRows,
    soft: torch.Tensor,
    plan: ErasurePlan,
    caption_summary: torch.Tensor | None,
    soft_weight: torch.Tensor | None = None,
):
    """One text-encoder stage: the wanted outputs from the anchor capture, the shared factorisation, the solve."""

    def wanted(keep: torch.Tensor) -> torch.Tensor:
        T = anchor.rows(keep).double()
        if stage.mode == "stream":  # the site must output what makes the layer's residual stream equal the anchor's
            T = T - inputs.residual(keep).double()
            if inputs.bias is not None:
                T = T - inputs.bias.double()
        return T

    fact = _factorize(plan, inputs.X, inputs.P, soft=caption_summary, soft_targets=inputs.V, one_site=True)
    T, T_soft = _split_rows(wanted, soft, soft_weight)
    return solve(
        fact, weight, T, strict=plan.recipe.solver.strict, residual_tol=plan.recipe.solver.residual_tol, site=stage.name,
        WX=inputs.WX, WP=inputs.WP, T_soft=T_soft, WV=inputs.WV,
    )


def _target_pass(
    te: TextEncoder,
    stages: list[_Stage],
    ids: torch.Tensor,
    anchor_caps: dict,
    preserve_caps: dict,
    tokens: _EncoderTokens,
    plan: ErasurePlan,
    recorder: _Recorder,
    summaries: dict[str, torch.Tensor],
) -> tuple:
    """The target prompts through the encoder, solving each stage as the forward pass reaches it.

    The hooks only gather and apply: at a stage's site, the forward hook gathers what :func:`_solve_stage`
    reads, and adds the solved update to the site's output so that deeper stages see the edited model.
    """
    stash: dict[str, torch.Tensor] = {}

    def stash_hook(stage: _Stage, index: int, mod, args):
        stash[stage.name] = args[index]

    def solve_hook(stage: _Stage, mod, args, output):
        pos = tokens.eos_positions if stage.eos else tokens.positions
        x = args[0]
        # the forward pass already computed W x + b for every row: reuse it for W X
        bias = _bias(mod)
        plain = output - bias if bias is not None else output
        P, WP = preserve_caps.get(stage.name, (None, None))
        soft, soft_weight = (tokens.soft_eos, None) if stage.eos else (tokens.soft, tokens.weight)
        at = lambda t, keep: _gather(t, pos.t_rows[keep], pos.t_pos[keep])  # noqa: E731
        # X in the model's dtype: the solver widens it (its Gram stays narrow)
        X, V = _split_rows(partial(at, x), soft, soft_weight)
        WX, WV = _split_rows(lambda keep: at(plain, keep).double(), soft, soft_weight)
        residual = stash.pop(stage.name) if stage.mode == "stream" else None
        inputs = _StageInputs(
            X=X,
            V=V,
            WX=WX,
            WV=WV,
            P=P if P is not None and P.shape[1] else None,
            WP=WP.double() if P is not None and P.shape[1] else None,
            residual=partial(at, residual) if residual is not None else None,
            bias=bias,
        )
        result = _solve_stage(
            stage, mod.weight, inputs, anchor_caps[stage.name], soft, plan, summaries.get(stage.name), soft_weight
        )
        recorder.add(stage.name, f"{te.component}.layer{stage.layer}" + (".pooled" if stage.eos else ""), result)
        recorder.stage_done(stage.name)
        factors = result.delta.to(plan.factor_dtype)
        return output + factors.apply(x.to(plan.factor_dtype)).to(output.dtype)

    ids, packed = _target_batch(te, ids, tokens)
    if packed is not None:  # the hooks then read the packed batch
        tokens = replace(
            tokens, positions=_located(tokens.positions, packed), eos_positions=_located(tokens.eos_positions, packed)
        )
    with ExitStack() as hooks:
        for stage in stages:
            if stage.mode == "stream":
                where, index = te.arch.stream[stage.site].residual
                point = get_module(te.layers[stage.layer], where)
                hooks.callback(point.register_forward_pre_hook(partial(stash_hook, stage, index)).remove)
            module = te.site_module(stage.layer, stage.site)
            hooks.callback(module.register_forward_hook(partial(solve_hook, stage)).remove)
        return _run(te, ids, packed)


def _target_batch(te: TextEncoder, ids: torch.Tensor, tokens: _EncoderTokens) -> tuple[torch.Tensor, PackedPrompts | None]:
    """What the target pass runs: the target ``ids`` cut after the last position read (:func:`_window`), and their
    prefix tree where :func:`_packed` uses one (else ``None``)."""
    ids = _window(te, ids, tokens.positions.t_pos, tokens.eos_positions.t_pos)
    where = [(p.t_rows, p.t_pos) for p in (tokens.positions, tokens.eos_positions)]
    return ids, _packed(te, ids, tokens.targets.length, *where)


def _packed(
    te: TextEncoder, ids: torch.Tensor, window: int, *where: tuple[torch.Tensor, torch.Tensor]
) -> PackedPrompts | None:
    """Prompts ``ids`` (cut from a ``window`` of positions) read at the ``(rows, pos)`` of ``where``, as a prefix tree
    (:mod:`.packing`) where that is exact and saves work: a causal encoder whose pooled output the solve does not
    read (the model computes it at the last token of each row), and rows no longer than the window (a row holds a
    whole subtree: many prompts below one long template prefix can outgrow it, and the model reads no more)."""
    if not te.arch.causal or te.spec.pooled is not None:
        return None
    last = torch.full((ids.shape[0],), -1, dtype=torch.long)
    for rows, pos in where:
        last = last.scatter_reduce(0, rows, pos, reduce="amax")
    packed = pack_prefixes(ids, last)
    return packed if packed is not None and packed.ids.shape[1] <= window else None


def pass_sizes(model: EditModel, plan: ErasurePlan) -> dict[str, int]:
    """What the target pass of ``plan`` runs, summed over the text encoders: ``tokens`` (the prefix tree's, where
    it is used), ``rectangular_tokens`` (the batch cut after the last read position), ``soft_columns`` (after
    merging copies) and ``soft_copies`` (before)."""
    sizes = dict.fromkeys(("tokens", "rectangular_tokens", "soft_columns", "soft_copies"), 0)
    for te, tok in zip(model.text_encoders, _tokenize(model, plan).encoders):
        ids, packed = _target_batch(te, tok.targets.ids, tok)
        sizes["tokens"] += (packed.ids if packed is not None else ids).numel()
        sizes["rectangular_tokens"] += ids.numel()
        sizes["soft_columns"] += int(tok.soft.sum())
        sizes["soft_copies"] += round(float(tok.weight[tok.soft].square().sum()))
    return sizes


def _located(positions: PairPositions, packed: PackedPrompts) -> PairPositions:
    rows, pos = packed.locate(positions.t_rows, positions.t_pos)
    return PairPositions(rows, pos, positions.a_rows, positions.a_pos)


def _gather_joint(model: EditModel, sequences: list[torch.Tensor], lengths: list[int], rows: torch.Tensor, pos: torch.Tensor):
    """Rows of the prompt embedding (:func:`~.conditioning.compose`) at ``(rows, pos)``, read from the encoders' sequence
    outputs, which a causal pass may have cut short: each segment's rows start at the sum of the earlier
    segments' full windows (``lengths``)."""
    out = None
    offset = 0
    for segment in model.conditioning.segments:
        inside = (pos >= offset) & (pos < offset + lengths[segment[0]])
        part = compose_segment(model, [sequences[i] for i in segment])
        values = _gather(part, rows[inside], pos[inside] - offset)
        if out is None:
            out = values.new_zeros((len(pos), values.shape[-1]))
        out[inside.to(out.device)] = values
        offset += lengths[segment[0]]
    return out


def _final_sites(
    plan: ErasurePlan,
    weights: dict[str, torch.Tensor],
    Xm: torch.Tensor,
    Ym: torch.Tensor,
    Pm: torch.Tensor | None,
    soft: torch.Tensor,
    soft_weight: torch.Tensor | None,
    summary: torch.Tensor | None,
    recorder: _Recorder,
    stage: str,
) -> None:
    """Sites that read the same rows (the prompt embedding's, or the pooled vector's) and want ``W Y`` for them: one
    factorisation and one solve in input space (:func:`~erasepro_hub.solver.solve_shared`), then ``ΔW = W ΔW_I``
    per site, recorded as each is formed."""
    X, V = _split(Xm, soft, soft_weight)
    fact = _factorize(plan, X, Pm.T if Pm is not None else None, soft=summary, soft_targets=V, uce=plan.method == "uce")
    Y, Y_soft = _split(Ym, soft, soft_weight)
    solver = plan.recipe.solver
    # one site at a time: each float64 update is let go once recorded (the recorder may keep less of it)
    sites = iter_solve_shared(fact, weights, Y, Y_soft=Y_soft, strict=solver.strict, residual_tol=solver.residual_tol)
    for key, result in sites:
        recorder.add(key, stage, result)


@torch.no_grad()
def solve_erasure(
    model: EditModel,
    plan: ErasurePlan,
    *,
    progress: Callable[[str], None] | None = None,
    stages: Callable[[int], None] | None = None,
    keep: Keep | None = None,
) -> ErasureSolution:
    """Run the progressive solve; the model's weights are not modified.

    ``stages(n)`` is called once, before the first stage is solved, with the number of stages;
    ``progress(name)`` is then called as each stage finishes (``n`` calls in all, the last with
    :data:`FINAL_STAGE`). ``keep(site, ΔW)``, called as each site is solved, gives what the solution holds for
    it instead of the float64 update (the erase command keeps the form the adapter file stores, so that a
    many-site solve does not hold every float64 update to the end); the stages are solved and applied with the
    float64 updates whatever it keeps. The time spent in ``keep`` is ``timings["keep"]``, not part of the
    solution's ``seconds``. At the end of each large stage (:data:`TRIM_BYTES`) the memory it freed is handed back
    to the system (:func:`_return_freed_memory`).
    """
    start = time.perf_counter()
    tokens = _tokenize(model, plan)
    plan_stages = text_encoder_stages(model, plan)
    if stages is not None:
        stages(sum(len(s) for s in plan_stages.values()) + 1)  # the text-encoder stages, then the final stage
    recorder = _Recorder(progress, keep)
    n_targets = len(plan.pairs) + len(plan.soft_pairs)
    edited, original, preserved = [], [], []  # per encoder: (sequence output, pooled output)
    timings: dict[str, float] = {"tokenize": time.perf_counter() - start}
    t0 = time.perf_counter()
    summaries = _caption_summaries(model, plan, plan_stages)
    timings["captions"] = time.perf_counter() - t0
    for te, tok in zip(model.text_encoders, tokens.encoders):
        te_stages = plan_stages[te.component]
        t0 = time.perf_counter()
        anchor_caps, anchor_out = _anchor_captures(te, te_stages, tok.anchors.ids, tok)
        original.append(anchor_out)
        timings[f"{te.component}.anchor_pass"] = time.perf_counter() - t0
        preserve_caps: dict = {}
        if plan.preserve:
            t0 = time.perf_counter()
            preserve_caps, preserve_out = _preserve_captures(te, te_stages, tok.preserve.ids, tok)
            preserved.append(preserve_out)
            timings[f"{te.component}.preserve_pass"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        edited.append(_target_pass(te, te_stages, tok.targets.ids, anchor_caps, preserve_caps, tok, plan, recorder, summaries))
        timings[f"{te.component}.target_pass"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    # rows of the prompt embedding at the constrained positions (pipeline dtype); the solver works on columns
    lengths = [tok.targets.length for tok in tokens.encoders]
    final = tokens.final
    joint = partial(_gather_joint, model, lengths=lengths)
    Xm = joint([o[0] for o in edited], rows=final.t_rows, pos=final.t_pos)
    Ym = joint([o[0] for o in original], rows=final.a_rows, pos=final.a_pos)
    Pm = joint([o[0] for o in preserved], rows=tokens.final_preserve[0], pos=tokens.final_preserve[1]) if preserved else None
    Pm = merge_equal_columns(Pm.T)[0].T if Pm is not None else None  # the preserve pass's repeated columns, once
    stage = MMDIT_STAGE if model.conditioning.sequence_sites else FINAL_STAGE
    _final_sites(plan, model.kv_weights, Xm, Ym, Pm, tokens.final_soft, tokens.final_weight, summaries.get(FINAL_STAGE), recorder, stage)
    if model.pooled_weights:  # one row per prompt: the pooled vector
        Xp = pooled_vector(model, [o[1] for o in edited])
        Yp = pooled_vector(model, [o[1] for o in original])[tokens.anchor_rows]
        Pp = pooled_vector(model, [o[1] for o in preserved]) if preserved else None
        soft = torch.arange(n_targets) >= tokens.n_exact
        _final_sites(plan, model.pooled_weights, Xp, Yp, Pp, soft, None, summaries.get(FINAL_POOLED), recorder, stage)
    recorder.stage_done(FINAL_STAGE)
    timings["final_stage"] = time.perf_counter() - t0
    if keep is not None:  # the stages' figures include it; the solve's seconds do not
        timings["keep"] = recorder.keep_seconds
    stage_names = list(dict.fromkeys(s.stage for s in recorder.sites))
    kept = {}
    read = [i for segment in model.conditioning.segments for i in segment]  # encoders whose sequence is read
    if preserved and all(preserved[i][0].shape[1] == tokens.encoders[i].preserve.length for i in read):
        joined = compose(model, [o[0] for o in preserved])
        kept = {prompt.text: joined[i] for i, prompt in enumerate(plan.preserve)}
    return ErasureSolution(
        sites=recorder.sites,
        stages=stage_names,
        n_pairs=n_targets,
        n_constrained_tokens=int((~tokens.final_soft).sum()),
        seconds=time.perf_counter() - start - recorder.keep_seconds,
        timings=timings,
        original_embeddings=kept,
    )


__all__ = [
    "FINAL_STAGE",
    "ErasurePlan",
    "ErasureSolution",
    "SiteSolution",
    "pass_sizes",
    "solve_erasure",
]
