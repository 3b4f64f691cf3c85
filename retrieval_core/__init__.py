"""Dense-retrieval batch jobs: the library. It never imports ray; the drivers in ``jobs/`` do."""

__version__ = "0.1.0"
