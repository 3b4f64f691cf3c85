"""The nightly refresh: a new version of an output root from tonight's snapshot and the published version.

``diffing`` finds the changed, added and deleted documents by hash bucket; ``refreshing`` plans the version and
encodes only the change (tombstones for the rest); ``index_reuse`` builds the version's index from the earlier
one's where it can; ``publishing`` gates the version, moves ``CURRENT`` and applies retention.
Reads: the snapshot and ``<root>/versions/<published>/``. Writes: ``<root>/versions/<new>/``, then ``CURRENT``.
"""
