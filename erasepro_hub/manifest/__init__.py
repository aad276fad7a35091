"""Manifests: the pydantic schema (frozen, ``extra="forbid"``), canonical YAML and a stable hash."""

from .io import canonical_json, dump_yaml, load_manifest, parse_manifest, recipe_sha256, to_data
from .schema import (
    SCHEMA_VERSION,
    AdapterSettings,
    BaseModelRef,
    Concept,
    Evaluation,
    Manifest,
    Outputs,
    Preserve,
    Prompts,
    Provenance,
    Recipe,
    SiteRecord,
    SolverSettings,
    TextEncoderSettings,
    UCESettings,
)

__all__ = [
    "SCHEMA_VERSION",
    "AdapterSettings",
    "BaseModelRef",
    "Concept",
    "Evaluation",
    "Manifest",
    "Outputs",
    "Preserve",
    "Prompts",
    "Provenance",
    "Recipe",
    "SiteRecord",
    "SolverSettings",
    "TextEncoderSettings",
    "UCESettings",
    "canonical_json",
    "dump_yaml",
    "load_manifest",
    "parse_manifest",
    "recipe_sha256",
    "to_data",
]
