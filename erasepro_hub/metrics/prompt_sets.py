"""Evaluation prompt sets, loaded with ``datasets`` from a local file or a Hub dataset pinned to a commit.

A prompt set is a table with a ``prompt`` column and, optionally:

* ``set`` — ``heldout`` (a prompt about an erased concept) or ``preserve`` (a prompt that
  should be unaffected). Default: ``heldout`` when the row has an ``anchor_prompt`` or its
  prompt contains a target concept, else ``preserve``;
* ``anchor_prompt`` — the anchor counterpart of a held-out prompt. Default: the prompt with
  the (case-insensitive) target replaced by its anchor; a held-out row whose prompt does not
  contain a target (a misspelling, say) must give it.

Sources: ``path/to/prompts.{json,jsonl,csv,parquet}``, or ``org/name[@revision][:split]`` for a
Hub dataset (the revision is resolved to a commit sha and recorded). ``split`` is a split name or a
``datasets`` split expression (``test[:100]``, ``train+test``); a split the dataset lacks, and a file
the dataset library cannot parse, are a :class:`~erasepro_hub.errors.ManifestError` naming them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ..errors import ManifestError
from ..models.prompts import Prompt, PromptPair

FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


@dataclass
class PromptSet:
    heldout: list[PromptPair] = field(default_factory=list)
    preserve: list[Prompt] = field(default_factory=list)
    source: str = ""
    revision: str | None = None

    def __len__(self) -> int:
        return len(self.heldout) + len(self.preserve)


def _replace_concept(prompt: str, concepts: Sequence[tuple[str, str]]) -> str | None:
    for target, anchor in concepts:
        pattern = re.compile(re.escape(target), re.IGNORECASE)
        if pattern.search(prompt):
            return re.sub(r"\s+", " ", pattern.sub(anchor, prompt)).strip()
    return None


def rows_to_prompt_set(rows: Sequence[dict], concepts: Sequence[tuple[str, str]], *, source: str = "") -> PromptSet:
    """Classify rows into held-out pairs and preserve prompts (see the module docs)."""
    result = PromptSet(source=source)
    for index, row in enumerate(rows):
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise ManifestError(f"{source}: row {index}: 'prompt' must be a non-empty string")
        anchor = row.get("anchor_prompt")
        kind = row.get("set")
        derived = _replace_concept(prompt, concepts)
        if kind is None:
            kind = "heldout" if (isinstance(anchor, str) and anchor.strip()) or derived is not None else "preserve"
        if kind == "preserve":
            result.preserve.append(Prompt(prompt))
        elif kind == "heldout":
            anchor = anchor if isinstance(anchor, str) and anchor.strip() else derived
            if anchor is None:
                raise ManifestError(
                    f"{source}: row {index}: held-out prompt {prompt!r} names no target concept; give its anchor_prompt"
                )
            result.heldout.append(PromptPair(prompt, anchor))
        else:
            raise ManifestError(f"{source}: row {index}: set must be 'heldout' or 'preserve', got {kind!r}")
    return result


def parse_dataset_ref(spec: str) -> tuple[str, str | None, str]:
    """``org/name[@rev][:split]`` → ``(repo_id, revision, split)``."""
    repo_part, _, split = spec.partition(":")
    repo_id, _, revision = repo_part.partition("@")
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*", repo_id):
        raise ManifestError(
            f"--prompts {spec!r}: not a file (.json, .jsonl, .csv, .parquet) nor a Hub dataset 'org/name[@rev][:split]'"
        )
    return repo_id, revision or None, split or "train"


def _reason(exc: BaseException, limit: int = 300) -> str:
    """An exception (or, for the dataset library's wrapper errors, its cause) as one short line."""
    cause = exc.__cause__ or exc.__context__ or exc
    text = " ".join(str(cause).split()) or type(cause).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def split_names(split: str) -> list[str]:
    """The split names a ``datasets`` split expression reads: ``"train[:10%]+test"`` → ``["train", "test"]``."""
    return [part.split("[", 1)[0].strip() for part in split.split("+")]


def _load_table(spec: str, split: str, **source):
    """Prepare a dataset and return one split of it; unknown splits and unreadable files are ManifestErrors."""
    import datasets
    from datasets.exceptions import DatasetGenerationError
    from pyarrow import ArrowException

    try:
        builder = datasets.load_dataset_builder(**source)
        builder.download_and_prepare()
    except (DatasetGenerationError, ArrowException) as exc:
        raise ManifestError(f"--prompts {spec}: cannot read the prompts ({_reason(exc)})") from None
    available = list(builder.info.splits or {})
    unknown = [name for name in split_names(split) if name not in available]
    if unknown:
        raise ManifestError(
            f"--prompts {spec}: the dataset has no split {unknown[0]!r}; available: {', '.join(available) or 'none'}"
        )
    try:
        return builder.as_dataset(split=split)
    except ValueError as exc:  # a malformed split expression, e.g. "train[:x]"
        raise ManifestError(f"--prompts {spec}: split {split!r} cannot be read: {_reason(exc)}") from None


def load_prompt_set(spec: str, concepts: Sequence[tuple[str, str]]) -> PromptSet:
    """Load a prompt set from a local file or a Hub dataset (revision resolved to a commit)."""
    path = Path(spec).expanduser()
    revision = None
    if path.exists():
        builder = FORMATS.get(path.suffix.lower())
        if builder is None:
            raise ManifestError(f"--prompts {spec}: unsupported file type {path.suffix!r}; use {', '.join(FORMATS)}")
        if not path.is_file():
            raise ManifestError(f"--prompts {spec}: not a file")
        table = _load_table(spec, "train", path=builder, data_files=str(path))
    else:
        from ..hub.client import resolve_revision

        repo_id, rev, split = parse_dataset_ref(spec)
        revision = resolve_revision(repo_id, rev, repo_type="dataset")
        table = _load_table(spec, split, path=repo_id, revision=revision)
    if "prompt" not in table.column_names:
        raise ManifestError(f"--prompts {spec}: needs a 'prompt' column, has {', '.join(table.column_names)}")
    result = rows_to_prompt_set(list(table), concepts, source=spec)
    result.revision = revision
    return result
