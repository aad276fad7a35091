"""What an erasure is measured by: feature metrics, prompt sets, image metrics (docs/design.md §5)."""
