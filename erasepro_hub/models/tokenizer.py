"""The real CLIP BPE tokenizer, built offline from the merge list shipped in this package.

``assets/bpe_simple_vocab_16e6.txt.gz`` is OpenAI CLIP's merge list (MIT, see
``assets/LICENSE-CLIP-BPE.txt``). The vocabulary follows the standard recipe:
256 byte symbols, their ``</w>`` forms, one token per merge (48,894 merges), then
``<|startoftext|>`` and ``<|endoftext|>``: 49,408 tokens, the ids of the Hub's
CLIP ViT-L/14 tokenizer.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from importlib import resources

VOCAB_SIZE = 49408
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
BOS_ID = 49406
EOS_ID = 49407
_N_MERGES = VOCAB_SIZE - 2 * 256 - 2


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes)))


@lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """``(vocab, merges)`` of the CLIP tokenizer, read from the packaged merge list."""
    raw = resources.files("erasepro_hub.models").joinpath("assets/bpe_simple_vocab_16e6.txt.gz").read_bytes()
    lines = gzip.decompress(raw).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _N_MERGES + 1]]
    symbols = list(_bytes_to_unicode().values())
    vocab_list = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: index for index, token in enumerate(vocab_list)}
    if len(vocab) != VOCAB_SIZE:  # pragma: no cover - guards a corrupted asset
        raise RuntimeError(f"packaged CLIP vocabulary has {len(vocab)} tokens, expected {VOCAB_SIZE}")
    return vocab, merges  # type: ignore[return-value]


def clip_tokenizer(model_max_length: int = 77, pad_token: str = EOS_TOKEN):
    """A ``transformers.CLIPTokenizer`` with the real CLIP vocabulary, built without any download.

    Args:
        model_max_length: the padded length (77 for every released SD model).
        pad_token: ``<|endoftext|>`` as in SD 1.x, or ``"!"`` (id 0) as in SD 2.x and SDXL's second tokenizer.
    """
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token=EOS_TOKEN,
        bos_token=BOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=pad_token,
        model_max_length=model_max_length,
    )
