"""The files of an erasure folder, by name: what ``erase`` writes, ``push`` uploads and readers check."""

from __future__ import annotations

import re

MANIFEST_FILE = "erasepro.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
PLOT_FILE = "delta_norms.png"
SAMPLES_FILE = "samples.png"  # written by `erasepro eval --images`; hashed and published when present


_FRONT_MATTER = re.compile(r"^---\s*\n(.*?)\n---\s*\n", re.S)


def front_matter_text(card: str) -> str | None:
    """The YAML between a card's opening ``---`` lines, or ``None`` when it has none."""
    match = _FRONT_MATTER.match(card)
    return match.group(1) if match else None


def front_matter(card: str) -> dict | None:
    """A card's front matter as a mapping; ``None`` when it is missing, not YAML or not a mapping."""
    import yaml

    text = front_matter_text(card)
    if text is None:
        return None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError:
        return None
    return data if isinstance(data, dict) else None
