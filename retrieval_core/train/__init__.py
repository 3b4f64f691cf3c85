"""The train stage: contrastive (InfoNCE) fine-tuning of a bi-encoder on mined tuples.

``training`` is the loop (one worker or several); ``checkpoints`` saves and resumes it.
Reads: ``<root>/negatives/`` and the corpus. Writes: ``<root>/train/`` (checkpoints, the trained model, report).
"""
