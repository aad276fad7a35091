"""Rendering the model card of an erasure.

The template is Jinja2 with ``StrictUndefined`` (a missing value is an error, never
an empty string). User strings — the base model's id, local path and revision, the
repository id and revision the card points to, names, concepts, descriptions,
prompts, the licence — are only ever *data*: they are passed as variables, never
used as template source, and are escaped for the place they land:

* Markdown text (the title, table cells, the description): HTML special characters
  become entities, every Markdown marker is backslash-escaped, line breaks and other
  control characters are neutralised, so nothing renders as a tag, heading, link,
  list or emphasis (:func:`md_inline`, :func:`md_text`).
* inline code in prose: a code span whose delimiter is longer than any backtick run
  inside, with control characters shown as escapes (:func:`md_code`).
* code blocks: Python string literals with every quote, backslash and non-printable
  character escaped (:func:`py_literal`), shell words quoted (:func:`sh_word`), and a
  fence longer than any backtick run in the block (:func:`fenced`).
* the YAML front matter: written by a YAML dumper from a dict, never by string
  concatenation (:func:`erasepro_hub.hub.card_data.dump_front_matter`).

What the card shows is what the release holds: sample images (and the front matter's ``widget``
entries that put them in the Hub's gallery) only when image evaluation wrote them and the manifest
hashes them, i.e. when ``push`` uploads them (:func:`sample_widget`); the note on what loading logs
only for an adapter that leaves a part of the pipeline untouched (:func:`load_warnings`).

The repository id and revision a card points to are inputs of ``erasepro card`` and
``erasepro push``; :func:`check_repo_id` and :func:`check_revision` refuse those that
the Hub could not hold anyway (whitespace, control characters, backticks).

Why one module of this length: the escaping filters and the context they are applied to are one
security contract; keeping them beside the card's context makes every user string's route visible.
"""

from __future__ import annotations

import json
import re
import shlex
import unicodedata
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..errors import InvalidRefError
from ..layout import CARD_FILE, PLOT_FILE, SAMPLES_FILE
from ..manifest import Manifest, dump_yaml
from ..manifest.schema import HUB_ID_RE
from ..naming import is_denoiser_key

TEMPLATE = "model_card.md.j2"
_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~$])")
#: bidirectional overrides and isolates: they reorder what a reader sees
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
_LINE_BREAK = re.compile(r"\r\n|[\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029]")


def _is_control(char: str) -> bool:
    return unicodedata.category(char) in ("Cc", "Cs", "Zl", "Zp") or char in _BIDI


def _one_line(text: str) -> str:
    """Every control character (line breaks included) becomes a space."""
    return "".join(" " if _is_control(char) else char for char in text)


