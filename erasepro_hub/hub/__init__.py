"""The Hugging Face Hub: resolve revisions to commit shas, download base models (and, later, push/pull).

The only package that imports ``huggingface_hub``; it does so inside functions.
"""
