"""Reading, writing and hashing manifests.

* Reading is bounded (docs/design.md §4.2, "Input limits"): a manifest is at most
  :data:`MAX_MANIFEST_BYTES`, nests at most :data:`MAX_YAML_DEPTH` levels and holds no YAML
  anchors or aliases (``&name`` / ``*name``: manifests never need them, and they let a few
  lines expand into exponentially many nodes).
* Reading rejects duplicate keys and turns every validation problem into a
  :class:`~erasepro_hub.errors.ManifestError` whose message names the field path
  (``concepts.0.anchor: field required``) and, for unknown keys, the known ones.
* Writing is canonical: fields in schema order, every default spelled out,
  block style, UTF-8; the same manifest always gives the same bytes.
* :func:`recipe_sha256` hashes the recipe half as canonical JSON (sorted keys),
  so a manifest and the recipe it was made from hash alike.
* A manifest the tool wrote (it has ``outputs``) spells out every setting its tool knew. A setting
  added later is missing from it and means what the tool did before the setting existed, not the
  new default: :data:`SETTINGS_ADDED` holds that value, so an older folder opens and regenerates
  the erasure it holds. Its hashes were taken without those settings: :func:`earlier_forms` gives
  the data as each earlier tool wrote it, and a recorded hash matches if it hashes any of them.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ..errors import ManifestError
from .limits import MAX_MANIFEST_BYTES, MAX_YAML_DEPTH
from .schema import Manifest, Recipe

#: settings added to schema 1 after folders were published: (section, key) -> the behaviour before it
SETTINGS_ADDED: dict[tuple[str, str], Any] = {
    ("uce", "tokens"): "erasepro",  # UCE edited ErasePro's tokens
    ("preserve", "positions"): "window",  # preserve prompts were kept at every window position
}


def _settings_before(data: dict) -> dict:
    """A tool-written manifest with the settings it predates filled in as their earlier behaviour."""
    if not isinstance(data.get("outputs"), dict):
        return data  # a recipe a person wrote: what it leaves out takes the default
    data = dict(data)
    for (section, key), value in SETTINGS_ADDED.items():
        if isinstance(data.get(section), dict) and key not in data[section]:
            data[section] = {**data[section], key: value}
    return data


def earlier_forms(data: dict) -> Iterator[dict]:
    """``data`` (:func:`to_data` of a recipe or manifest), then as each earlier tool would have written it.

    The settings are taken out newest first, and only while each holds the behaviour before it existed;
    a setting at another value could not have been written by the earlier tool, so the forms end there.
    """
    yield data
    for (section, key), before in reversed(SETTINGS_ADDED.items()):
        held = data.get(section)
        if not isinstance(held, dict) or key not in held or held[key] != before:
            return
        data = {**data, section: {k: v for k, v in held.items() if k != key}}
        yield data


class _UniqueKeyLoader(yaml.SafeLoader):
    """A safe loader that refuses duplicate mapping keys, anchors, aliases and deep nesting."""

    _depth = 0

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None, None,
                "YAML anchors and aliases (&name, *name) are not allowed in a manifest; write the value out",
                event.start_mark,
            )
        if isinstance(event, (yaml.SequenceStartEvent, yaml.MappingStartEvent)):
            if self._depth >= MAX_YAML_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {MAX_YAML_DEPTH} levels deep", event.start_mark
                )
            self._depth += 1
            try:
                return super().compose_node(parent, index)
            finally:
                self._depth -= 1
        return super().compose_node(parent, index)


def _construct_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: set = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


class _Dumper(yaml.SafeDumper):
    """Block-style YAML; multi-line strings as literal blocks; never an anchor or alias (the reader refuses them)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str_representer)


