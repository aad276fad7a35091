"""Jinja2 templates for model cards, installed with the package (the top-level templates/ folder)."""
