"""The mine stage: hard negatives for query/positive pairs, with filters against false negatives.

``inputs`` reads the pairs (or BEIR queries + qrels); ``shuffle`` and ``plan`` cut them into parts by hash bucket;
``parts`` mines a part in two halves around the text join of ``texts``; ``negatives`` selects per query;
``rescoring`` scores with a cross-encoder; ``exports`` writes the training formats; ``report`` the statistics;
``mining`` is the stage's layout, records and manifest.
Reads: ``<root>/index/``, ``<root>/embeddings/``, the corpus and the pairs. Writes: ``<root>/negatives/``.
"""
