"""Feature-level metrics (DESIGN §5), computed on the model itself with the adapter as stored.

* ``residual_train`` — ``||K'(target) − K(anchor)||_F / ||K(anchor)||_F`` at the constrained
  positions of the solver's own prompts, per cross-attention site; reported as the
  mean over ``to_k`` sites (``_k``), over ``to_v`` sites (``_v``) and over all.
* ``residual_heldout`` — the same on held-out pairs the solver never saw; ``residual_heldout_all``
  measures it over every position of the padded window, so token policies can be compared.
* ``preserve_drift`` — ``||K'(p) − K(p)||_F / ||K(p)||_F`` over every position of preserve
  and unrelated prompts; ``drift_preserve_concepts`` and ``drift_unrelated`` split it into the
  prompts built from the preserve concepts and the unrelated evaluation prompts.
* ``delta_norm_rel[site]`` — ``||ΔW||_F / ||W||_F``.

``K'`` is computed as the adapter-loaded pipeline computes it: the edited text
encoder (forward hooks with the stored factors), then ``x Wᵀ + (x Aᵀ) Bᵀ`` in the
model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..adapters.apply import apply_deltas
from ..naming import get_module, is_kv_key, split_key
from ..solver import LowRankDelta
from ..models.base import EditModel
from ..models.progressive import prompt_embeddings
from ..models.prompts import Prompt, PromptPair, encode, pair_positions, single_positions


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
        if is_kv_key(key):
            continue
        component, path = split_key(key)
        modules[key] = get_module(model.encoder(component).model, path)
    return modules


class EditedEncoders:
    """Context manager: the model's text encoders with the text-encoder deltas hooked in."""

    def __init__(self, model: EditModel, deltas: Mapping[str, LowRankDelta]):
        self.model = model
        self.deltas = {k: v for k, v in deltas.items() if not is_kv_key(k)}
        self._applied = None

    def __enter__(self) -> EditModel:
        modules = _te_modules(self.model, self.deltas)
        self._applied = apply_deltas(None, modules, self.deltas) if self.deltas else None
        return self.model

    def __exit__(self, *exc) -> None:
        if self._applied is not None:
            self._applied.remove()


def _ids(model: EditModel, prompts: Sequence[Prompt]):
    return [encode(te.tokenizer, prompts) for te in model.text_encoders]


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
        diff2 = (edited - reference).square().sum(-1)
        ref2 = reference.square().sum(-1)
        for name, mask in groups.items():
            if not bool(mask.any()):
                out[name][key] = float("nan")
                continue
            denom = float(ref2[mask].sum())
            num = float(diff2[mask].sum())
            out[name][key] = (num / denom) ** 0.5 if denom > 0 else num**0.5
    return {name: SiteResiduals(values) for name, values in out.items()}


@torch.no_grad()
def pair_residuals(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    pairs: Sequence[PromptPair],
    token_policy: str,
    *extra_policies: str,
) -> tuple[SiteResiduals, float | None] | tuple[dict[str, SiteResiduals], float | None]:
    """K/V residuals of target prompts (edited) against anchor prompts (original), and the pooled residual.

    With ``extra_policies`` the residuals come back as ``{policy: SiteResiduals}`` for every policy,
    from one pass over the prompts.
    """
    anchor_keys: dict[tuple[str, str | None], int] = {}
    rows = [anchor_keys.setdefault((p.anchor, p.prefix), len(anchor_keys)) for p in pairs]
    targets = [Prompt(p.target, p.prefix) for p in pairs]
    anchors = [Prompt(t, prefix) for t, prefix in anchor_keys]
    enc_t, enc_a = _ids(model, targets), _ids(model, anchors)
    orig, orig_pooled = prompt_embeddings(model, [e.ids for e in enc_a])
    with EditedEncoders(model, deltas):
        edit, edit_pooled = prompt_embeddings(model, [e.ids for e in enc_t])
    results = {}
    for policy in (token_policy, *extra_policies):
        positions = pair_positions(policy, pairs, enc_t[0], enc_a[0], rows)
        x = edit[positions.t_rows, positions.t_pos]
        y = orig[positions.a_rows, positions.a_pos]
        results[policy] = _site_residuals(model, deltas, x, y, {"all": torch.ones(len(x), dtype=torch.bool)})["all"]
    pooled = None
    if orig_pooled is not None and edit_pooled is not None:
        reference = orig_pooled[torch.tensor(rows)].double()
        pooled = float(torch.linalg.norm(edit_pooled.double() - reference) / torch.linalg.norm(reference))
    return (results if extra_policies else results[token_policy]), pooled


