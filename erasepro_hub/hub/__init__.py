"""The Hugging Face Hub: the only package that imports ``huggingface_hub`` (inside functions).

* :mod:`.client` — repository references, revision → commit sha, transport errors;
* :mod:`.download` — the parts of a base model the solver reads, pinned to a commit;
* :mod:`.publish` — push an erasure folder as one commit;
* :mod:`.pull` — pull an erasure by revision, bringing only the files it checked;
* :mod:`.card_data` — the card's front matter in the Hub's own format.
"""
