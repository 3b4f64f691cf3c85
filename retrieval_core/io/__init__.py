"""Storage and the data contracts every stage shares.

``storage`` reads and writes any fsspec URL atomically; ``corpus`` and ``sharding`` read the Parquet/JSONL corpus
and cut it into shards; ``id_check`` finds duplicate doc ids by a hash-partitioned map/reduce; ``manifest`` and
``schemas`` stamp and check what a stage writes; ``faults`` injects failures for the tests; ``judgements`` reads
queries and qrels; ``leases`` and ``versions`` keep an output root's writers apart and its published versions.
Reads and writes: whatever URL a stage gives it.
"""