# ----------------------------------------------------------------------------- errors
def _known_keys(model: type[BaseModel], loc: tuple) -> list[str] | None:
    """The field names allowed at ``loc`` (the parent of an unknown key), if resolvable."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return None
        annotation = fields[part].annotation
        current = _model_in(annotation)
        if current is None:
            return None
    fields = getattr(current, "model_fields", None)
    return sorted(fields) if fields else None


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def format_validation_error(error: ValidationError, model: type[BaseModel], source: str) -> ManifestError:
    """Turn a pydantic error into a :class:`ManifestError` naming every field path."""
    problems: list[tuple[str, str]] = []
    for item in error.errors(include_url=False):
        loc = tuple(item.get("loc", ()))
        path = ".".join(str(p) for p in loc) or "(top level)"
        kind = item.get("type", "")
        msg = item.get("msg", "invalid")
        if kind == "extra_forbidden":
            known = _known_keys(model, loc[:-1])
            msg = f"unknown key '{loc[-1]}'" + (f"; allowed here: {', '.join(known)}" if known else "")
        elif kind == "missing":
            msg = "required field is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, ") :]
        problems.append((path, msg))
    lines = "\n".join(f"  - {path}: {msg}" for path, msg in problems)
    return ManifestError(f"invalid manifest {source}:\n{lines}", problems=problems)


# ----------------------------------------------------------------------------- read
def _yaml_reason(exc: yaml.YAMLError) -> str:
    """A YAML error on one line: what is wrong and where."""
    if isinstance(exc, yaml.MarkedYAMLError):
        parts = [part for part in (exc.context, exc.problem) if part]
        mark = exc.problem_mark or exc.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        return "; ".join(parts) + where
    return " ".join(str(exc).split())


def _too_large(source: str) -> ManifestError:
    return ManifestError(
        f"invalid manifest {source}: larger than {MAX_MANIFEST_BYTES // 2**20} MiB; a manifest is a few hundred KiB "
        "at most",
        problems=[("(top level)", "file too large")],
    )


def parse_manifest(text: str, *, source: str = "<string>") -> Manifest:
    """Parse YAML text into a validated :class:`Manifest` (outputs optional)."""
    if len(text) > MAX_MANIFEST_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_MANIFEST_BYTES:
        raise _too_large(source)
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ManifestError(f"invalid manifest {source}: not valid YAML: {_yaml_reason(exc)}") from None
    except RecursionError:  # a guard: the depth limit above refuses deep nesting first
        raise ManifestError(f"invalid manifest {source}: nested too deeply") from None
    if not isinstance(data, dict):
        raise ManifestError(
            f"invalid manifest {source}: the top level must be a mapping of keys "
            f"(schema_version, base_model, concepts, ...), got {type(data).__name__}",
            problems=[("(top level)", "must be a mapping")],
        )
    try:
        return Manifest.model_validate(_settings_before(data))
    except ValidationError as exc:
        raise format_validation_error(exc, Manifest, source) from None


def load_manifest(path: str | Path) -> Manifest:
    """Read and validate a manifest file."""
    path = Path(path)
    if path.is_dir():
        path = path / "erasepro.yaml"
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_MANIFEST_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(f"manifest not found: {path} (give the path of a .yaml manifest)") from None
    except OSError as exc:
        raise ManifestError(f"cannot read manifest {path}: {exc.strerror or exc}") from None
    if len(raw) > MAX_MANIFEST_BYTES:
        raise _too_large(str(path))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ManifestError(f"invalid manifest {path}: not UTF-8 text") from None
    return parse_manifest(text, source=str(path))


# ----------------------------------------------------------------------------- write / hash
def to_data(model: BaseModel) -> dict:
    """JSON-compatible data, every default spelled out, in schema order."""
    return model.model_dump(mode="json")


def dump_yaml(model: BaseModel) -> str:
    """Canonical YAML for a manifest or recipe."""
    return yaml.dump(
        to_data(model), Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=100
    )


def canonical_json(data: Any) -> bytes:
    """Sorted-key, compact, UTF-8 JSON: the byte form that hashes are taken of."""
    return json.dumps(data, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()


def recipe_sha256(recipe: Recipe) -> str:
    """The stable content hash of a recipe (a :class:`Manifest` is reduced to its recipe first)."""
    return recipe_sha256s(recipe)[0]


def recipe_sha256s(recipe: Recipe) -> list[str]:
    """:func:`recipe_sha256`, then the hash each earlier tool took of the same recipe (:func:`earlier_forms`)."""
    if isinstance(recipe, Manifest):
        recipe = recipe.recipe()
    return [hashlib.sha256(canonical_json(form)).hexdigest() for form in earlier_forms(to_data(recipe))]
