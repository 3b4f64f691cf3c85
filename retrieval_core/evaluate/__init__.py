"""The evaluate stage's measures: nDCG, recall and MRR at a cut-off, as BEIR defines them.

Reads: a run (query id to ranked doc ids) and qrels (read by ``retrieval_core.io.judgements``). Writes: nothing
itself; the job writes ``<root>/eval/metrics.json``.
"""