def _escape_char(char: str) -> str:
    """A Python escape sequence for one character."""
    named = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
    if char in named:
        return named[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _visible(text: str) -> str:
    """Control characters written as Python escapes, so they show instead of acting."""
    return "".join(_escape_char(char) if _is_control(char) else char for char in text)


def md_inline(value: Any) -> str:
    """Escape a user string for inline Markdown (and a table cell): no markup, no HTML, one line.

    ``&``, ``<`` and ``>`` become entities (safe in every Markdown dialect, unlike a backslash before
    ``<``), Markdown markers are backslash-escaped, and the ``:`` of ``scheme://``, the ``.`` of
    ``www.`` and ``@`` are escaped so that no bare URL or address is turned into a link.
    """
    text = _one_line(str(value)).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    text = _MD_SPECIAL.sub(r"\\\1", text)
    text = re.sub(r":(?=//)", r"\\:", text)
    text = re.sub(r"(?i)\b(www)\.", r"\1\\.", text)
    return text.replace("@", "\\@")


_BLOCK_START = re.compile(r"^([-=]|\d{1,9}(?=[.)]))")


def md_text(value: Any) -> str:
    """Escape a free-text paragraph: keep its line breaks, but every line is plain text.

    Each line is escaped as :func:`md_inline` does and stripped (no indented code block), and a
    leading ``-``, ``=`` or ``1.`` is escaped, so no line starts a heading, rule, list, quote or fence.
    """
    lines = (md_inline(line).strip() for line in _LINE_BREAK.split(str(value)))
    return "\n".join(_BLOCK_START.sub(lambda m: m.group(1) + "\\" if m.group(1).isdigit() else "\\" + m.group(1), line)
                     for line in lines).strip("\n")


def md_code(value: Any) -> str:
    """A user string as an inline code span in prose (or as escaped text where a span cannot hold it).

    The delimiter is one backtick longer than any run inside, so the span cannot be closed early;
    control characters are shown as escapes, so it stays on its line. A string with ``<``, ``>``
    or ``&`` is written as escaped text instead: a code span shows entities literally.
    """
    text = _visible(str(value))
    if not text or re.search(r"[<>&]", text):
        return md_inline(text)
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    delimiter = "`" * (longest + 1)
    pad = " " if text[0] in "` " or text[-1] in "` " else ""
    return f"{delimiter}{pad}{text}{pad}{delimiter}"


def py_literal(value: Any) -> str:
    """A Python string literal: quotes, backslashes and every non-printable character escaped.

    JSON's escapes are valid Python; what JSON leaves as it is (line and paragraph separators,
    bidirectional controls, DEL, lone surrogates) is escaped too, so the literal is one line.
    """
    text = json.dumps(str(value), ensure_ascii=False)
    return "".join(char if char.isprintable() or char == " " else _escape_char(char) for char in text)


def sh_word(value: Any) -> str:
    """One shell word (quoted only where needed), for a ``bash`` block."""
    return shlex.quote(_visible(str(value)))


def fence_for(text: str) -> str:
    """A backtick fence longer than any backtick run in ``text`` (so ``text`` cannot close it)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    return "`" * max(3, longest + 1)


def fenced(text: str, language: str = "") -> str:
    """``text`` as a fenced code block whose fence it cannot close."""
    body = text if text.endswith("\n") else text + "\n"
    fence = fence_for(body)
    return f"{fence}{language}\n{body}{fence}"


_GIT_FORBIDDEN = re.compile(r"[~^:?*\[\\]|\.\.|@\{|//")


def check_revision(revision: str) -> str:
    """Return ``revision`` if it can name a branch, tag or commit on the Hub; else raise :class:`InvalidRefError`.

    Refused: the empty string, whitespace and control characters (a line break would end the code
    line that loads it), backticks (they would close the code around it), and what Git does not
    allow in a ref name (``~ ^ : ? * [ \\``, ``..``, ``@{``, ``//``, a leading or trailing ``/``,
    a trailing ``.`` or ``.lock``).
    """
    if not isinstance(revision, str) or not revision:
        raise InvalidRefError("the revision is empty; give a branch, tag or commit sha")
    bad = sorted({c for c in revision if c.isspace() or not c.isprintable() or _is_control(c) or c == "`"})
    if bad:
        shown = ", ".join(repr(char) for char in bad)
        raise InvalidRefError(
            f"revision {revision!r} contains {shown}; a branch, tag or commit sha has no whitespace, "
            "control characters or backticks"
        )
    if (
        _GIT_FORBIDDEN.search(revision)
        or revision.startswith(("/", "-"))
        or revision.endswith(("/", ".", ".lock"))
        or revision == "@"
    ):
        raise InvalidRefError(
            f"revision {revision!r} is not a valid branch or tag name (no '~ ^ : ? * [ \\', '..', '@{{' or '//', "
            "nor a leading '/' or '-', nor a trailing '/', '.' or '.lock')"
        )
    return revision


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it is a Hub repository id ``user/name``; else raise :class:`InvalidRefError`."""
    if not isinstance(repo_id, str) or not HUB_ID_RE.fullmatch(repo_id):
        raise InvalidRefError(
            f"repository id {repo_id!r} is not 'user/name' (letters, digits, '.', '_' and '-', "
            "at most 96 each, starting with a letter or digit)"
        )
    return repo_id


def _template_source() -> str:
    try:
        return resources.files("erasepro_hub.templates").joinpath(TEMPLATE).read_text(encoding="utf-8")
    except (ModuleNotFoundError, FileNotFoundError):  # running from a source tree without installing
        return (Path(__file__).resolve().parents[2] / "templates" / TEMPLATE).read_text(encoding="utf-8")


def _environment():
    from jinja2 import Environment, StrictUndefined

    env = Environment(undefined=StrictUndefined, autoescape=False, keep_trailing_newline=True, trim_blocks=False)
    env.filters.update(md=md_inline, text=md_text, code=md_code, py=py_literal, sh=sh_word, fenced=fenced)
    return env


def _fmt(value: float) -> str:
    return f"{value:.3e}" if abs(value) < 1e-2 or abs(value) >= 1e3 else f"{value:.4f}"


METRIC_ROWS = (
    ("anchor_similarity", "held-out prompts: similarity to the anchor (1 = erased)"),
    ("anchor_similarity_no_edit", "  the same before the erasure"),
    ("preserve_similarity", "unrelated prompts: similarity to before (1 = untouched)"),
    ("preserve_similarity_min", "  the least similar unrelated prompt"),
    ("residual_train", "K/V residual, training prompts"),
    ("residual_train_k", "  K only"),
    ("residual_train_v", "  V only"),
    ("residual_heldout", "K/V residual, held-out prompts"),
    ("preserve_drift", "K/V drift, preserve and unrelated prompts"),
    ("pooled_residual_train", "pooled-embedding residual, training prompts"),
    ("pooled_residual_heldout", "pooled-embedding residual, held-out prompts"),
    ("delta_norm_total", "total ‖ΔW‖_F"),
)


IMAGE_ROWS = (
    ("clip_score_target", "CLIP score vs the erased concept, its prompts"),
    ("zero_shot_target_accuracy", "zero-shot CLIP accuracy for the erased concept"),
    ("detector_score_target", "detector score, its prompts"),
)
IMAGE_PAIR_ROWS = (
    ("clip_fid_preserve", "CLIP-FID edited vs base, caption prompts"),
    ("clip_kid_preserve", "CLIP-KID edited vs base, caption prompts"),
)


#: The before/after grid ``erasepro eval --images`` writes into the folder: the base model's images of
#: the first prompts about the erased concepts on top, the same prompts and seeds with the erasure below.


def sample_widget(manifest: Manifest) -> list[dict]:
    """The ``widget`` entries (prompt, image) of the sample images a release publishes; empty without any.

    The grid is shown only when image evaluation ran (``metrics.images``) and the manifest hashes the file:
    ``push`` uploads the hashed files (besides the manifest, card and plot) and ``pull`` refuses a
    repository that holds other files, so an unhashed image would be a broken link on the Hub. Its prompt
    is the grid's first column: evaluation renders the training prompts first, in recipe order.
    """
    outputs = manifest.outputs
    if outputs is None or not (manifest.metrics or {}).get("images") or SAMPLES_FILE not in outputs.files:
        return []
    from ..recipe import training_pairs

    first = training_pairs(manifest.recipe())[0].target
    return [{"text": first, "output": {"url": SAMPLES_FILE}}]


#: What diffusers' ``load_lora_weights`` loads into, per family: the key prefix, the class its log names,
#: and the part of the pipeline in words. (BERT text encoders are not loaded by diffusers.)
_SD_COMPONENTS = (("unet", "UNet2DConditionModel", "the UNet"), ("text_encoder", "CLIPTextModel", "the text encoder"))
LORA_COMPONENTS = {
    "sd1": _SD_COMPONENTS,
    "sd2": _SD_COMPONENTS,
    "sdxl": _SD_COMPONENTS + (("text_encoder_2", "CLIPTextModelWithProjection", "the second text encoder"),),
    "sd3": (
        ("transformer", "SD3Transformer2DModel", "the transformer"),
        ("text_encoder", "CLIPTextModelWithProjection", "the text encoder"),
        ("text_encoder_2", "CLIPTextModelWithProjection", "the second text encoder"),
    ),
    "flux": (
        ("transformer", "FluxTransformer2DModel", "the transformer"),
        ("text_encoder", "CLIPTextModel", "the text encoder"),
    ),
}
#: The families whose denoiser is an MMDiT: the final stage is the transformer's text-input linears, not K/V
MMDIT_FAMILIES = ("sd3", "flux")
#: The diffusers pipeline class of each family (the card's usage snippet)
PIPELINE_CLASSES = {
    "sdxl": "StableDiffusionXLPipeline",
    "sd3": "StableDiffusion3Pipeline",
    "flux": "FluxPipeline",
}


def load_warnings(manifest: Manifest) -> list[dict]:
    """The parts of the pipeline the adapter holds no keys for, each with the warning diffusers logs for it.

    ``load_lora_weights`` logs ``No LoRA keys associated to <class> found with the prefix='<prefix>'. …``
    for every such part at every load; for an erasure that is expected (a text-encoder-only erasure has
    no UNet keys, a UNet-only one no text-encoder keys).
    """
    outputs = manifest.outputs
    if outputs is None:
        return []
    stored = {site.name.partition(".")[0] for site in outputs.sites if site.update_rank}
    return [
        {"part": part, "log": f"No LoRA keys associated to {cls} found with the prefix='{prefix}'."}
        for prefix, cls, part in LORA_COMPONENTS.get(outputs.family, ())
        if prefix not in stored
    ]


def _revision_kind(revision: str, known: str | None) -> str:
    """``commit``, ``tag``, ``branch``, or ``ref`` when the caller does not know which."""
    if re.fullmatch(r"[0-9a-f]{40}", revision):
        return "commit"
    if known is not None:
        return known
    return "branch" if revision == "main" or revision.startswith("refs/heads/") else "ref"


def card_context(
    manifest: Manifest, *, repo_id: str | None = None, revision: str | None = None, revision_kind: str | None = None
) -> dict:
    """Everything the template needs, as plain data (no I/O).

    ``revision_kind`` (``tag`` or ``branch``) says what ``revision`` names when the caller knows it (a push).
    A ``repo_id`` or ``revision`` that is given is checked first (:func:`check_repo_id`,
    :func:`check_revision`); without them the card shows placeholders and ``main``.
    """
    from ..hub.card_data import card_metadata, card_tags, dump_front_matter

    if repo_id is not None:
        check_repo_id(repo_id)
    if revision is not None:
        check_revision(revision)

    outputs = manifest.outputs
    metrics = manifest.metrics or {}
    base = manifest.base_model
    family = outputs.family if outputs is not None else "sd1"
    repo_id = repo_id if repo_id is not None else "<user>/<repo>"
    revision = revision if revision is not None else "main"
    hub_base = base.id if base.kind == "hub" else None
    license_ = outputs.base_license if outputs is not None else None
    name = manifest.name or "erasure"
    widget = sample_widget(manifest)
    mmdit = family in MMDIT_FAMILIES
    feature = "text-input" if mmdit else "K/V"  # what the residual, drift and similarity rows measure
    front = card_metadata(
        model_name=name, base_model=hub_base, license=license_, tags=card_tags(family), metrics=metrics, widget=widget,
        feature=feature,
    )
    usage = {
        "pipeline_class": PIPELINE_CLASSES.get(family, "StableDiffusionPipeline"),
        "base_kind": base.kind,
        "base_id": base.id,
        "base_revision": base.revision,
        "builtin_name": base.builtin_name if base.kind == "builtin" else None,
    }
    recipe_yaml = dump_yaml(manifest.recipe())
    sites = outputs.sites if outputs is not None else []
    baseline = metrics.get("baseline_uce") or {}
    rows = [
        {"name": label.replace("K/V", feature), "value": _fmt(float(metrics[key])),
         "baseline": _fmt(float(baseline[key])) if baseline.get(key) is not None else "–"}
        for key, label in METRIC_ROWS
        if metrics.get(key) is not None
    ]
    images = metrics.get("images") or {}
    image_rows = [
        {"name": label, "base": _fmt(float(images[f"{key}_base"])), "edited": _fmt(float(images[f"{key}_edited"]))}
        for key, label in IMAGE_ROWS
        if images.get(f"{key}_base") is not None
    ]
    image_rows += [
        {"name": label, "base": "–", "edited": _fmt(float(images[key]))} for key, label in IMAGE_PAIR_ROWS if images.get(key) is not None
    ]
    provenance = manifest.provenance
    libraries = sorted((provenance.libraries if provenance else {}).items())
    return {
        "front_matter": dump_front_matter(front),
        "title": f"{name}: concept erasure for {base.id}",
        "description": manifest.description or "",
        "base": {
            "id": base.id,
            "revision": base.revision,
            "url": f"https://huggingface.co/{quote(base.id, safe='/')}" if hub_base else None,
        },
        "method": manifest.method,
        "family": family,
        "mmdit": mmdit,
        "concepts": [{"target": c.target, "anchor": c.anchor} for c in manifest.concepts],
        "n_sites": sum(1 for s in sites if s.update_rank),
        "n_te_sites": sum(1 for s in sites if s.update_rank and s.name.startswith("text_encoder")),
        "n_kv_sites": sum(1 for s in sites if s.update_rank and is_denoiser_key(s.name)),
        "usage": usage,
        "repo_id": repo_id,
        "revision": revision,
        "revision_kind": _revision_kind(revision, revision_kind),
        "metrics": rows,
        "has_baseline": bool(baseline) and manifest.method != "uce",
        "image_rows": image_rows,
        "image_info": {k: images.get(k) for k in ("clip_model", "n_target_images", "n_preserve_images", "steps")},
        "samples": [entry["output"]["url"] for entry in widget],
        "load_warnings": load_warnings(manifest),
        "plot": PLOT_FILE,
        "recipe_yaml": recipe_yaml,
        "tool_version": provenance.tool_version if provenance else "unknown",
        "libraries": [(k, v) for k, v in libraries if k in ("torch", "diffusers", "transformers")],
    }


def render_card(
    manifest: Manifest, *, repo_id: str | None = None, revision: str | None = None, revision_kind: str | None = None
) -> str:
    """The model card (README.md) of an erasure."""
    context = card_context(manifest, repo_id=repo_id, revision=revision, revision_kind=revision_kind)
    return _environment().from_string(_template_source()).render(**context)


def write_card(
    folder: str | Path,
    manifest: Manifest,
    *,
    repo_id: str | None = None,
    revision: str | None = None,
    revision_kind: str | None = None,
) -> list[str]:
    """Write ``README.md`` and the plot into ``folder``; returns the file names written."""
    from .plot import site_norm_plot

    folder = Path(folder)
    series = {manifest.method: {s.name: s.delta_norm_rel for s in manifest.outputs.sites} if manifest.outputs else {}}
    baseline = (manifest.metrics or {}).get("baseline_uce") or {}
    if baseline.get("delta_norm_rel") and manifest.method != "uce":
        series["uce (baseline, same prompts)"] = baseline["delta_norm_rel"]
    site_norm_plot(series, folder / PLOT_FILE, title=f"{manifest.name or 'erasure'}: per-site update norm")
    card = render_card(manifest, repo_id=repo_id, revision=revision, revision_kind=revision_kind)
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    return [CARD_FILE, PLOT_FILE]
