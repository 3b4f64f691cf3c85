"""The index stage and the readers of its output.

``indexing`` trains one FAISS index, fills a shard index per embedding shard with global ids and merges them;
``faiss_index`` builds the FAISS objects; ``search`` queries an index; ``lookup`` turns row ids back into doc ids
and texts. Reads: ``<root>/embeddings/``. Writes: ``<root>/index/`` (trained, shard and merged indexes, manifest).
"""
