"""Feature-level metrics (docs/design.md §5), computed on the model itself with the adapter as stored.

Read first — they depend on no token pairing:

* ``anchor_similarity`` — for each held-out pair, the cosine between the mean-pooled K (and V) of
  the edited target prompt and of the original anchor prompt, averaged over every cross-attention
  ``to_k``/``to_v``, then over the pairs. Pooled over each prompt's own tokens (BOS to EOS);
  ``anchor_similarity_window`` pools over every position the UNet attends to, padding included.
  ``anchor_similarity_no_edit`` is the same for the unedited model. Goal: 1.
* ``preserve_similarity`` — the same between each unrelated prompt after and before the edit:
  mean, ``_min`` over the prompts, and ``_window``; ``preserve_similarity_concepts`` for the
  prompts built from the preserve concepts. Goal: 1.

Residuals, at the positions the token policy pairs (:func:`erasepro_hub.models.prompts.pair_positions`,
the same call the solver makes):

* ``residual_train`` — ``||K'(target) − K(anchor)||_F / ||K(anchor)||_F`` on the solver's own prompts,
  per cross-attention site; reported as the mean over ``to_k`` sites (``_k``), ``to_v`` sites (``_v``)
  and all.
* ``residual_heldout`` — the same on held-out pairs the solver never saw; ``residual_heldout_all``
  over every paired position of the window (the ``all`` policy), so token policies can be compared.
* ``preserve_drift`` — ``||K'(p) − K(p)||_F / ||K(p)||_F`` over every position of preserve and
  unrelated prompts; ``drift_preserve_concepts`` and ``drift_unrelated`` split it.
* ``delta_norm_rel[site]`` — ``||ΔW||_F / ||W||_F``.

``K'`` is computed as the adapter-loaded pipeline computes it: the edited text encoder (forward
hooks with the stored factors), then ``x Wᵀ + (x Aᵀ) Bᵀ`` in the model's dtype.

Why one module of this length: every metric above is computed from the same K/V and pooled
features of one pass over the prompts; one module computes them once and keeps their definitions side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..adapters.apply import apply_deltas
from ..models.base import EditModel, prompt_embeddings
from ..models.conditioning import joint_pair_positions, joint_single_positions, own_tokens, read_length
from ..models.prompts import DEFAULT_SURPLUS, Encoded, Prompt, PromptPair
from ..naming import get_module, is_denoiser_key, split_key
from ..solver import LowRankDelta


@dataclass(frozen=True)
class SiteResiduals:
    per_site: dict[str, float]

    def mean(self, suffix: str = "") -> float | None:
        values = [v for k, v in self.per_site.items() if k.endswith(suffix)]
        if not values or any(v != v for v in values):  # an empty group (no such prompts) has no value
            return None
        return float(sum(values) / len(values))

    def summary(self, prefix: str) -> dict[str, float | None]:
        return {
            prefix: self.mean(),
            f"{prefix}_k": self.mean("to_k"),
            f"{prefix}_v": self.mean("to_v"),
        }


def _te_modules(model: EditModel, deltas: Mapping[str, LowRankDelta]) -> dict:
    modules = {}
    for key in deltas:
        if is_denoiser_key(key):
            continue
        component, path = split_key(key)
        modules[key] = get_module(model.encoder(component).model, path)
    return modules


class EditedEncoders:
    """Context manager: the model's text encoders with the text-encoder deltas hooked in."""

    def __init__(self, model: EditModel, deltas: Mapping[str, LowRankDelta]):
        self.model = model
        self.deltas = {k: v for k, v in deltas.items() if not is_denoiser_key(k)}
        self._applied = None

    def __enter__(self) -> EditModel:
        modules = _te_modules(self.model, self.deltas)
        self._applied = apply_deltas(None, modules, self.deltas) if self.deltas else None
        return self.model

    def __exit__(self, *exc) -> None:
        if self._applied is not None:
            self._applied.remove()


def _encode(model: EditModel, prompts: Sequence[Prompt]) -> list[Encoded]:
    return model.encode(prompts)


def _embeddings(
    model: EditModel, encoded: Sequence[Encoded], deltas: Mapping[str, LowRankDelta] | None = None, *, length: int | None = None
):
    """``(prompt embedding, pooled)`` through the original encoders, or the edited ones with ``deltas``.

    ``length`` cuts the window after that many positions (only for causal encoders, where the positions before
    the cut do not depend on what follows; see :func:`~erasepro_hub.models.conditioning.read_length`).
    """
    ids = [e.ids if length is None else e.ids[:, :length] for e in encoded]
    if not deltas:
        return prompt_embeddings(model, ids)
    with EditedEncoders(model, deltas):
        return prompt_embeddings(model, ids)


