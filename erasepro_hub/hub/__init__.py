"""The Hugging Face Hub: resolve revisions to commit shas, download base models, push and pull erasures.

The only package that imports ``huggingface_hub``; it does so inside functions.
"""
