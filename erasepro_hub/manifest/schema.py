"""The manifest: one YAML file that says how an erasure was made and lets anyone remake it.

A manifest has two halves. The *recipe* (:class:`Recipe`) is the input: base model,
method, concepts, prompts and every solver setting. ``erase`` then adds
``outputs`` (file hashes, weight fingerprints, per-site records), ``metrics`` and
``provenance``, giving a resolved :class:`Manifest`. ``regenerate`` needs nothing
but the recipe (and the base model). Every model is frozen and rejects unknown
keys, so a typo is an error that names the field, never a silent default.

Input limits (:mod:`.limits`, docs/design.md §4.2): every number must be finite, and the lists and
strings a manifest holds are capped so that what a manifest asks for stays bounded in memory and
time. A limit that is reached is an error that names the field, like any other.

Why one module of this length: the manifest is one nested format, and its models refer to each
other; split across files, the format could no longer be read top to bottom in one place.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from .limits import (
    MAX_CONCEPTS,
    MAX_DESCRIPTION,
    MAX_MODEL_ID,
    MAX_PROMPT_LIST,
    MAX_REVISION,
    MAX_TEMPLATES,
    MAX_TEXT,
    check_json_data,
    check_prompt_budget,
)

SCHEMA_VERSION = 1
BUILTIN_PREFIX = "builtin:"
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SHA_RE = re.compile(r"^[0-9a-f]{40}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")

Dtype = Literal["float32", "float16", "bfloat16"]

Text = Annotated[str, Field(max_length=MAX_TEXT)]


def _sha256_check(value: str) -> str:
    if not SHA256_RE.match(value):
        raise ValueError("must be a lower-case hex sha256")
    return value


Sha256 = Annotated[str, AfterValidator(_sha256_check)]


class _Strict(BaseModel):
    # allow_inf_nan=False: ``.inf`` and ``.nan`` are refused in every float field
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)


def _template_check(value: str) -> str:
    if value.count("{}") != 1:
        raise ValueError(f"template {value!r} must contain exactly one '{{}}' where the concept goes")
    if "\n" in value or "\r" in value:
        raise ValueError(f"template {value!r} must be a single line")
    return value


#: A prompt template: one line with exactly one ``{}`` where the concept goes.
Template = Annotated[str, Field(max_length=MAX_TEXT), AfterValidator(_template_check)]


# ----------------------------------------------------------------------------- recipe parts
class BaseModelRef(_Strict):
    """Which model is edited.

    ``id`` is ``builtin:<name>`` (an embedded model built in code), a local diffusers
    folder (an absolute path, or one starting with ``./``, ``../`` or ``~``), or a Hub
    repository ``org/name``. ``revision`` applies to Hub ids: a branch, tag or commit;
    ``erase`` records the 40-hex commit it resolved to.
    """

    id: str = Field(min_length=1, max_length=MAX_MODEL_ID)
    revision: str | None = Field(default=None, max_length=MAX_REVISION)

    @field_validator("id")
    @classmethod
    def _id_form(cls, value: str) -> str:
        if value != value.strip() or not value:
            raise ValueError("must not be empty or carry surrounding whitespace")
        if value.startswith(BUILTIN_PREFIX) or _is_local_path(value) or HUB_ID_RE.match(value):
            return value
        raise ValueError(
            f"{value!r} is neither 'builtin:<name>', a local folder (start it with '/', './', '../' "
            "or '~'), nor a Hub repository id 'org/name'"
        )

    @model_validator(mode="after")
    def _revision_only_for_hub(self) -> "BaseModelRef":
        if self.revision is not None and self.kind != "hub":
            raise ValueError(f"revision applies to Hub repositories only; remove it for {self.kind} base models")
        if self.revision is not None and not self.revision.strip():
            raise ValueError("revision must not be empty")
        return self

    @property
    def kind(self) -> Literal["builtin", "local", "hub"]:
        if self.id.startswith(BUILTIN_PREFIX):
            return "builtin"
        return "local" if _is_local_path(self.id) else "hub"

    @property
    def builtin_name(self) -> str:
        return self.id[len(BUILTIN_PREFIX) :]


def _is_local_path(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~")) or value in (".", "..")


class Concept(_Strict):
    """One erasure: prompts about ``target`` should behave like prompts about ``anchor``.

    ``anchor`` may be the empty string (UCE's choice for objects) but must be given.
    """

    target: str = Field(min_length=1, max_length=MAX_TEXT)
    anchor: Text

    @field_validator("target")
    @classmethod
    def _non_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be blank")
        return value

    @field_validator("target", "anchor")
    @classmethod
    def _one_line(cls, value: str) -> str:
        if "\n" in value or "\r" in value:
            raise ValueError("must be a single line")
        return value


PromptKind = Literal["style", "object", "person", "nudity", "other"]


class Prompts(_Strict):
    """Prompt templates; ``{}`` is replaced by the target (and, paired, the anchor).

    ``kind`` adds the first ``bank_size`` templates of the package's bank for that kind of concept
    (``erasepro_hub/banks/<kind>.txt``) after the manifest's own ``templates``; give either or both.
    ``erase`` writes the resolved list into ``templates`` (so the recorded manifest holds every
    template it used, and resolving it again changes nothing). ``misspellings`` adds soft targets:
    misspelled forms of each target should land near the anchor too, without counting as constraints.
    """

    templates: list[Template] = Field(default_factory=list, max_length=MAX_TEMPLATES)
    kind: PromptKind | None = None
    #: how many bank templates ``kind`` adds; chosen by measurement (docs/defaults.md)
    bank_size: int = Field(default=3, ge=1, le=40)
    #: every one-letter deletion of each target word (4+ letters), alone, kept near the bare anchor by a
    #: soft term of weight ``misspelling_weight`` (ErasePro methods; chosen by measurement, docs/defaults.md)
    misspellings: bool = True
    misspelling_weight: float = Field(default=0.1, gt=0)

    @model_validator(mode="after")
    def _some_templates(self) -> "Prompts":
        if not self.templates and self.kind is None:
            raise ValueError("give templates (with one '{}' each), or a kind (style, object, person, nudity, other)")
        resolved = self.resolved_count()
        if resolved > MAX_TEMPLATES:
            raise ValueError(
                f"{len(self.templates)} templates and {resolved - len(self.templates)} more from the {self.kind} bank "
                f"make {resolved}; at most {MAX_TEMPLATES} are allowed (fewer templates or a smaller bank_size)"
            )
        return self

    def resolved_count(self) -> int:
        """How many templates ``erase`` uses: the manifest's own, then the bank templates ``kind`` adds."""
        if self.kind is None:
            return len(self.templates)
        from ..banks import bank

        own = set(self.templates)
        return len(self.templates) + sum(1 for t in bank(self.kind)[: self.bank_size] if t not in own)


#: The caption sets shipped with the package (``erasepro_hub/banks/captions.txt`` is ``default-v1``).
CaptionSet = Literal["default-v1", "none"]


class Preserve(_Strict):
    """What should not move (docs/design.md §2.2).

    ``concepts`` (in ``templates``, default: the prompt templates): ``mode`` ``soft`` (weight
    ``weight``, no capacity cost), ``exact`` (``ΔW P = 0``; uses capacity) or ``none``.
    ``captions``: a caption set shipped with the package — a few hundred short, varied captions —
    kept in place by soft preservation (weight ``caption_weight``) on top of the concepts, so that
    unrelated prompts keep their conditioning without a preserve list; ``none`` turns it off. It
    applies to the ErasePro methods; the UCE baseline keeps its published form.
    ``positions``: which positions of each preserve prompt are kept where the token policy keeps more
    than one: ``prompt`` (its own tokens, BOS to end-of-text), ``window`` (every position the UNet
    attends to, padding included), or ``auto``: ``prompt`` where the caption set is kept (its summary
    covers the whole window), ``window`` where it is not (``captions: none``, the UCE baseline).
    """

    concepts: list[Text] = Field(default_factory=list, max_length=MAX_PROMPT_LIST)
    templates: list[Template] | None = Field(default=None, max_length=MAX_TEMPLATES)
    mode: Literal["none", "soft", "exact"] = "soft"
    #: λ_p; 0.1 was chosen by measurement (docs/defaults.md)
    weight: float = Field(default=0.1, ge=0)
    captions: CaptionSet = "default-v1"
    #: chosen by measurement (docs/defaults.md)
    caption_weight: float = Field(default=0.1, gt=0)
    #: chosen by measurement (docs/defaults.md): the same erasure and preservation, a fraction of the solve
    positions: Literal["auto", "prompt", "window"] = "auto"

    @field_validator("concepts")
    @classmethod
    def _non_blank(cls, value: list[str]) -> list[str]:
        for item in value:
            if not item.strip():
                raise ValueError("preserve concepts must not be blank")
        return value


class HeldoutPair(_Strict):
    """An explicit held-out pair: a prompt about the target and its anchor counterpart."""

    target: str = Field(min_length=1, max_length=MAX_TEXT)
    anchor: Text


class Evaluation(_Strict):
    """Prompts the solver never sees, used only for metrics."""

    heldout_templates: list[Template] = Field(default_factory=list, max_length=MAX_TEMPLATES)
    heldout_prompts: list[HeldoutPair] = Field(default_factory=list, max_length=MAX_PROMPT_LIST)
    preserve_prompts: list[Text] = Field(default_factory=list, max_length=MAX_PROMPT_LIST)


class TextEncoderSettings(_Strict):
    """Progressive text-encoder stages (docs/design.md §2.4); used by ``method: erasepro`` only.

    ``site``: the linear edited in each layer. ``depth``: how many layers, from the
    first (``null``: every layer that feeds the prompt embedding). ``target_mode``:
    ``site`` (the site outputs what it output for the anchor) or ``stream`` (the
    layer's residual stream equals the anchor's; ``mlp.fc2`` and
    ``self_attn.out_proj`` only). ``pooled`` (SDXL): ``match`` also edits the
    last layer of ``text_encoder_2`` so the pooled embedding of the target prompts
    equals the anchor's; ``ignore`` leaves it alone.
    """

    # defaults chosen by measurement (docs/defaults.md): mlp.fc2, from the second layer on, stream
    site: Literal["mlp.fc2", "mlp.fc1", "self_attn.out_proj"] = "mlp.fc2"
    first_layer: int = Field(default=1, ge=0)
    depth: int | None = Field(default=None, ge=0)
    target_mode: Literal["site", "stream"] = "stream"
    pooled: Literal["match", "ignore"] = "match"

    @model_validator(mode="after")
    def _stream_sites(self) -> "TextEncoderSettings":
        if self.target_mode == "stream" and self.site == "mlp.fc1":
            raise ValueError(
                "target_mode 'stream' needs a site whose output is added to the residual stream: "
                "use site mlp.fc2 or self_attn.out_proj, or set target_mode: site for mlp.fc1"
            )
        return self


class SolverSettings(_Strict):
    """Numerics shared by every stage. See :mod:`erasepro_hub.solver` for the definitions."""

    #: which paired tokens are constrained, and what a target's surplus concept tokens pair with
    #: (erasepro_hub.models.prompts; defaults by measurement, docs/defaults.md)
    token_policy: Literal["concept-eos", "concept-suffix", "all", "eos", "last-token"] = "concept-eos"
    surplus: Literal["anchor-eos", "anchor-first", "before-concept", "window-end", "none"] = "anchor-eos"
    rank_rtol: float = Field(default=1e-6, gt=0, lt=1)
    ridge: float = Field(default=0.0, ge=0)
    residual_tol: float = Field(default=1e-6, gt=0)
    strict: bool = False
    dtype: Dtype = "float32"


class UCESettings(_Strict):
    """UCE baseline settings (published defaults)."""

    lam: float = Field(default=0.5, gt=0)
    erase_scale: float = Field(default=1.0, ge=0)
    preserve_scale: float = Field(default=1.0, ge=0)
    #: the tokens UCE edits: ``last-token`` (the published procedure: the last token of each prompt, one per
    #: prompt, preserve prompts included) or ``erasepro`` (ErasePro's tokens: ``solver.token_policy``)
    tokens: Literal["last-token", "erasepro"] = "last-token"


class AdapterSettings(_Strict):
    """How the deltas are stored: ``lora`` (exact factors) or ``dense`` (ΔW stored as a LoRA)."""

    format: Literal["lora", "dense"] = "lora"
    dtype: Dtype = "float32"


class Source(_Strict):
    """A manifest a combined erasure was built from (``erasepro combine``)."""

    name: str | None = None
    ref: str = Field(max_length=MAX_MODEL_ID)  # the path or Hub reference it was read from
    recipe_sha256: Sha256


class Recipe(_Strict):
    """Everything ``erase`` needs; its canonical hash identifies an erasure."""

    schema_version: Literal[1]
    name: str | None = None
    description: str | None = Field(default=None, max_length=MAX_DESCRIPTION)
    base_model: BaseModelRef
    method: Literal["erasepro", "erasepro-kv", "uce"] = "erasepro"
    concepts: list[Concept] = Field(min_length=1, max_length=MAX_CONCEPTS)
    prompts: Prompts
    preserve: Preserve = Field(default_factory=Preserve)
    evaluation: Evaluation = Field(default_factory=Evaluation)
    solver: SolverSettings = Field(default_factory=SolverSettings)
    text_encoder: TextEncoderSettings = Field(default_factory=TextEncoderSettings)
    uce: UCESettings = Field(default_factory=UCESettings)
    adapter: AdapterSettings = Field(default_factory=AdapterSettings)
    sources: list[Source] = Field(default_factory=list, max_length=MAX_CONCEPTS)  # set by `erasepro combine`

    @field_validator("name")
    @classmethod
    def _name_form(cls, value: str | None) -> str | None:
        if value is not None and not NAME_RE.match(value):
            raise ValueError("use letters, digits, '.', '_' and '-' only (at most 96), starting with a letter or digit")
        return value

    @field_validator("concepts")
    @classmethod
    def _distinct_targets(cls, value: list[Concept]) -> list[Concept]:
        targets = [c.target for c in value]
        if len(set(targets)) != len(targets):
            raise ValueError("each target may appear only once")
        return value

    @model_validator(mode="after")
    def _bounded_prompts(self) -> "Recipe":
        check_prompt_budget(self)
        return self


# ----------------------------------------------------------------------------- outputs
class SiteRecord(_Strict):
    """What was done to one edited linear layer."""

    name: str
    stage: str
    shape: list[int]
    constraint_rank: int  # numerical rank of the constraints (singular values kept)
    update_rank: int = 0  # rank of the stored update; 0 when the targets already held (nothing stored)
    n_constraints: int
    residual: float
    preserve_residual: float | None = None
    condition: float
    delta_norm: float
    delta_norm_rel: float


class Outputs(_Strict):
    """Written by ``erase``: what was produced and how to check it."""

    recipe_sha256: Sha256
    family: Literal["sd1", "sd2", "sdxl", "sd3", "flux", "bert"]
    base_license: str | None = None
    adapter_file: str
    files: dict[str, str]
    base_fingerprints: dict[str, dict[str, str]]
    sites: list[SiteRecord]


class Provenance(_Strict):
    tool_version: str
    python: str
    platform: str
    device: str
    libraries: dict[str, str]
    command: list[str]
    created_at: str
    solve_seconds: float


class Manifest(Recipe):
    """A resolved manifest: the recipe plus what ``erase`` produced."""

    outputs: Outputs | None = None
    metrics: dict[str, Any] | None = None
    provenance: Provenance | None = None

    @field_validator("metrics")
    @classmethod
    def _json_metrics(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """Metrics are free-form, but JSON data: finite numbers, bounded depth, like the rest of the manifest."""
        check_json_data(value, "metrics")
        return value

    def recipe(self) -> Recipe:
        """The input half, exactly as ``regenerate`` uses it."""
        data = self.model_dump(mode="json", exclude={"outputs", "metrics", "provenance"})
        return Recipe.model_validate(data)
