"""Model cards: card data from a manifest (no I/O), the Jinja2 template (top-level ``templates/``), rendering."""

from .render import card_context, check_repo_id, check_revision, render_card, write_card

__all__ = ["card_context", "check_repo_id", "check_revision", "render_card", "write_card"]