@torch.no_grad()
def drift(
    model: EditModel, deltas: Mapping[str, LowRankDelta], prompts: Sequence[Prompt], *, by_prefix: bool = False
) -> SiteResiduals | dict[str, SiteResiduals]:
    """K/V drift of prompts that should be unaffected, over every position.

    With ``by_prefix``: ``{"all", "concepts", "unrelated"}`` — all prompts, those built from a template
    (preserve concepts), and the others — from one pass.
    """
    enc = _ids(model, [Prompt(p.text, None) for p in prompts])
    rows, pos = single_positions("all", enc[0])
    orig, _ = prompt_embeddings(model, [e.ids for e in enc])
    with EditedEncoders(model, deltas):
        edit, _ = prompt_embeddings(model, [e.ids for e in enc])
    templated = torch.tensor([p.prefix is not None for p in prompts])[rows]
    groups = {"all": torch.ones_like(templated)}
    if by_prefix:
        groups.update(concepts=templated, unrelated=~templated)
    result = _site_residuals(model, deltas, edit[rows, pos], orig[rows, pos], groups)
    return result if by_prefix else result["all"]


def delta_norms(model: EditModel, deltas: Mapping[str, LowRankDelta]) -> dict[str, float]:
    """``||ΔW||_F / ||W||_F`` per site."""
    norms = {}
    for key, delta in deltas.items():
        weight_norm = float(torch.linalg.norm(model.weight(key).double()))
        norms[key] = delta.frobenius_norm() / weight_norm if weight_norm > 0 else float("inf")
    return norms


def feature_metrics(
    model: EditModel,
    deltas: Mapping[str, LowRankDelta],
    *,
    pairs: Sequence[PromptPair],
    token_policy: str,
    heldout: Sequence[PromptPair] = (),
    preserve: Sequence[Prompt] = (),
) -> dict:
    """Every feature-level metric of one erasure, as JSON-ready data."""
    train, pooled = pair_residuals(model, deltas, pairs, token_policy)
    metrics: dict = {**train.summary("residual_train")}
    if pooled is not None:
        metrics["pooled_residual_train"] = pooled
    if heldout:
        held_by_policy, held_pooled = pair_residuals(model, deltas, heldout, token_policy, "all")
        metrics.update(held_by_policy[token_policy].summary("residual_heldout"))
        metrics["residual_heldout_all"] = held_by_policy["all"].mean()
        if held_pooled is not None:
            metrics["pooled_residual_heldout"] = held_pooled
    else:
        metrics.update({"residual_heldout": None, "residual_heldout_k": None, "residual_heldout_v": None,
                        "residual_heldout_all": None})
    # preserve_drift, and the two kinds of prompts inside it: those built from preserve concepts (the
    # solver saw them under soft/exact preservation) and unrelated ones (it never did)
    if preserve:
        drifts = drift(model, deltas, preserve, by_prefix=True)
        metrics.update(drifts["all"].summary("preserve_drift"))
        metrics["drift_preserve_concepts"] = drifts["concepts"].mean()
        metrics["drift_unrelated"] = drifts["unrelated"].mean()
    else:
        metrics.update({"preserve_drift": None, "preserve_drift_k": None, "preserve_drift_v": None,
                        "drift_preserve_concepts": None, "drift_unrelated": None})
    norms = delta_norms(model, deltas)
    metrics["delta_norm_rel"] = norms
    metrics["delta_norm_total"] = float(sum(d.frobenius_norm() ** 2 for d in deltas.values()) ** 0.5)
    metrics["delta_norm_kv"] = float(sum(d.frobenius_norm() ** 2 for k, d in deltas.items() if is_kv_key(k)) ** 0.5)
    metrics["residual_train_per_site"] = train.per_site
    return metrics
