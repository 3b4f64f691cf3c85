"""Thin drivers: one module per stage (``python -m jobs.<stage> --config F [--set k=v ...]``)."""
