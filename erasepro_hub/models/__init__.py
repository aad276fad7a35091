"""Stable Diffusion glue: builtin models, loading, edit sites, prompts and the progressive driver.

This is the only package that imports diffusers and transformers; it does so
lazily, inside functions, so importing it stays cheap.
"""