def _original_embeddings(
    model: EditModel, encoded: Sequence[Encoded], texts: Sequence[str], known: Mapping[str, torch.Tensor] | None
) -> torch.Tensor:
    """The original prompt embeddings of ``texts``: the rows ``known`` holds (the solve's preserve pass, whole
    window), the others computed."""
    length = sum(encoded[segment[0]].length for segment in model.conditioning.segments)
    known = {t: row for t, row in (known or {}).items() if row.shape[0] == length}
    missing = [i for i, text in enumerate(texts) if text not in known]
    if not missing:
        return torch.stack([known[text] for text in texts])
    if len(missing) == len(texts):
        return _embeddings(model, encoded)[0]
    rows = torch.tensor(missing)
    fresh, _ = prompt_embeddings(model, [e.ids[rows] for e in encoded])
    computed = dict(zip(missing, fresh))
    return torch.stack([computed[i] if i in computed else known[text] for i, text in enumerate(texts)])


def _kv(weight: torch.Tensor, delta: LowRankDelta | None, x: torch.Tensor) -> torch.Tensor:
    out = x @ weight.to(x.dtype).T
    if delta is not None and delta.rank:
        out = out + delta.apply(x)
    return out


def _site_residuals(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    x_edit: torch.Tensor,
    y_orig: torch.Tensor,
    groups: Mapping[str, torch.Tensor],
) -> dict[str, SiteResiduals]:
    """Per site, ``||K'(x) − K(y)||_F / ||K(y)||_F`` over the rows selected by each boolean mask in ``groups``."""
    out: dict[str, dict[str, float]] = {name: {} for name in groups}
    for key, weight in model.kv_weights.items():
        reference = _kv(weight, None, y_orig).double()
        edited = _kv(weight, deltas.get(key), x_edit).double()
        _group_residuals(out, key, (edited - reference).square().sum(-1), reference.square().sum(-1), groups)
    return {name: SiteResiduals(values) for name, values in out.items()}


def _group_residuals(
    out: dict[str, dict[str, float]], key: str, diff2: torch.Tensor, ref2: torch.Tensor, groups: Mapping[str, torch.Tensor]
) -> None:
    """``out[group][key] = sqrt(Σ diff2 / Σ ref2)`` over the rows each boolean mask selects (NaN for an empty group)."""
    for name, mask in groups.items():
        if not bool(mask.any()):
            out[name][key] = float("nan")
            continue
        denom, num = float(ref2[mask].sum()), float(diff2[mask].sum())
        out[name][key] = (num / denom) ** 0.5 if denom > 0 else num**0.5


