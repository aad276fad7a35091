"""The files of an erasure folder, by name: what ``erase`` writes, ``push`` uploads and readers check."""

from __future__ import annotations

MANIFEST_FILE = "erasepro.yaml"
METRICS_FILE = "metrics.json"
CARD_FILE = "README.md"
PLOT_FILE = "delta_norms.png"
