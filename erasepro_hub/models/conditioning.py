"""How a family's denoiser reads its text encoders, and where each token lands in what it reads.

The *prompt embedding* is what the denoiser reads row by row: on SD 1.x/2.x the text encoder's sequence output,
on SDXL both encoders' side by side, on SD 3 the two CLIPs' side by side (zero-padded to the transformer's width)
followed along the sequence by T5's, on FLUX.1 T5's alone. The *pooled vector* is the pooled outputs of some
encoders, concatenated. :data:`CONDITIONING` says this per family, as data; the functions here compose the
prompt embedding from the encoders' outputs exactly as the diffusers pipelines do, and map each encoder's
token positions (:mod:`.prompts`) to rows of it, for the final stage and every metric.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping, Sequence

import torch

from .prompts import DEFAULT_SURPLUS, Encoded, PairPositions, PromptPair, pair_positions, single_positions

if TYPE_CHECKING:
    from .base import EditModel


@dataclass(frozen=True)
class Conditioning:
    """How the denoiser reads the encoders: the *prompt embedding* and the pooled vector.

    ``segments``: the prompt embedding is these segments concatenated along the sequence (SD 3: the CLIP
    states, then the T5 states); a segment is the sequence outputs of its encoders (indices into the family's
    encoders) concatenated along the features (SDXL, SD 3's two CLIPs), zero-padded to the denoiser's width
    where ``pad`` (SD 3). ``pooled``: the encoders whose pooled outputs, concatenated, form the pooled vector.
    ``sequence_sites``/``pooled_sites``: the denoiser's linear layers that read the prompt embedding row by
    row / the pooled vector — the final stage (module paths; ``unet`` ones are found by suffix). ``pooled_match``:
    the pooled vector is matched inside the last pooled encoder (SDXL: its ``pooled`` stage), not at a site.
    """

    segments: tuple[tuple[int, ...], ...]
    pooled: tuple[int, ...] = ()
    sequence_sites: tuple[str, ...] = ()
    pooled_sites: tuple[str, ...] = ()
    pad: bool = False

    @property
    def pooled_match(self) -> bool:
        return bool(self.pooled) and not self.pooled_sites


_MMDIT_SITES = {
    "sequence_sites": ("context_embedder",),
    "pooled_sites": ("time_text_embed.text_embedder.linear_1",),
}
CONDITIONING: dict[str, Conditioning] = {
    "sd1": Conditioning(((0,),)),
    "sd2": Conditioning(((0,),)),
    "sdxl": Conditioning(((0, 1),), pooled=(1,)),
    "bert": Conditioning(((0,),)),
    "sd3": Conditioning(((0, 1), (2,)), pooled=(0, 1), pad=True, **_MMDIT_SITES),
    "flux": Conditioning(((1,),), pooled=(0,), **_MMDIT_SITES),
}


def compose_segment(model: EditModel, sequences: Sequence[torch.Tensor]) -> torch.Tensor:
    """One segment of the prompt embedding: its encoders' sequence outputs side by side, zero-padded to the
    denoiser's width where the family pads (SD 3)."""
    # a 16-bit T5 beside float32 CLIPs: its outputs cast to the model's dtype (exact when that is float32)
    sequences = [s.to(model.dtype) for s in sequences]
    part = sequences[0] if len(sequences) == 1 else torch.cat(sequences, dim=-1)
    if model.conditioning.pad and part.shape[-1] < model.cross_attention_dim:
        part = torch.nn.functional.pad(part, (0, model.cross_attention_dim - part.shape[-1]))
    return part


def compose(model: EditModel, sequences: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The prompt embedding from each encoder's sequence output (``(n, L_i, d_i)``; ``None`` for an encoder no
    segment reads): the segments (:func:`compose_segment`) one after the other along the sequence
    (:class:`Conditioning`)."""
    parts = [compose_segment(model, [sequences[i] for i in segment]) for segment in model.conditioning.segments]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def pooled_vector(model: EditModel, pooled: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The pooled vector from each encoder's pooled output (``None`` where the family has none)."""
    chosen = [pooled[i].to(model.dtype) for i in model.conditioning.pooled]
    return torch.cat(chosen, dim=-1) if chosen else None


def _segments(model: EditModel, encoded: Sequence[Encoded]):
    """``(first encoder, offset, causal)`` of each segment: where its rows start in the prompt embedding."""
    offset = 0
    for segment in model.conditioning.segments:
        first = segment[0]
        yield first, offset, all(model.text_encoders[i].arch.causal for i in segment)
        offset += encoded[first].length


def joint_pair_positions(
    model: EditModel,
    policy: str,
    pairs: Sequence[PromptPair],
    target: Sequence[Encoded],
    anchor: Sequence[Encoded],
    anchor_rows: Sequence[int],
    *,
    surplus: str = DEFAULT_SURPLUS,
) -> PairPositions:
    """:func:`~.prompts.pair_positions` in the rows of the prompt embedding: each segment's pairs (by its own
    tokenizer; a bidirectional encoder's prefix included), shifted by where the segment starts."""
    found = {
        first: pair_positions(policy, pairs, target[first], anchor[first], anchor_rows, causal=causal, surplus=surplus)
        for first, _, causal in _segments(model, target)
    }
    return join_pairs(model, target, found)


def join_pairs(model: EditModel, encoded: Sequence[Encoded], positions: Mapping[int, PairPositions]) -> PairPositions:
    """Pair positions in the rows of the prompt embedding from each segment's own (``positions[i]``: those of
    encoder ``i``, the segment's first), shifted by where the segment starts."""
    found = []
    for first, offset, _ in _segments(model, encoded):
        p = positions[first]
        found.append(PairPositions(p.t_rows, p.t_pos + offset, p.a_rows, p.a_pos + offset))
    if len(found) == 1:
        return found[0]
    cat = lambda name: torch.cat([getattr(p, name) for p in found])  # noqa: E731
    return PairPositions(cat("t_rows"), cat("t_pos"), cat("a_rows"), cat("a_pos"))


def joint_single_positions(
    model: EditModel, policy: str, encoded: Sequence[Encoded], *, padding: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`~.prompts.single_positions` in the rows of the prompt embedding."""
    rows, pos = [], []
    for first, offset, _ in _segments(model, encoded):
        r, p = single_positions(policy, encoded[first], padding=padding)
        rows.append(r)
        pos.append(p + offset)
    return torch.cat(rows), torch.cat(pos)


def own_tokens(model: EditModel, encoded: Sequence[Encoded]) -> torch.Tensor:
    """``(n, L)``: each prompt's own tokens in the prompt embedding — in every segment, BOS to its first
    end-of-text token."""
    masks = []
    for first, _, _ in _segments(model, encoded):
        e = encoded[first]
        masks.append(torch.arange(e.length)[None, :] <= torch.tensor(e.eos)[:, None])
    return torch.cat(masks, dim=1)


def read_length(causal: bool, *positions: torch.Tensor) -> int | None:
    """How much of the window a pass must run to read ``positions``: up to the last of them in a causal encoder
    (a token's features depend only on the tokens up to it: absolute positions, causal attention); ``None``
    (the whole window) for a bidirectional one, or when nothing is read."""
    used = [int(p.max()) for p in positions if p.numel()]
    return max(used) + 1 if causal and used else None