def _pool(k: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over the positions ``mask`` selects (``None``: the whole window)."""
    return k.mean(1) if mask is None else (k * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)


def pooled_similarity(
    model: EditModel,
    x: torch.Tensor,
    x_deltas: Mapping[str, LowRankDelta],
    y: torch.Tensor,
    masks: Sequence[tuple[torch.Tensor | None, torch.Tensor | None]],
) -> list[torch.Tensor]:
    """Per prompt: the cosine between the mean-pooled ``K'(x)`` and ``K(y)``, averaged over every K/V site.

    ``x``, ``y``: ``(n, L, D)`` prompt embeddings; ``x_deltas``: the K/V deltas applied to ``x``. One result per
    ``(x_mask, y_mask)`` in ``masks``; a mask ``(n, L)`` selects the positions pooled (``None``: the whole
    window). K and V are linear maps without bias, so the positions are pooled first and K and V applied to the
    pooled rows: ``mean_j K(x_j) = K(mean_j x_j)``.
    """
    pooled = [(_pool(x, x_mask), _pool(y, y_mask)) for x_mask, y_mask in masks]
    sims: list[list[torch.Tensor]] = [[] for _ in masks]
    for key, weight in model.kv_weights.items():
        for out, (px, py) in zip(sims, pooled):
            kx, ky = _kv(weight, x_deltas.get(key), px).double(), _kv(weight, None, py).double()
            out.append(torch.nn.functional.cosine_similarity(kx, ky, dim=-1))
    return [torch.stack(values).mean(0) for values in sims]


def _pooled_residual(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    edited: torch.Tensor | None,
    original: torch.Tensor | None,
    rows: torch.Tensor,
) -> float | None:
    """How far the edited targets' pooled conditioning is from the anchors': ``||p'(t) − p(a)|| / ||p(a)||`` on the
    pooled vector itself (SDXL: matched inside the encoder), or, where a denoiser site reads it (SD 3, FLUX), on
    that site's output ``W p`` (the mean over such sites)."""
    if edited is None or original is None:
        return None
    reference = original[rows]
    if not model.pooled_weights:
        reference = reference.double()
        return float(torch.linalg.norm(edited.double() - reference) / torch.linalg.norm(reference))
    values = []
    for key, weight in model.pooled_weights.items():
        ref = _kv(weight, None, reference).double()
        out = _kv(weight, deltas.get(key), edited).double()
        values.append(float(torch.linalg.norm(out - ref) / torch.linalg.norm(ref)))
    return sum(values) / len(values)


@dataclass(frozen=True)
class PairMeasures:
    """What one pass over target/anchor pairs gives: residuals by token policy, the pooled residual,
    and the alignment-free similarities (per pair)."""

    residuals: dict[str, SiteResiduals]
    pooled_residual: float | None
    similarity: torch.Tensor | None = None
    similarity_window: torch.Tensor | None = None
    similarity_no_edit: torch.Tensor | None = None


@torch.no_grad()
def measure_pairs(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    pairs: Sequence[PromptPair],
    policies: Sequence[str],
    *,
    surplus: str = DEFAULT_SURPLUS,
    similarities: bool = True,
) -> PairMeasures:
    """K/V residuals (one :class:`SiteResiduals` per policy) and, with ``similarities``, the pooled similarity of
    each edited target to its original anchor (and of the unedited target, the baseline)."""
    anchor_keys: dict[tuple[str, str | None], int] = {}
    rows = [anchor_keys.setdefault((p.anchor, p.prefix), len(anchor_keys)) for p in pairs]
    enc_t = _encode(model, [Prompt(p.target, p.prefix) for p in pairs])
    enc_a = _encode(model, [Prompt(t, prefix) for t, prefix in anchor_keys])
    found = {policy: joint_pair_positions(model, policy, pairs, enc_t, enc_a, rows, surplus=surplus) for policy in policies}
    # without the pooled similarities, only the paired positions (and EOS, for the pooled embedding) are read
    length = None
    if not similarities:
        ends = [torch.tensor(e.eos) for e in (*enc_t, *enc_a)]  # the pooled outputs read them
        read = [p for f in found.values() for p in (f.t_pos, f.a_pos)]
        length = read_length(all(te.arch.causal for te in model.text_encoders), *ends, *read)
    orig, orig_pooled = _embeddings(model, enc_a, length=length)
    edit, edit_pooled = _embeddings(model, enc_t, deltas, length=length)
    residuals = {}
    for policy, positions in found.items():
        x = edit[positions.t_rows, positions.t_pos]
        y = orig[positions.a_rows, positions.a_pos]
        residuals[policy] = _site_residuals(model, deltas, x, y, {"all": torch.ones(len(x), dtype=torch.bool)})["all"]
    pooled = _pooled_residual(model, deltas, edit_pooled, orig_pooled, torch.tensor(rows))
    if not similarities:
        return PairMeasures(residuals, pooled)
    index = torch.tensor(rows)
    anchors, anchor_mask = orig[index], own_tokens(model, enc_a)[index]
    target_mask = own_tokens(model, enc_t)
    unedited, _ = _embeddings(model, enc_t)
    own, window = pooled_similarity(model, edit, deltas, anchors, [(target_mask, anchor_mask), (None, None)])
    (no_edit,) = pooled_similarity(model, unedited, {}, anchors, [(target_mask, anchor_mask)])
    return PairMeasures(residuals, pooled, own, window, no_edit)


@dataclass(frozen=True)
class PromptMeasures:
    """What one pass over prompts that should be unaffected gives: drift per group, similarity per prompt."""

    drift: dict[str, SiteResiduals]
    similarity: torch.Tensor
    similarity_window: torch.Tensor
    templated: torch.Tensor  # per prompt: built from a preserve concept (True) or unrelated (False)


@torch.no_grad()
def measure_prompts(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    prompts: Sequence[Prompt],
    *,
    known: Mapping[str, torch.Tensor] | None = None,
) -> PromptMeasures:
    """K/V drift over every position — all prompts, those built from a template (preserve concepts) and the
    others (unrelated) — and each prompt's pooled similarity after vs before the edit.

    ``known`` maps a prompt's text to its original prompt embedding (``(L, D)``, the whole window) where the
    caller already has it (the solve's preserve pass); the others are computed.
    """
    enc = _encode(model, [Prompt(p.text, None) for p in prompts])
    rows, pos = joint_single_positions(model, "all", enc)
    orig = _original_embeddings(model, enc, [p.text for p in prompts], known)
    edit, _ = _embeddings(model, enc, deltas)
    templated = torch.tensor([p.prefix is not None for p in prompts])
    per_row = templated[rows]
    groups = {"all": torch.ones_like(per_row), "concepts": per_row, "unrelated": ~per_row}
    mask = own_tokens(model, enc)
    # K and V of every position once per site: the drift reads them position by position, the similarity pooled
    drift: dict[str, dict[str, float]] = {name: {} for name in groups}
    own_sims, window_sims = [], []
    for key, weight in model.kv_weights.items():
        reference = _kv(weight, None, orig).double()
        edited = _kv(weight, deltas.get(key), edit).double()
        diff2 = (edited - reference)[rows, pos].square().sum(-1)
        _group_residuals(drift, key, diff2, reference[rows, pos].square().sum(-1), groups)
        cosine = torch.nn.functional.cosine_similarity
        own_sims.append(cosine(_pool(edited, mask), _pool(reference, mask), dim=-1))
        window_sims.append(cosine(_pool(edited, None), _pool(reference, None), dim=-1))
    own, window = torch.stack(own_sims).mean(0), torch.stack(window_sims).mean(0)
    return PromptMeasures({name: SiteResiduals(v) for name, v in drift.items()}, own, window, templated)


def delta_norms(
    model: EditModel, deltas: Mapping[str, LowRankDelta], absolute: Mapping[str, float] | None = None
) -> dict[str, float]:
    """``||ΔW||_F / ||W||_F`` per site (``absolute``: the ``||ΔW||_F`` already computed, by site)."""
    norms = {}
    for key, delta in deltas.items():
        weight_norm = float(torch.linalg.norm(model.weight(key).double()))
        value = absolute[key] if absolute is not None else delta.frobenius_norm()
        norms[key] = value / weight_norm if weight_norm > 0 else float("inf")
    return norms


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def _min(values: torch.Tensor) -> float | None:
    return float(values.min()) if values.numel() else None


def feature_metrics(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    *,
    pairs: Sequence[PromptPair],
    token_policy: str,
    surplus: str = DEFAULT_SURPLUS,
    heldout: Sequence[PromptPair] = (),
    preserve: Sequence[Prompt] = (),
    known: Mapping[str, torch.Tensor] | None = None,
) -> dict:
    """Every feature-level metric of one erasure, as JSON-ready data (``None`` where there are no prompts).

    ``known``: original prompt embeddings by prompt text that the caller already computed (see
    :func:`measure_prompts`).
    """
    train = measure_pairs(model, deltas, pairs, [token_policy], surplus=surplus, similarities=False)
    metrics: dict = {
        "anchor_similarity": None,
        "anchor_similarity_window": None,
        "anchor_similarity_no_edit": None,
        "preserve_similarity": None,
        "preserve_similarity_min": None,
        "preserve_similarity_window": None,
        "preserve_similarity_concepts": None,
    }
    metrics.update(train.residuals[token_policy].summary("residual_train"))
    if train.pooled_residual is not None:
        metrics["pooled_residual_train"] = train.pooled_residual
    if heldout:
        held = measure_pairs(model, deltas, heldout, [token_policy, "all"], surplus=surplus)
        metrics.update(held.residuals[token_policy].summary("residual_heldout"))
        metrics["residual_heldout_all"] = held.residuals["all"].mean()
        if held.pooled_residual is not None:
            metrics["pooled_residual_heldout"] = held.pooled_residual
        metrics["anchor_similarity"] = _mean(held.similarity)
        metrics["anchor_similarity_window"] = _mean(held.similarity_window)
        metrics["anchor_similarity_no_edit"] = _mean(held.similarity_no_edit)
    else:
        metrics.update({"residual_heldout": None, "residual_heldout_k": None, "residual_heldout_v": None,
                        "residual_heldout_all": None})
    # preserve_drift, and the two kinds of prompts inside it: those built from preserve concepts (the
    # solver saw them under soft/exact preservation) and unrelated ones (it never did)
    if preserve:
        kept = measure_prompts(model, deltas, preserve, known=known)
        metrics.update(kept.drift["all"].summary("preserve_drift"))
        metrics["drift_preserve_concepts"] = kept.drift["concepts"].mean()
        metrics["drift_unrelated"] = kept.drift["unrelated"].mean()
        unrelated = ~kept.templated
        metrics["preserve_similarity"] = _mean(kept.similarity[unrelated])
        metrics["preserve_similarity_min"] = _min(kept.similarity[unrelated])
        metrics["preserve_similarity_window"] = _mean(kept.similarity_window[unrelated])
        metrics["preserve_similarity_concepts"] = _mean(kept.similarity[kept.templated])
    else:
        metrics.update({"preserve_drift": None, "preserve_drift_k": None, "preserve_drift_v": None,
                        "drift_preserve_concepts": None, "drift_unrelated": None})
    absolute = {key: delta.frobenius_norm() for key, delta in deltas.items()}  # once per site
    metrics["delta_norm_rel"] = delta_norms(model, deltas, absolute)
    metrics["delta_norm_total"] = float(sum(v**2 for v in absolute.values()) ** 0.5)
    metrics["delta_norm_kv"] = float(sum(v**2 for k, v in absolute.items() if k in model.kv_weights) ** 0.5)
    metrics["residual_train_per_site"] = train.residuals[token_policy].per_site
    return metrics
