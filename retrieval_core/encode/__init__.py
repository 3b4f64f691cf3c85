"""The encode stage: corpus shards in, embedding shards out.

``encoding`` loads a bi-encoder (sentence-transformers, or an embeddings API through ``providers``; presets in
``families``; weights found by ``model_files``) and encodes texts; ``embeddings`` is the stage itself.
Reads: the corpus. Writes: ``<root>/embeddings/`` (shards, commit records, manifest) and ``<root>/rejects/encode/``.
"""
